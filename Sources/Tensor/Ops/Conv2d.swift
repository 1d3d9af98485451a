/// 2-D convolution (PyTorch's F.conv2d, groups = 1, dilation = 1) as im2col + one sgemm per image.
///
/// Forward:  Y[n] [Cout, Ho·Wo] = W [Cout, Cin·kh·kw] · cols(x[n]) [Cin·kh·kw, Ho·Wo].
/// dW:       Σₙ dY[n] · cols(x[n])ᵀ.
/// dX, stride 1: a convolution of dY with the flipped, transposed kernel (im2col on dY + GEMM: no
///           scatter, and the GEMM writes only Cin·H·W outputs).
/// dX, otherwise: cols = Wᵀ · dY[n], then col2im (split over input channels, so no write conflicts).
/// A 1×1 stride-1 unpadded convolution skips im2col: it is a plain GEMM on the image itself.

import Foundation

public enum Conv2d {
    /// Output spatial size of a convolution.
    static func outSize(_ n: Int, kernel k: Int, stride s: Int, padding p: Int) -> Int { (n + 2 * p - k) / s + 1 }

    /// x [N, Cin, H, W], w [Cout, Cin, kh, kw] (kh = kw = 1 or 3; w may be fp16/bf16: widened per call),
    /// b [Cout]? → [N, Cout, Ho, Wo].
    public static func forward(_ x: Tensor, _ w: Tensor, _ b: Tensor?, stride: Int, padding: Int) -> Tensor {
        let g = Geometry(x: x.shape, w: w.shape, stride: stride, padding: padding)
        let x = x.fp32(), w = w.fp32()
        let y = Tensor(uninitialized: [g.n, g.cout, g.ho, g.wo])
        let py = y.mutablePointer, px = x.pointer, pw = w.pointer
        let outPlane = g.ho * g.wo, inImage = g.cin * g.h * g.w, outImage = g.cout * outPlane
        if let b = b?.fp32() {
            precondition(b.shape == [g.cout], "conv2d: bias \(b.shape) does not match weight \(w.shape)")
            let pb = b.pointer
            parallelFor(g.n * g.cout, grain: max(1, 16384 / max(outPlane, 1))) { rows in
                for r in rows { (py + r * outPlane).initialize(repeating: pb[r % g.cout], count: outPlane) }
            }
        }
        let beta: Float = b == nil ? 0 : 1
        if g.isPointwise {
            for i in 0..<g.n {
                BLAS.sgemm(transA: false, transB: false, m: g.cout, n: outPlane, k: g.cin, a: pw, lda: g.cin,
                           b: px + i * inImage, ldb: outPlane, beta: beta, c: py + i * outImage, ldc: outPlane)
            }
            return y
        }
        let rows = g.cin * g.kh * g.kw
        let cols = UnsafeMutablePointer<Float>.allocate(capacity: rows * outPlane)
        defer { cols.deallocate() }
        for i in 0..<g.n {
            im2col(px + i * inImage, channels: g.cin, h: g.h, w: g.w, kh: g.kh, kw: g.kw, stride: g.stride,
                   padding: g.padding, ho: g.ho, wo: g.wo, into: cols)
            BLAS.sgemm(transA: false, transB: false, m: g.cout, n: outPlane, k: rows, a: pw, lda: rows,
                       b: cols, ldb: outPlane, beta: beta, c: py + i * outImage, ldc: outPlane)
        }
        return y
    }

    /// Gradients of `forward` for upstream dY [N, Cout, Ho, Wo]. Only the requested ones are computed: a
    /// frozen weight (LoRA training) costs the input gradient alone.
    public static func backward(_ dY: Tensor, x: Tensor, w: Tensor, stride: Int, padding: Int,
                                wantX: Bool, wantW: Bool, wantB: Bool) -> (dX: Tensor?, dW: Tensor?, dB: Tensor?) {
        let g = Geometry(x: x.shape, w: w.shape, stride: stride, padding: padding)
        precondition(dY.shape == [g.n, g.cout, g.ho, g.wo],
                     "conv2d backward: gradient \(dY.shape) does not match output [\(g.n), \(g.cout), \(g.ho), \(g.wo)]")
        let dY = dY.fp32()
        var dX: Tensor?, dW: Tensor?, dB: Tensor?
        if wantX { dX = inputGradient(dY, w: w.fp32(), g) }
        if wantW { dW = weightGradient(dY, x: x.fp32(), g) }
        if wantB { dB = biasGradient(dY, g) }
        return (dX, dW, dB)
    }

