/// 2-D convolution (PyTorch's F.conv2d, groups = 1, dilation = 1), on sgemm.
///
/// 3×3 stride 1 with ≥ 32×32 outputs (the SDXL UNet/VAE body): Winograd F(2×2, 3×3), forward and input
/// gradient (the input gradient of a stride-1 convolution is itself a convolution of dY with the kernel
/// rotated 180° and its channel axes swapped). Measured on one Zen 5 core, 320 ch at 64×64: 25 ms
/// against 42 ms for im2col + sgemm; at 16×16 its GEMMs are too narrow and im2col is kept.
/// Otherwise im2col + sgemm, in bands of output rows (the column buffer stays a few MB):
///   forward  Y[n] [Cout, Ho·Wo] = W [Cout, Cin·kh·kw] · cols(x[n]) [Cin·kh·kw, Ho·Wo]
///   dX       cols = Wᵀ · dY[n], then col2im (split over input channels, so no write conflicts)
/// dW is always Σₙ dY[n] · cols(x[n])ᵀ. A 1×1 stride-1 unpadded convolution is a plain GEMM on the image.

import Foundation

public enum Conv2d {
    /// Output spatial size of a convolution.
    static func outSize(_ n: Int, kernel k: Int, stride s: Int, padding p: Int) -> Int { (n + 2 * p - k) / s + 1 }

    /// x [N, Cin, H, W], w [Cout, Cin, kh, kw] (kh = kw = 1 or 3; w may be fp16/bf16: widened per call),
    /// b [Cout]? → [N, Cout, Ho, Wo].
    /// `frozenWeight`: w's bytes never change (a base model's kernel), so the bf16 family reorders it once.
    public static func forward(_ x: Tensor, _ w: Tensor, _ b: Tensor?, stride: Int, padding: Int,
                               frozenWeight: Bool = false) -> Tensor {
        let g = Geometry(x: x.shape, w: w.shape, stride: stride, padding: padding)
        if Kernels.family == .bf16 {
            if let b { precondition(b.shape == [g.cout], "conv2d: bias \(b.shape) does not match weight \(w.shape)") }
            let y = Tensor(uninitialized: [g.n, g.cout, g.ho, g.wo])
            DNNL.convForward(x.fp32(), w, b, g.dnnl, frozen: frozenWeight, into: y)
            return y
        }
        let x = x.fp32(), w = w.fp32()
        let y = Tensor(uninitialized: [g.n, g.cout, g.ho, g.wo])
        let py = y.mutablePointer, px = x.pointer, pw = w.pointer
        let outPlane = g.ho * g.wo, inImage = g.cin * g.h * g.w, outImage = g.cout * outPlane
        if g.useWinograd {
            let pb = b.map { $0.fp32() }
            if let pb = pb { precondition(pb.shape == [g.cout], "conv2d: bias \(pb.shape) does not match weight \(w.shape)") }
            Winograd.convolve(px, images: g.n, inC: g.cin, h: g.h, w: g.w, padding: g.padding, weights: pw,
                              flipTransposed: false, outC: g.cout, bias: pb?.pointer, into: py)
            return y
        }
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
        let band = bandRows(k: rows, outRows: g.ho, outWidth: g.wo)
        Scratch.with(rows * band * g.wo) { cols in
            for i in 0..<g.n {
                for oy0 in Swift.stride(from: 0, to: g.ho, by: band) {
                    let oy1 = min(g.ho, oy0 + band), width = (oy1 - oy0) * g.wo
                    im2col(px + i * inImage, channels: g.cin, h: g.h, w: g.w, kh: g.kh, kw: g.kw, stride: g.stride,
                           padding: g.padding, outRows: oy0..<oy1, wo: g.wo, into: cols)
                    BLAS.sgemm(transA: false, transB: false, m: g.cout, n: width, k: rows, a: pw, lda: rows,
                               b: cols, ldb: width, beta: beta, c: py + i * outImage + oy0 * g.wo, ldc: outPlane)
                }
            }
        }
        return y
    }

