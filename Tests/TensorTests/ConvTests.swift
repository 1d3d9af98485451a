import Tensor
import XCTest

/// Conv2d and nearest-2× upsampling against PyTorch (fixtures from Tests/Fixtures/ops_conv.py) and
/// against central differences.
final class ConvTests: XCTestCase {
    // fp32 sums of ≤ 54 products of O(1) values: a few ulps of the result, far below 1e-4.
    let atol: Float = 1e-4, rtol: Float = 1e-4

    /// Runs a fixture through the tape (x, w, b all trainable) and compares output and all gradients.
    func checkGolden(_ name: String, bias: Bool, file: StaticString = #filePath, line: UInt = #line) throws {
        let g = try Golden(name)
        let stride = g.int("stride"), padding = g.int("padding")
        let x = Var(try g.input("x"), requiresGrad: true), w = Var(try g.input("w"), requiresGrad: true)
        let b = bias ? Var(try g.input("b"), requiresGrad: true) : nil
        let tape = Tape()
        let y = tape.conv2d(x, w, b, stride: stride, padding: padding)
        assertClose(y.value, try g.output(), atol: atol, rtol: rtol, "\(name) forward", file: file, line: line)
        let grads = tape.backward(from: y, seed: try g.gradOutput())
        XCTAssertEqual(grads.count, bias ? 3 : 2, "\(name): gradients", file: file, line: line)
        assertClose(grads[x]!, try g.grad("x"), atol: atol, rtol: rtol, "\(name) dX", file: file, line: line)
        assertClose(grads[w]!, try g.grad("w"), atol: atol, rtol: rtol, "\(name) dW", file: file, line: line)
        if let b = b { assertClose(grads[b]!, try g.grad("b"), atol: atol, rtol: rtol, "\(name) dB", file: file, line: line) }
    }

    // F.conv2d(x, w, b, stride=1, padding=0), x [2,6,9,7], w [10,6,1,1], b [10]
    func testPointwiseBias() throws { try checkGolden("conv_k1s1p0_bias", bias: true) }
    // F.conv2d(x, w, None, stride=1, padding=0), x [2,6,9,7], w [10,6,1,1]
    func testPointwiseNoBias() throws { try checkGolden("conv_k1s1p0_nobias", bias: false) }
    // F.conv2d(x, w, b, stride=1, padding=1), x [2,6,9,7], w [10,6,3,3], b [10]
    func test3x3Stride1Pad1Bias() throws { try checkGolden("conv_k3s1p1_bias", bias: true) }
    // F.conv2d(x, w, None, stride=1, padding=1), x [2,6,9,7], w [10,6,3,3]
    func test3x3Stride1Pad1NoBias() throws { try checkGolden("conv_k3s1p1_nobias", bias: false) }
    // F.conv2d(x, w, b, stride=2, padding=1), x [2,6,9,7], w [10,6,3,3], b [10]  (UNet downsample)
    func test3x3Stride2Pad1Bias() throws { try checkGolden("conv_k3s2p1_bias", bias: true) }
    // F.conv2d(x, w, None, stride=2, padding=1), x [2,6,9,7], w [10,6,3,3]
    func test3x3Stride2Pad1NoBias() throws { try checkGolden("conv_k3s2p1_nobias", bias: false) }
    // F.conv2d(x, w, b, stride=2, padding=0), x [2,6,9,7], w [10,6,3,3], b [10]  (VAE downsample after F.pad)
    func test3x3Stride2Pad0Bias() throws { try checkGolden("conv_k3s2p0_bias", bias: true) }
    // F.conv2d(x, w, None, stride=2, padding=0), x [2,6,9,7], w [10,6,3,3]
    func test3x3Stride2Pad0NoBias() throws { try checkGolden("conv_k3s2p0_nobias", bias: false) }
    // F.conv2d(x, w, b, stride=1, padding=0), x [2,6,9,7], w [10,6,3,3], b [10]
    func test3x3Stride1Pad0Bias() throws { try checkGolden("conv_k3s1p0_bias", bias: true) }
    // F.conv2d(x, w, b, stride=2, padding=0), x [2,6,9,7], w [10,6,1,1], b [10]
    func testPointwiseStride2Bias() throws { try checkGolden("conv_k1s2p0_bias", bias: true) }