    // MARK: - Gradients

    static func inputGradient(_ dY: Tensor, w: Tensor, _ g: Geometry) -> Tensor {
        let dX = Tensor(uninitialized: [g.n, g.cin, g.h, g.w])
        let pd = dX.mutablePointer, pg = dY.pointer, pw = w.pointer
        let inPlane = g.h * g.w, outPlane = g.ho * g.wo
        let inImage = g.cin * inPlane, outImage = g.cout * outPlane
        let taps = g.kh * g.kw
        if g.isPointwise {
            // dX[n] [Cin, HW] = Wᵀ [Cin, Cout] · dY[n] [Cout, HW]
            for i in 0..<g.n {
                BLAS.sgemm(transA: true, transB: false, m: g.cin, n: inPlane, k: g.cout, a: pw, lda: g.cin,
                           b: pg + i * outImage, ldb: outPlane, beta: 0, c: pd + i * inImage, ldc: inPlane)
            }
            return dX
        }
        if g.stride == 1 && g.padding <= g.kh - 1 && g.padding <= g.kw - 1 && g.kh == g.kw {
            // dX = conv(dY, W'), W'[ci, co, i, j] = W[co, ci, kh-1-i, kw-1-j], padding k-1-p.
            let rows = g.cout * taps
            let flipped = UnsafeMutablePointer<Float>.allocate(capacity: g.cin * rows)
            defer { flipped.deallocate() }
            parallelFor(g.cin, grain: max(1, 4096 / max(rows, 1))) { cis in
                for ci in cis {
                    let dst = flipped + ci * rows
                    for co in 0..<g.cout {
                        let src = pw + (co * g.cin + ci) * taps
                        for t in 0..<taps { dst[co * taps + t] = src[taps - 1 - t] }
                    }
                }
            }
            let cols = UnsafeMutablePointer<Float>.allocate(capacity: rows * inPlane)
            defer { cols.deallocate() }
            for i in 0..<g.n {
                im2col(pg + i * outImage, channels: g.cout, h: g.ho, w: g.wo, kh: g.kh, kw: g.kw, stride: 1,
                       padding: g.kh - 1 - g.padding, ho: g.h, wo: g.w, into: cols)
                BLAS.sgemm(transA: false, transB: false, m: g.cin, n: inPlane, k: rows, a: flipped, lda: rows,
                           b: cols, ldb: inPlane, beta: 0, c: pd + i * inImage, ldc: inPlane)
            }
            return dX
        }
        // cols [Cin·kh·kw, Ho·Wo] = Wᵀ · dY[n], then scatter-add back onto the image.
        let rows = g.cin * taps
        let cols = UnsafeMutablePointer<Float>.allocate(capacity: rows * outPlane)
        defer { cols.deallocate() }
        for i in 0..<g.n {
            BLAS.sgemm(transA: true, transB: false, m: rows, n: outPlane, k: g.cout, a: pw, lda: rows,
                       b: pg + i * outImage, ldb: outPlane, beta: 0, c: cols, ldc: outPlane)
            col2im(cols, channels: g.cin, h: g.h, w: g.w, kh: g.kh, kw: g.kw, stride: g.stride, padding: g.padding,
                   ho: g.ho, wo: g.wo, into: pd + i * inImage)
        }
        return dX
    }