    /// Gradients of `forward` for upstream dY [N, Cout, Ho, Wo]. Only the requested ones are computed: a
    /// frozen weight (LoRA training) costs the input gradient alone.
    /// The bf16 family computes the input gradient on oneDNN; the weight gradient (a trainable kernel: LoCon) stays
    /// fp32 on both families.
    public static func backward(_ dY: Tensor, x: Tensor, w: Tensor, stride: Int, padding: Int,
                                wantX: Bool, wantW: Bool, wantB: Bool, frozenWeight: Bool = false)
        -> (dX: Tensor?, dW: Tensor?, dB: Tensor?) {
        let g = Geometry(x: x.shape, w: w.shape, stride: stride, padding: padding)
        precondition(dY.shape == [g.n, g.cout, g.ho, g.wo],
                     "conv2d backward: gradient \(dY.shape) does not match output [\(g.n), \(g.cout), \(g.ho), \(g.wo)]")
        let dY = dY.fp32()
        var dX: Tensor?, dW: Tensor?, dB: Tensor?
        if wantX, Kernels.family == .bf16 {
            let d = Tensor(uninitialized: [g.n, g.cin, g.h, g.w])
            DNNL.convBackwardData(dY, w, g.dnnl, frozen: frozenWeight, into: d)
            dX = d
        } else if wantX { dX = inputGradient(dY, w: w.fp32(), g) }
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
        if g.useWinograd {
            // dX = conv(dY, W rotated 180° with its channel axes swapped, padding 2 − p)
            Winograd.convolve(pg, images: g.n, inC: g.cout, h: g.ho, w: g.wo, padding: 2 - g.padding, weights: pw,
                              flipTransposed: true, outC: g.cin, bias: nil, into: pd)
            return dX
        }
        // cols [Cin·kh·kw, band] = Wᵀ · dY[n][:, band], then scatter-add back onto the image.
        let rows = g.cin * taps
        let band = bandRows(k: rows, outRows: g.ho, outWidth: g.wo)
        Scratch.with(rows * band * g.wo) { cols in
            for i in 0..<g.n {
                for oy0 in Swift.stride(from: 0, to: g.ho, by: band) {
                    let oy1 = min(g.ho, oy0 + band), width = (oy1 - oy0) * g.wo
                    BLAS.sgemm(transA: true, transB: false, m: rows, n: width, k: g.cout, a: pw, lda: rows,
                               b: pg + i * outImage + oy0 * g.wo, ldb: outPlane, beta: 0, c: cols, ldc: width)
                    col2im(cols, channels: g.cin, h: g.h, w: g.w, kh: g.kh, kw: g.kw, stride: g.stride,
                           padding: g.padding, outRows: oy0..<oy1, wo: g.wo, clear: oy0 == 0, into: pd + i * inImage)
                }
            }
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
        let band = bandRows(k: rows, outRows: g.ho, outWidth: g.wo)
        Scratch.with(rows * band * g.wo) { cols in
            var first = true
            for i in 0..<g.n {
                for oy0 in Swift.stride(from: 0, to: g.ho, by: band) {
                    let oy1 = min(g.ho, oy0 + band), width = (oy1 - oy0) * g.wo
                    im2col(px + i * inImage, channels: g.cin, h: g.h, w: g.w, kh: g.kh, kw: g.kw, stride: g.stride,
                           padding: g.padding, outRows: oy0..<oy1, wo: g.wo, into: cols)
                    BLAS.sgemm(transA: false, transB: true, m: g.cout, n: rows, k: width, a: pg + i * outImage + oy0 * g.wo,
                               lda: outPlane, b: cols, ldb: width, beta: first ? 0 : 1, c: pd, ldc: rows)
                    first = false
                }
            }
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

    /// How many output rows one im2col band holds. The column buffer is kept to a few MB, so it is
    /// still in cache when sgemm packs it (and is not a fresh 50-200 MB allocation per call), but a band
    /// has at least ~1024 columns, so sgemm's packing of the weight matrix is amortised.
    static func bandRows(k: Int, outRows: Int, outWidth: Int) -> Int {
        let budget = 2 << 20, minCols = 1024   // floats, columns
        let byBudget = budget / max(k * outWidth, 1)
        let byWidth = (minCols + outWidth - 1) / max(outWidth, 1)
        return max(1, min(outRows, max(byBudget, byWidth)))
    }

    /// The range of output columns `ox` whose input column `ox·s + j − p` lies inside [0, w).
    @inline(__always)
    static func validRange(kernelOffset j: Int, size w: Int, out wo: Int, stride s: Int, padding p: Int) -> Range<Int> {
        let lo = p - j <= 0 ? 0 : (p - j + s - 1) / s
        let last = w - 1 + p - j
        let hi = last < 0 ? 0 : min(wo, last / s + 1)
        return min(lo, hi)..<hi
    }

    /// cols[(c·kh + i)·kw + j, (oy − oy₀)·wo + ox] = x[c, oy·s + i − p, ox·s + j − p] for oy in `outRows`,
    /// zero outside the image. x is one image [channels, h, w]; cols is [channels·kh·kw, |outRows|·wo].
    static func im2col(_ x: UnsafePointer<Float>, channels: Int, h: Int, w: Int, kh: Int, kw: Int, stride s: Int,
                       padding p: Int, outRows: Range<Int>, wo: Int, into cols: UnsafeMutablePointer<Float>) {
        let rows = channels * kh * kw, width = outRows.count * wo
        parallelFor(rows, grain: max(1, 8192 / max(width, 1))) { range in
            for r in range {
                let c = r / (kh * kw), i = (r / kw) % kh, j = r % kw
                let src = x + c * h * w, dst = cols + r * width - outRows.lowerBound * wo
                let xs = validRange(kernelOffset: j, size: w, out: wo, stride: s, padding: p)
                for oy in outRows {
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

    /// The adjoint of `im2col` for one band of output rows: x[c, oy·s + i − p, ox·s + j − p] +=
    /// cols[(c·kh + i)·kw + j, (oy − oy₀)·wo + ox]. Each channel is owned by one thread, so the scatter
    /// needs no atomics. `clear` zeroes the image first (the first band).
    static func col2im(_ cols: UnsafePointer<Float>, channels: Int, h: Int, w: Int, kh: Int, kw: Int, stride s: Int,
                       padding p: Int, outRows: Range<Int>, wo: Int, clear: Bool, into x: UnsafeMutablePointer<Float>) {
        let width = outRows.count * wo
        parallelFor(channels, grain: max(1, 4096 / max(width * kh * kw, 1))) { range in
            for c in range {
                let dst = x + c * h * w
                if clear { dst.initialize(repeating: 0, count: h * w) }
                for i in 0..<kh {
                    for j in 0..<kw {
                        let src = cols + ((c * kh + i) * kw + j) * width - outRows.lowerBound * wo
                        let xs = validRange(kernelOffset: j, size: w, out: wo, stride: s, padding: p)
                        if xs.isEmpty { continue }
                        for oy in outRows {
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

        /// Winograd pays off once a GEMM has enough tiles (2×2 outputs each) to amortise packing the
        /// transformed weights: from 32×32 outputs (16×16: [Cout, Cin]·[Cin, 64] GEMMs are slower than im2col).
        var useWinograd: Bool {
            kh == 3 && kw == 3 && stride == 1 && padding <= 2 && ((ho + 1) / 2) * ((wo + 1) / 2) >= 256
        }

        /// A 1×1, stride-1, unpadded convolution: a GEMM on the image as it is.
        var isPointwise: Bool { kh == 1 && kw == 1 && stride == 1 && padding == 0 }

        var dnnl: DNNL.ConvShape {
            DNNL.ConvShape(n: n, cin: cin, h: h, w: w, cout: cout, kh: kh, kw: kw, stride: stride, padding: padding)
        }
    }
}

extension Tape {
    /// F.conv2d(x, w, b, stride, padding). Saves x and w; a frozen w gets no gradient.
    public func conv2d(_ x: Var, _ w: Var, _ b: Var? = nil, stride: Int = 1, padding: Int = 0) -> Var {
        let xv = x.value, wv = w.value
        let inputs = b.map { [x, w, $0] } ?? [x, w]
        let frozen = !w.requiresGrad, f = Kernels.family
        let y = Conv2d.forward(xv, wv, b?.value, stride: stride, padding: padding, frozenWeight: frozen)
        return record(y, inputs: inputs) { g, need in
            let r = Kernels.with(f) {
                Conv2d.backward(g, x: xv, w: wv, stride: stride, padding: padding, wantX: need[0], wantW: need[1],
                                wantB: need.count > 2 && need[2], frozenWeight: frozen)
            }
            return [r.dX, r.dW, r.dB]
        }
    }
}

/// Winograd F(2×2, 3×3) for 3×3 stride-1 convolutions: 16 GEMMs of [Cout, Cin] · [Cin, tiles] do the
/// work of one [Cout, Cin·9] · [Cin·9, Ho·Wo] GEMM with 16/36 of its multiplications (Lavin & Gray 2015).
/// The transforms have entries 0, ±1 and ±½ only, so F(2×2, 3×3) stays as accurate in fp32 as im2col
/// (ConvTests check it against a Double direct convolution at 1e-4).
///
/// V[e][ci][t] = (Bᵀ d B)[e] for the 4×4 input patch d of output tile t, U[e][co][ci] = (G g Gᵀ)[e],
/// M[e] = U[e] · V[e], and each 2×2 output tile is Aᵀ M A.
enum Winograd {
    /// U [16, outC, inC] from w [outC, inC, 3, 3]. With `flipTransposed`, w is read as the kernel of the
    /// input gradient instead: [inC', outC', 3, 3] rotated 180°, i.e. U[e][ci][co] from w[co, ci, 2−i, 2−j].
    static func transformWeights(_ w: UnsafePointer<Float>, outC: Int, inC: Int, flipTransposed: Bool,
                                 into u: UnsafeMutablePointer<Float>) {
        let plane = outC * inC
        let block = 8, inCp = (inC + 15) / 16 * 16
        parallelFor((outC + block - 1) / block) { blocks in
            // taps[ob][t][c]: tap t of the kernel from input channel c to output channel o0 + ob, laid out
            // so the transform below runs 16 input channels at a time.
            let taps = UnsafeMutablePointer<Float>.allocate(capacity: block * 9 * inCp)
            taps.initialize(repeating: 0, count: block * 9 * inCp)
            defer { taps.deallocate() }
            for blk in blocks {
                let o0 = blk * block, o1 = min(outC, o0 + block)
                if flipTransposed {
                    // kernel (o, c) is w[c, o] rotated 180°: read w in its own order, 9·block floats per c
                    for c in 0..<inC {
                        let src = w + (c * outC + o0) * 9
                        for o in 0..<(o1 - o0) { for t in 0..<9 { taps[(o * 9 + t) * inCp + c] = src[o * 9 + 8 - t] } }
                    }
                } else {
                    for o in 0..<(o1 - o0) {
                        let src = w + (o0 + o) * inC * 9
                        for c in 0..<inC { for t in 0..<9 { taps[(o * 9 + t) * inCp + c] = src[c * 9 + t] } }
                    }
                }
                for o in 0..<(o1 - o0) {
                    let g = taps + o * 9 * inCp, dst = u + (o0 + o) * inC
                    var c = 0
                    while c < inC {
                        @inline(__always) func ld(_ t: Int) -> SIMD16<Float> {
                            UnsafeRawPointer(g + t * inCp + c).loadUnaligned(as: SIMD16<Float>.self)
                        }
                        let n = min(16, inC - c)
                        @inline(__always) func st(_ e: Int, _ v: SIMD16<Float>) {
                            let d = dst + e * plane + c
                            if n == 16 { UnsafeMutableRawPointer(d).storeBytes(of: v, as: SIMD16<Float>.self) }
                            else { for l in 0..<n { d[l] = v[l] } }
                        }
                        // rows of G·g (4×3), then each row times Gᵀ: [a, (a+b+c)/2, (a−b+c)/2, c]
                        for i in 0..<4 {
                            var r0: SIMD16<Float>, r1: SIMD16<Float>, r2: SIMD16<Float>
                            switch i {
                            case 0: r0 = ld(0); r1 = ld(1); r2 = ld(2)
                            case 1:
                                r0 = 0.5 * (ld(0) + ld(3) + ld(6)); r1 = 0.5 * (ld(1) + ld(4) + ld(7))
                                r2 = 0.5 * (ld(2) + ld(5) + ld(8))
                            case 2:
                                r0 = 0.5 * (ld(0) - ld(3) + ld(6)); r1 = 0.5 * (ld(1) - ld(4) + ld(7))
                                r2 = 0.5 * (ld(2) - ld(5) + ld(8))
                            default: r0 = ld(6); r1 = ld(7); r2 = ld(8)
                            }
                            st(4 * i, r0)
                            st(4 * i + 1, 0.5 * (r0 + r1 + r2))
                            st(4 * i + 2, 0.5 * (r0 - r1 + r2))
                            st(4 * i + 3, r2)
                        }
                        c += 16
                    }
                }
            }
        }
    }

    /// y [images, outC, ho, wo] = conv3×3(x [images, inC, h, w], padding p) (+ bias), ho = h + 2p − 2.
    static func convolve(_ x: UnsafePointer<Float>, images: Int, inC: Int, h: Int, w: Int, padding p: Int,
                         weights: UnsafePointer<Float>, flipTransposed: Bool, outC: Int, bias: UnsafePointer<Float>?,
                         into y: UnsafeMutablePointer<Float>) {
        let ho = h + 2 * p - 2, wo = w + 2 * p - 2
        let th = (ho + 1) / 2, tw = (wo + 1) / 2
        // Bands of tile rows: V and M stay a few MB while each GEMM keeps ≥ 256 columns.
        let budget = 2 << 20   // floats
        let bandRows = max(1, min(th, max((256 + tw - 1) / tw, budget / (16 * max(inC, outC) * tw))))
        let cap = bandRows * tw
        Scratch.with(16 * outC * inC + 16 * (inC + outC) * cap) { u in
            transformWeights(weights, outC: outC, inC: inC, flipTransposed: flipTransposed, into: u)
            let v = u + 16 * outC * inC, m = v + 16 * inC * cap
            for i in 0..<images {
                let xi = x + i * inC * h * w, yi = y + i * outC * ho * wo
                for ty0 in stride(from: 0, to: th, by: bandRows) {
                    let ty1 = min(th, ty0 + bandRows), tb = (ty1 - ty0) * tw
                    inputTransform(xi, inC: inC, h: h, w: w, padding: p, tileRows: ty0..<ty1, tw: tw, into: v, ld: tb)
                    for e in 0..<16 {
                        BLAS.sgemm(transA: false, transB: false, m: outC, n: tb, k: inC, a: u + e * outC * inC,
                                   lda: inC, b: v + e * inC * tb, ldb: tb, beta: 0, c: m + e * outC * tb, ldc: tb)
                    }
                    outputTransform(m, outC: outC, tileRows: ty0..<ty1, tw: tw, ld: tb, ho: ho, wo: wo, bias: bias, into: yi)
                }
            }
        }
    }

    /// V[e][c][(ty − ty₀)·tw + tx] for the tile rows in `tileRows`. Rows are combined first (Bᵀ·d, whole
    /// rows at once), then split into even and odd columns so the column step (·B) is contiguous in tx.
    static func inputTransform(_ x: UnsafePointer<Float>, inC: Int, h: Int, w: Int, padding p: Int,
                               tileRows: Range<Int>, tw: Int, into v: UnsafeMutablePointer<Float>, ld: Int) {
        let n = tw + 1   // even and odd columns of a padded row of width 2·tw + 2
        parallelFor(inC) { channels in
            // 4 input rows split into even/odd halves, then the 4 row combinations (same layout)
            let rows = UnsafeMutablePointer<Float>.allocate(capacity: 8 * n)
            let comb = UnsafeMutablePointer<Float>.allocate(capacity: 8 * n)
            defer { rows.deallocate(); comb.deallocate() }
            for c in channels {
                let src = x + c * h * w
                for ty in tileRows {
                    for r in 0..<4 {
                        let iy = 2 * ty - p + r
                        let ev = rows + 2 * r * n, od = ev + n
                        if iy < 0 || iy >= h {
                            ev.initialize(repeating: 0, count: 2 * n)
                            continue
                        }
                        let row = src + iy * w
                        // padded column q = 2k (+1) is input column q − p
                        for k in 0..<n {
                            let qe = 2 * k - p, qo = qe + 1
                            ev[k] = qe >= 0 && qe < w ? row[qe] : 0
                            od[k] = qo >= 0 && qo < w ? row[qo] : 0
                        }
                    }
                    // Bᵀ·d over rows: t0 = d0 − d2, t1 = d1 + d2, t2 = d2 − d1, t3 = d1 − d3
                    let d0 = rows, d1 = rows + 2 * n, d2 = rows + 4 * n, d3 = rows + 6 * n
                    let t0 = comb, t1 = comb + 2 * n, t2 = comb + 4 * n, t3 = comb + 6 * n
                    for k in 0..<(2 * n) {
                        t0[k] = d0[k] - d2[k]; t1[k] = d1[k] + d2[k]; t2[k] = d2[k] - d1[k]; t3[k] = d1[k] - d3[k]
                    }
                    let off = (ty - tileRows.lowerBound) * tw
                    for a in 0..<4 {
                        let ev = comb + 2 * a * n, od = ev + n
                        let o0 = v + ((4 * a) * inC + c) * ld + off
                        let o1 = v + ((4 * a + 1) * inC + c) * ld + off
                        let o2 = v + ((4 * a + 2) * inC + c) * ld + off
                        let o3 = v + ((4 * a + 3) * inC + c) * ld + off
                        // columns of tile tx: q0 = ev[tx], q1 = od[tx], q2 = ev[tx+1], q3 = od[tx+1]
                        for tx in 0..<tw {
                            let q0 = ev[tx], q1 = od[tx], q2 = ev[tx + 1], q3 = od[tx + 1]
                            o0[tx] = q0 - q2; o1[tx] = q1 + q2; o2[tx] = q2 - q1; o3[tx] = q1 - q3
                        }
                    }
                }
            }
        }
    }

    /// y[co, 2ty + a, 2tx + b] = (Aᵀ M A)[a, b] (+ bias[co]), clipped to ho × wo.
    static func outputTransform(_ m: UnsafePointer<Float>, outC: Int, tileRows: Range<Int>, tw: Int, ld: Int,
                                ho: Int, wo: Int, bias: UnsafePointer<Float>?, into y: UnsafeMutablePointer<Float>) {
        parallelFor(outC) { channels in
            let s = UnsafeMutablePointer<Float>.allocate(capacity: 4 * tw)   // y rows 0/1, even/odd columns
            defer { s.deallocate() }
            for co in channels {
                let b0 = bias?[co] ?? 0
                for ty in tileRows {
                    let off = (ty - tileRows.lowerBound) * tw
                    func row(_ e: Int) -> UnsafePointer<Float> { m + (e * outC + co) * ld + off }
                    let e00 = s, e01 = s + tw, e10 = s + 2 * tw, e11 = s + 3 * tw
                    // Aᵀ over rows: s0 = m0 + m1 + m2, s1 = m1 − m2 − m3; then the same over columns.
                    let m0 = (row(0), row(1), row(2), row(3)), m1 = (row(4), row(5), row(6), row(7))
                    let m2 = (row(8), row(9), row(10), row(11)), m3 = (row(12), row(13), row(14), row(15))
                    for tx in 0..<tw {
                        let s00 = m0.0[tx] + m1.0[tx] + m2.0[tx], s10 = m1.0[tx] - m2.0[tx] - m3.0[tx]
                        let s01 = m0.1[tx] + m1.1[tx] + m2.1[tx], s11 = m1.1[tx] - m2.1[tx] - m3.1[tx]
                        let s02 = m0.2[tx] + m1.2[tx] + m2.2[tx], s12 = m1.2[tx] - m2.2[tx] - m3.2[tx]
                        let s03 = m0.3[tx] + m1.3[tx] + m2.3[tx], s13 = m1.3[tx] - m2.3[tx] - m3.3[tx]
                        e00[tx] = s00 + s01 + s02 + b0; e01[tx] = s01 - s02 - s03 + b0
                        e10[tx] = s10 + s11 + s12 + b0; e11[tx] = s11 - s12 - s13 + b0
                    }
                    let out = y + co * ho * wo
                    for a in 0..<2 {
                        let oy = 2 * ty + a
                        if oy >= ho { break }
                        let dst = out + oy * wo, ev = a == 0 ? e00 : e10, od = a == 0 ? e01 : e11
                        let full = wo / 2
                        for tx in 0..<full { dst[2 * tx] = ev[tx]; dst[2 * tx + 1] = od[tx] }
                        if wo % 2 == 1 { dst[wo - 1] = ev[full] }
                    }
                }
            }
        }
    }
}