    /// A frozen base weight (LoRA training): only dX (and dB) come back, and they match PyTorch.
    // F.conv2d(x, w, b, stride=2, padding=1), x [2,6,9,7], w [10,6,3,3], b [10]
    func testFrozenWeightGetsNoGradient() throws {
        for name in ["conv_k3s2p1_bias", "conv_k3s1p1_bias", "conv_k1s1p0_bias"] {
            let g = try Golden(name)
            let x = Var(try g.input("x"), requiresGrad: true), w = Var(try g.input("w"))
            let b = Var(try g.input("b"), requiresGrad: true)
            let tape = Tape()
            let y = tape.conv2d(x, w, b, stride: g.int("stride"), padding: g.int("padding"))
            let grads = tape.backward(from: y, seed: try g.gradOutput())
            XCTAssertNil(grads[w], "\(name): frozen weight got a gradient")
            XCTAssertEqual(grads.count, 2, "\(name): gradients")
            assertClose(grads[x]!, try g.grad("x"), atol: atol, rtol: rtol, "\(name) frozen dX")
            assertClose(grads[b]!, try g.grad("b"), atol: atol, rtol: rtol, "\(name) frozen dB")

            let r = Conv2d.backward(try g.gradOutput(), x: x.value, w: w.value, stride: g.int("stride"),
                                    padding: g.int("padding"), wantX: true, wantW: false, wantB: false)
            XCTAssertNotNil(r.dX); XCTAssertNil(r.dW); XCTAssertNil(r.dB)
        }
    }

    /// A weight stored in fp16 is widened per call; its values were rounded to fp16 by the fixture, so
    /// the result equals PyTorch's fp32 convolution on them.
    // F.conv2d(x, w, b, stride=1, padding=1), x [1,5,6,8], w [4,5,3,3] (fp16-representable), b [4]
    func testHalfPrecisionWeight() throws {
        let g = try Golden("conv_k3s1p1_f16w")
        for dtype in [DType.f16] {
            let w16 = try g.input("w").converted(to: dtype)
            XCTAssertEqual(w16.dtype, dtype)
            let x = Var(try g.input("x"), requiresGrad: true), w = Var(w16), b = Var(try g.input("b"))
            let tape = Tape()
            let y = tape.conv2d(x, w, b, stride: 1, padding: 1)
            assertClose(y.value, try g.output(), atol: atol, rtol: rtol, "fp16 weight forward")
            let grads = tape.backward(from: y, seed: try g.gradOutput())
            assertClose(grads[x]!, try g.grad("x"), atol: atol, rtol: rtol, "fp16 weight dX")
            let r = Conv2d.backward(try g.gradOutput(), x: x.value, w: w16, stride: 1, padding: 1,
                                    wantX: false, wantW: true, wantB: false)
            assertClose(r.dW!, try g.grad("w"), atol: atol, rtol: rtol, "fp16 weight dW")
        }
    }

    /// Central differences for x, w and b over every supported kernel/stride/padding, batch 2, odd sizes.
    func testFiniteDifferences() {
        for (k, s, p) in [(1, 1, 0), (3, 1, 1), (3, 2, 1), (3, 2, 0), (3, 1, 0), (1, 2, 0), (1, 1, 1)] {
            let x = Tensor(randomNormal: [2, 3, 7, 6], seed: 1)
            let w = Tensor(randomNormal: [5, 3, k, k], std: 0.4, seed: 2)
            let b = Tensor(randomNormal: [5], seed: 3)
            checkGradients([x, w, b], eps: 1e-2, atol: 2e-3, rtol: 1e-3, "conv k\(k) s\(s) p\(p)") { tape, v in
                tape.conv2d(v[0], v[1], v[2], stride: s, padding: p)
            }
            // frozen weight, no bias
            checkGradients([x, w], check: [true, false], eps: 1e-2, atol: 2e-3, rtol: 1e-3,
                           "conv k\(k) s\(s) p\(p) frozen w") { tape, v in
                tape.conv2d(v[0], v[1], stride: s, padding: p)
            }
        }
    }