    static func weightGradient(_ dY: Tensor, x: Tensor, _ g: Geometry) -> Tensor {
        let dW = Tensor(uninitialized: [g.cout, g.cin, g.kh, g.kw])
        let pd = dW.mutablePointer, pg = dY.pointer, px = x.pointer
        let outPlane = g.ho * g.wo, inImage = g.cin * g.h * g.w, outImage = g.cout * outPlane
        let rows = g.cin * g.kh * g.kw
        // dW [Cout, Cin·kh·kw] = Σₙ dY[n] [Cout, HoWo] · cols[n]ᵀ [HoWo, Cin·kh·kw]
        if g.isPointwise {
            for i in 0..<g.n {
                BLAS.sgemm(transA: false, transB: true, m: g.cout, n: rows, k: outPlane, a: pg + i * outImage,
                           lda: outPlane, b: px + i * inImage, ldb: outPlane, beta: i == 0 ? 0 : 1, c: pd, ldc: rows)
            }
            return dW
        }
        let cols = UnsafeMutablePointer<Float>.allocate(capacity: rows * outPlane)
        defer { cols.deallocate() }
        for i in 0..<g.n {
            im2col(px + i * inImage, channels: g.cin, h: g.h, w: g.w, kh: g.kh, kw: g.kw, stride: g.stride,
                   padding: g.padding, ho: g.ho, wo: g.wo, into: cols)
            BLAS.sgemm(transA: false, transB: true, m: g.cout, n: rows, k: outPlane, a: pg + i * outImage,
                       lda: outPlane, b: cols, ldb: outPlane, beta: i == 0 ? 0 : 1, c: pd, ldc: rows)
        }
        return dW
    }

    static func biasGradient(_ dY: Tensor, _ g: Geometry) -> Tensor {
        let dB = Tensor(uninitialized: [g.cout])
        let pb = dB.mutablePointer, pg = dY.pointer
        let plane = g.ho * g.wo
        parallelFor(g.cout, grain: max(1, 16384 / max(plane * g.n, 1))) { cos in
            for co in cos {
                var s: Float = 0
                for i in 0..<g.n { s += sum(pg + (i * g.cout + co) * plane, plane) }
                pb[co] = s
            }
        }
        return dB
    }

    /// Σ p[0..<n] with 16 lanes of partial sums (a scalar loop is one dependent add per element).
    @inline(__always)
    static func sum(_ p: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc = SIMD16<Float>()
        let raw = UnsafeRawPointer(p)
        var i = 0
        while i + 16 <= n {
            acc += raw.loadUnaligned(fromByteOffset: i * 4, as: SIMD16<Float>.self)
            i += 16
        }
        var s = acc.sum()
        while i < n { s += p[i]; i += 1 }
        return s
    }

    // MARK: - Layout transforms

    /// The range of output columns `ox` whose input column `ox·s + j − p` lies inside [0, w).
    @inline(__always)
    static func validRange(kernelOffset j: Int, size w: Int, out wo: Int, stride s: Int, padding p: Int) -> Range<Int> {
        let lo = p - j <= 0 ? 0 : (p - j + s - 1) / s
        let last = w - 1 + p - j
        let hi = last < 0 ? 0 : min(wo, last / s + 1)
        return min(lo, hi)..<hi
    }

    /// cols[(c·kh + i)·kw + j, oy·wo + ox] = x[c, oy·s + i − p, ox·s + j − p], zero outside the image.
    /// x is one image [channels, h, w]; cols is [channels·kh·kw, ho·wo].
    static func im2col(_ x: UnsafePointer<Float>, channels: Int, h: Int, w: Int, kh: Int, kw: Int, stride s: Int,
                       padding p: Int, ho: Int, wo: Int, into cols: UnsafeMutablePointer<Float>) {
        let rows = channels * kh * kw, plane = ho * wo
        parallelFor(rows, grain: max(1, 8192 / max(plane, 1))) { range in
            for r in range {
                let c = r / (kh * kw), i = (r / kw) % kh, j = r % kw
                let src = x + c * h * w, dst = cols + r * plane
                let xs = validRange(kernelOffset: j, size: w, out: wo, stride: s, padding: p)
                for oy in 0..<ho {
                    let iy = oy * s + i - p
                    let d = dst + oy * wo
                    if iy < 0 || iy >= h || xs.isEmpty {
                        d.initialize(repeating: 0, count: wo)
                        continue
                    }
                    if xs.lowerBound > 0 { d.initialize(repeating: 0, count: xs.lowerBound) }
                    if xs.upperBound < wo { (d + xs.upperBound).initialize(repeating: 0, count: wo - xs.upperBound) }
                    let row = src + iy * w + j - p   // row[ox·s] is x[c, iy, ox·s + j − p]
                    if s == 1 {
                        (d + xs.lowerBound).update(from: row + xs.lowerBound, count: xs.count)
                    } else if s == 2 {
                        for ox in xs { d[ox] = row[2 * ox] }
                    } else {
                        for ox in xs { d[ox] = row[s * ox] }
                    }
                }
            }
        }
    }

    /// The adjoint of `im2col`: x[c, oy·s + i − p, ox·s + j − p] += cols[(c·kh + i)·kw + j, oy·wo + ox].
    /// Each channel is owned by one thread, so the scatter needs no atomics. Overwrites x (one image).
    static func col2im(_ cols: UnsafePointer<Float>, channels: Int, h: Int, w: Int, kh: Int, kw: Int, stride s: Int,
                       padding p: Int, ho: Int, wo: Int, into x: UnsafeMutablePointer<Float>) {
        let plane = ho * wo
        parallelFor(channels, grain: max(1, 4096 / max(plane * kh * kw, 1))) { range in
            for c in range {
                let dst = x + c * h * w
                dst.initialize(repeating: 0, count: h * w)
                for i in 0..<kh {
                    for j in 0..<kw {
                        let src = cols + ((c * kh + i) * kw + j) * plane
                        let xs = validRange(kernelOffset: j, size: w, out: wo, stride: s, padding: p)
                        if xs.isEmpty { continue }
                        for oy in 0..<ho {
                            let iy = oy * s + i - p
                            if iy < 0 || iy >= h { continue }
                            let row = dst + iy * w + j - p, g = src + oy * wo
                            if s == 1 {
                                for ox in xs { row[ox] += g[ox] }
                            } else if s == 2 {
                                for ox in xs { row[2 * ox] += g[ox] }
                            } else {
                                for ox in xs { row[s * ox] += g[ox] }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Shapes of one convolution, checked once.
    struct Geometry {
        let n, cin, h, w, cout, kh, kw, stride, padding, ho, wo: Int

        init(x: [Int], w wshape: [Int], stride: Int, padding: Int) {
            precondition(x.count == 4, "conv2d: input must be [N, C, H, W], got \(x)")
            precondition(wshape.count == 4 && wshape[1] == x[1],
                         "conv2d: weight \(wshape) does not match input \(x) (want [Cout, \(x[1]), kh, kw])")
            precondition(stride >= 1 && padding >= 0, "conv2d: stride \(stride), padding \(padding)")
            n = x[0]; cin = x[1]; h = x[2]; w = x[3]
            cout = wshape[0]; kh = wshape[2]; kw = wshape[3]
            self.stride = stride; self.padding = padding
            ho = Conv2d.outSize(h, kernel: kh, stride: stride, padding: padding)
            wo = Conv2d.outSize(w, kernel: kw, stride: stride, padding: padding)
            precondition(ho >= 1 && wo >= 1, "conv2d: kernel \(kh)×\(kw) larger than padded input \(x)")
        }

        /// A 1×1, stride-1, unpadded convolution: a GEMM on the image as it is.
        var isPointwise: Bool { kh == 1 && kw == 1 && stride == 1 && padding == 0 }
    }
}

extension Tape {
    /// F.conv2d(x, w, b, stride, padding). Saves x and w; a frozen w gets no gradient.
    public func conv2d(_ x: Var, _ w: Var, _ b: Var? = nil, stride: Int = 1, padding: Int = 0) -> Var {
        let xv = x.value, wv = w.value
        let inputs = b.map { [x, w, $0] } ?? [x, w]
        return record(Conv2d.forward(xv, wv, b?.value, stride: stride, padding: padding), inputs: inputs) { g, need in
            let r = Conv2d.backward(g, x: xv, w: wv, stride: stride, padding: padding, wantX: need[0], wantW: need[1],
                                    wantB: need.count > 2 && need[2])
            return [r.dX, r.dW, r.dB]
        }
    }
}