    /// Against a direct (seven-loop) convolution in Double, at sizes the tiny fixtures do not reach:
    /// 19 → 23 channels split over threads, and ≥ 32×32 stride-1 3×3 outputs, which take the Winograd
    /// path (forward and dX; odd sizes, so the last 2×2 tiles are cut).
    func testAgainstDirectConvolution() {
        let cases = [(3, 1, 1, 19, 23, 17, 12), (3, 2, 1, 19, 23, 17, 12), (3, 2, 0, 19, 23, 17, 12),
                     (1, 1, 0, 19, 23, 17, 12), (3, 1, 1, 5, 7, 33, 31), (3, 1, 0, 6, 4, 35, 34)]
        for (k, s, p, cin, cout, h, wd) in cases {
            let n = 2
            let x = Tensor(randomNormal: [n, cin, h, wd], seed: 11)
            let w = Tensor(randomNormal: [cout, cin, k, k], std: 0.2, seed: 12)
            let b = Tensor(randomNormal: [cout], seed: 13)
            let y = Conv2d.forward(x, w, b, stride: s, padding: p)
            let ho = (h + 2 * p - k) / s + 1, wo = (wd + 2 * p - k) / s + 1
            XCTAssertEqual(y.shape, [n, cout, ho, wo])
            let dY = Tensor(randomNormal: y.shape, seed: 14)
            let r = Conv2d.backward(dY, x: x, w: w, stride: s, padding: p, wantX: true, wantW: true, wantB: true)
            let xs = x.scalars, ws = w.scalars, bs = b.scalars, gs = dY.scalars
            var ref = [Double](repeating: 0, count: y.count)
            var dx = [Double](repeating: 0, count: x.count), dw = [Double](repeating: 0, count: w.count)
            var db = [Double](repeating: 0, count: cout)
            for i in 0..<n { for o in 0..<cout { for oy in 0..<ho { for ox in 0..<wo {
                let yi = ((i * cout + o) * ho + oy) * wo + ox
                var acc = Double(bs[o])
                db[o] += Double(gs[yi])
                for c in 0..<cin { for ky in 0..<k { for kx in 0..<k {
                    let iy = oy * s + ky - p, ix = ox * s + kx - p
                    guard iy >= 0, iy < h, ix >= 0, ix < wd else { continue }
                    let xi = ((i * cin + c) * h + iy) * wd + ix, wi = ((o * cin + c) * k + ky) * k + kx
                    acc += Double(xs[xi]) * Double(ws[wi])
                    dx[xi] += Double(ws[wi]) * Double(gs[yi])
                    dw[wi] += Double(xs[xi]) * Double(gs[yi])
                }}}
                ref[yi] = acc
            }}}}
            let what = "direct k\(k) s\(s) p\(p) \(cin)→\(cout) \(h)×\(wd)"
            assertClose(y, Tensor(shape: y.shape, ref.map(Float.init)), atol: 1e-4, rtol: 1e-4, "\(what) forward")
            assertClose(r.dX!, Tensor(shape: x.shape, dx.map(Float.init)), atol: 1e-4, rtol: 1e-4, "\(what) dX")
            // dW and dB sum over up to 2·35·34 positions
            assertClose(r.dW!, Tensor(shape: w.shape, dw.map(Float.init)), atol: 1e-3, rtol: 1e-4, "\(what) dW")
            assertClose(r.dB!, Tensor(shape: [cout], db.map(Float.init)), atol: 1e-3, rtol: 1e-4, "\(what) dB")
        }
    }

    /// Channels [from, from + count) of a [A, C, ...] tensor.
    func channels(_ t: Tensor, _ from: Int, _ count: Int) -> Tensor {
        let a = t.shape[0], c = t.shape[1], inner = t.shape.dropFirst(2).reduce(1, *)
        let v = t.scalars
        var out = [Float](); out.reserveCapacity(a * count * inner)
        for i in 0..<a { out += v[((i * c + from) * inner)..<((i * c + from + count) * inner)] }
        var shape = t.shape; shape[1] = count
        return Tensor(shape: shape, out)
    }

    /// 512 input channels take the banded paths (Winograd tile-row bands, im2col/col2im output-row bands)
    /// that small convolutions do not. A convolution is a sum over input channels, so its output must
    /// equal the sum over 64-channel slices (each small enough to run unbanded, the path checked against
    /// the direct loop above), and its dX and dW restricted to a slice must equal the slice's own.
    func testBandedPathsMatchChannelSlices() {
        for (s, h, wd) in [(1, 40, 34), (2, 48, 90)] {
            let cin = 512, cout = 8, slice = 64
            let x = Tensor(randomNormal: [1, cin, h, wd], seed: 31)
            let w = Tensor(randomNormal: [cout, cin, 3, 3], std: 0.05, seed: 32)
            let y = Conv2d.forward(x, w, nil, stride: s, padding: 1)
            let dY = Tensor(randomNormal: y.shape, seed: 33)
            let full = Conv2d.backward(dY, x: x, w: w, stride: s, padding: 1, wantX: true, wantW: true, wantB: false)
            var sum = [Float](repeating: 0, count: y.count)
            for c0 in stride(from: 0, to: cin, by: slice) {
                let xs = channels(x, c0, slice), ws = channels(w, c0, slice)
                let part = Conv2d.forward(xs, ws, nil, stride: s, padding: 1).scalars
                for i in 0..<sum.count { sum[i] += part[i] }
                let r = Conv2d.backward(dY, x: xs, w: ws, stride: s, padding: 1, wantX: true, wantW: true, wantB: false)
                assertClose(channels(full.dX!, c0, slice), r.dX!, atol: 1e-4, rtol: 1e-4, "s\(s) dX channels \(c0)..")
                assertClose(channels(full.dW!, c0, slice), r.dW!, atol: 1e-3, rtol: 1e-4, "s\(s) dW channels \(c0)..")
            }
            // sums of 4608 products of magnitude ~0.05: the two summation orders differ by ~1e-5
            assertClose(y, Tensor(shape: y.shape, sum), atol: 2e-4, rtol: 1e-4, "s\(s) forward = Σ slices")
        }
    }

    // F.interpolate(x, scale_factor=2, mode="nearest"), x [2,3,5,7]
    func testUpsampleGolden() throws {
        let g = try Golden("upsample_nearest2x")
        let x = Var(try g.input("x"), requiresGrad: true)
        let tape = Tape()
        let y = tape.upsampleNearest2x(x)
        // pure copies and sums of four: exact up to the order of two additions
        assertClose(y.value, try g.output(), atol: 0, rtol: 0, "upsample forward")
        let grads = tape.backward(from: y, seed: try g.gradOutput())
        assertClose(grads[x]!, try g.grad("x"), atol: 1e-6, rtol: 1e-6, "upsample dX")
    }

    func testUpsampleFiniteDifferences() {
        let x = Tensor(randomNormal: [2, 3, 5, 4], seed: 21)
        checkGradients([x], eps: 1e-2, atol: 1e-3, rtol: 1e-3, "upsample nearest 2x") { tape, v in
            tape.upsampleNearest2x(v[0])
        }
    }
}
