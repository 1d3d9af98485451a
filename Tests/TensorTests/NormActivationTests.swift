import Tensor
import XCTest

/// Group norm, layer norm, SiLU / GELU / quick-GELU / GEGLU: golden values and gradients from PyTorch
/// (Tests/Fixtures/ops_norm_act.py), finite differences, and a Double reference at sizes that cross the
/// kernels' SIMD blocks.
final class NormActivationTests: XCTestCase {

    /// Runs `op` on a tape with every listed fixture input trainable, seeds backward with the fixture's
    /// grad_output, and compares the output and every input gradient with PyTorch's.
    private func checkGolden(_ name: String, inputs: [String], outAtol: Float, outRtol: Float,
                             gradAtol: Float, gradRtol: Float, file: StaticString = #filePath, line: UInt = #line,
                             _ op: (Golden, Tape, [Var]) -> Var) throws {
        let golden = try Golden(name)
        let vars = try inputs.map { Var(try golden.input($0), requiresGrad: true) }
        let tape = Tape()
        let out = op(golden, tape, vars)
        assertClose(out.value, try golden.output(), atol: outAtol, rtol: outRtol, "\(name): output", file: file, line: line)
        let grads = tape.backward(from: out, seed: try golden.gradOutput())
        for (k, v) in zip(inputs, vars) {
            guard let g = grads[v] else { XCTFail("\(name): no gradient for \(k)", file: file, line: line); continue }
            assertClose(g, try golden.grad(k), atol: gradAtol, rtol: gradRtol, "\(name): grad \(k)", file: file, line: line)
        }
    }

    // MARK: - group norm vs PyTorch

    func testGroupNormAffineMatchesTorch() throws {
        // F.group_norm(x, 32, weight, bias, 1e-5), x [2, 64, 5, 7]
        try checkGolden("groupnorm_c64_affine", inputs: ["x", "weight", "bias"],
                        outAtol: 2e-5, outRtol: 1e-5, gradAtol: 5e-5, gradRtol: 1e-4) { g, tape, v in
            tape.groupNorm(v[0], groups: g.int("groups"), weight: v[1], bias: v[2], eps: g.float("eps"))
        }
    }

    func testGroupNormWithoutAffineMatchesTorch() throws {
        // F.group_norm(x, 32, None, None, 1e-6), x [2, 96, 5, 7]
        try checkGolden("groupnorm_c96_plain", inputs: ["x"],
                        outAtol: 2e-5, outRtol: 1e-5, gradAtol: 5e-5, gradRtol: 1e-4) { g, tape, v in
            tape.groupNorm(v[0], groups: g.int("groups"), weight: nil, bias: nil, eps: g.float("eps"))
        }
    }

    func testGroupNormLargeOffsetMatchesTorch() throws {
        // F.group_norm(x, 32, weight, bias, 1e-6), x = 50 + N(0, 1) [2, 64, 3, 3]
        try checkGolden("groupnorm_offset", inputs: ["x", "weight", "bias"],
                        outAtol: 3e-5, outRtol: 1e-5, gradAtol: 1e-4, gradRtol: 1e-4) { g, tape, v in
            tape.groupNorm(v[0], groups: g.int("groups"), weight: v[1], bias: v[2], eps: g.float("eps"))
        }
    }

    func testGroupNormWithoutSpatialDimsMatchesTorch() throws {
        // F.group_norm(x, 32, weight, bias, 1e-5), x [4, 64]
        try checkGolden("groupnorm_nospatial", inputs: ["x", "weight", "bias"],
                        outAtol: 2e-5, outRtol: 1e-5, gradAtol: 5e-5, gradRtol: 1e-4) { g, tape, v in
            tape.groupNorm(v[0], groups: g.int("groups"), weight: v[1], bias: v[2], eps: g.float("eps"))
        }
    }

    func testGroupNormFrozenAffineGetsNoGradient() throws {
        // F.group_norm(x, 32, weight, bias, 1e-5), x [2, 64, 5, 7]
        let g = try Golden("groupnorm_c64_affine")
        let x = Var(try g.input("x"), requiresGrad: true)
        let w = Var(try g.input("weight")), b = Var(try g.input("bias"))
        let tape = Tape()
        let y = tape.groupNorm(x, groups: 32, weight: w, bias: b, eps: g.float("eps"))
        let grads = tape.backward(from: y, seed: try g.gradOutput())
        XCTAssertNil(grads[w]); XCTAssertNil(grads[b])
        XCTAssertEqual(grads.count, 1)
        assertClose(grads[x]!, try g.grad("x"), atol: 5e-5, rtol: 1e-4, "frozen-affine dX")

        // Direct API: each gradient only when asked.
        let f = GroupNorm.forward(x.value, groups: 32, weight: w.value, bias: b.value, eps: g.float("eps"))
        XCTAssertEqual(f.mean.shape, [2, 32]); XCTAssertEqual(f.rstd.shape, [2, 32])
        let onlyW = GroupNorm.backward(try g.gradOutput(), x: x.value, mean: f.mean, rstd: f.rstd, groups: 32,
                                       weight: w.value, wantX: false, wantWeight: true, wantBias: false)
        XCTAssertNil(onlyW.dX); XCTAssertNil(onlyW.dBias)
        assertClose(onlyW.dWeight!, try g.grad("weight"), atol: 5e-5, rtol: 1e-4, "dWeight alone")
        let onlyB = GroupNorm.backward(try g.gradOutput(), x: x.value, mean: f.mean, rstd: f.rstd, groups: 32,
                                       weight: w.value, wantX: false, wantWeight: false, wantBias: true)
        XCTAssertNil(onlyB.dX); XCTAssertNil(onlyB.dWeight)
        assertClose(onlyB.dBias!, try g.grad("bias"), atol: 5e-5, rtol: 1e-4, "dBias alone")
    }

    // MARK: - layer norm vs PyTorch

    func testLayerNormAffineMatchesTorch() throws {
        // F.layer_norm(x, (48,), weight, bias, 1e-5), x [77, 48]
        try checkGolden("layernorm_affine", inputs: ["x", "weight", "bias"],
                        outAtol: 2e-5, outRtol: 1e-5, gradAtol: 5e-5, gradRtol: 1e-4) { g, tape, v in
            tape.layerNorm(v[0], weight: v[1], bias: v[2], eps: g.float("eps"))
        }
    }

    func testLayerNormWithoutAffineMatchesTorch() throws {
        // F.layer_norm(x, (48,), None, None, 1e-5), x [2, 3, 48]
        try checkGolden("layernorm_plain", inputs: ["x"],
                        outAtol: 2e-5, outRtol: 1e-5, gradAtol: 5e-5, gradRtol: 1e-4) { g, tape, v in
            tape.layerNorm(v[0], weight: nil, bias: nil, eps: g.float("eps"))
        }
    }

    func testLayerNormLargeOffsetMatchesTorch() throws {
        // F.layer_norm(x, (48,), weight, bias, 1e-5), x = 50 + N(0, 1) [6, 48]
        try checkGolden("layernorm_offset", inputs: ["x", "weight", "bias"],
                        outAtol: 3e-5, outRtol: 1e-5, gradAtol: 1e-4, gradRtol: 1e-4) { g, tape, v in
            tape.layerNorm(v[0], weight: v[1], bias: v[2], eps: g.float("eps"))
        }
    }

    func testLayerNormFrozenAffineGetsNoGradient() throws {
        // F.layer_norm(x, (48,), weight, bias, 1e-5), x [77, 48]
        let g = try Golden("layernorm_affine")
        let x = Var(try g.input("x"), requiresGrad: true)
        let w = Var(try g.input("weight")), b = Var(try g.input("bias"), requiresGrad: true)
        let tape = Tape()
        let y = tape.layerNorm(x, weight: w, bias: b, eps: g.float("eps"))
        let grads = tape.backward(from: y, seed: try g.gradOutput())
        XCTAssertNil(grads[w])
        assertClose(grads[x]!, try g.grad("x"), atol: 5e-5, rtol: 1e-4, "frozen-weight dX")
        assertClose(grads[b]!, try g.grad("bias"), atol: 5e-5, rtol: 1e-4, "frozen-weight dBias")

        let f = LayerNorm.forward(x.value, weight: w.value, bias: b.value, eps: g.float("eps"))
        let onlyW = LayerNorm.backward(try g.gradOutput(), x: x.value, mean: f.mean, rstd: f.rstd, weight: w.value,
                                       wantX: false, wantWeight: true, wantBias: false)
        XCTAssertNil(onlyW.dX); XCTAssertNil(onlyW.dBias)
        assertClose(onlyW.dWeight!, try g.grad("weight"), atol: 5e-5, rtol: 1e-4, "dWeight alone")
    }

    // MARK: - activations vs PyTorch

    func testSiLUMatchesTorch() throws {
        // F.silu(x), x ~ 4·N(0, 1) [5, 37] with ±12, ±30 extremes
        try checkGolden("silu", inputs: ["x"], outAtol: 1e-5, outRtol: 1e-5, gradAtol: 1e-5, gradRtol: 1e-4) { _, tape, v in
            tape.silu(v[0])
        }
    }

    func testGELUMatchesTorch() throws {
        // F.gelu(x), x ~ 4·N(0, 1) [5, 37] with ±12, ±30 extremes
        try checkGolden("gelu", inputs: ["x"], outAtol: 1e-5, outRtol: 1e-5, gradAtol: 1e-5, gradRtol: 1e-4) { _, tape, v in
            tape.gelu(v[0])
        }
    }

    func testTanhGELUMatchesTorch() throws {
        // F.gelu(x, approximate="tanh"), x ~ 4·N(0, 1) [5, 37] with ±12, ±30 extremes
        try checkGolden("gelu_tanh", inputs: ["x"], outAtol: 1e-5, outRtol: 1e-5, gradAtol: 1e-5, gradRtol: 1e-4) { _, tape, v in
            tape.gelu(v[0], approximate: true)
        }
    }

    func testQuickGELUMatchesTorch() throws {
        // x * torch.sigmoid(1.702 * x), x ~ 4·N(0, 1) [5, 37] with ±12, ±30 extremes
        try checkGolden("quickgelu", inputs: ["x"], outAtol: 1e-5, outRtol: 1e-5, gradAtol: 1e-5, gradRtol: 1e-4) { _, tape, v in
            tape.quickGELU(v[0])
        }
    }

    func testGEGLUMatchesTorch() throws {
        // hidden, gate = x.chunk(2, dim=-1); hidden * F.gelu(gate), x [2, 5, 48]
        try checkGolden("geglu", inputs: ["x"], outAtol: 1e-5, outRtol: 1e-5, gradAtol: 1e-5, gradRtol: 1e-4) { _, tape, v in
            tape.geglu(v[0])
        }
    }

    // MARK: - finite differences

    func testGroupNormFiniteDifferences() {
        let x = Tensor(randomNormal: [2, 64, 3, 2], std: 1.5, seed: 11)
        let w = Tensor(randomUniform: [64], in: 0.5...1.5, seed: 12), b = Tensor(randomNormal: [64], seed: 13)
        checkGradients([x, w, b], "group norm affine") { tape, v in
            tape.groupNorm(v[0], groups: 32, weight: v[1], bias: v[2], eps: 1e-5)
        }
        checkGradients([x, w, b], check: [true, false, false], "group norm, frozen affine") { tape, v in
            tape.groupNorm(v[0], groups: 32, weight: v[1], bias: v[2], eps: 1e-6)
        }
        checkGradients([x, w, b], check: [false, true, true], "group norm, affine only") { tape, v in
            tape.groupNorm(v[0], groups: 32, weight: v[1], bias: v[2], eps: 1e-6)
        }
        checkGradients([Tensor(randomNormal: [3, 64], std: 2, seed: 14), w, b], "group norm [N, C]") { tape, v in
            tape.groupNorm(v[0], groups: 16, weight: v[1], bias: v[2], eps: 1e-5)
        }
    }

    func testLayerNormFiniteDifferences() {
        let x = Tensor(randomNormal: [5, 24], std: 1.5, seed: 21)
        let w = Tensor(randomUniform: [24], in: 0.5...1.5, seed: 22), b = Tensor(randomNormal: [24], seed: 23)
        checkGradients([x, w, b], "layer norm affine") { tape, v in
            tape.layerNorm(v[0], weight: v[1], bias: v[2], eps: 1e-5)
        }
        checkGradients([x], "layer norm plain") { tape, v in
            tape.layerNorm(v[0], weight: nil, bias: nil, eps: 1e-5)
        }
    }

    func testActivationFiniteDifferences() {
        let x = Tensor(randomNormal: [4, 29], std: 2.5, seed: 31)
        checkGradients([x], "silu") { tape, v in tape.silu(v[0]) }
        checkGradients([x], "gelu") { tape, v in tape.gelu(v[0]) }
        checkGradients([x], "gelu tanh") { tape, v in tape.gelu(v[0], approximate: true) }
        checkGradients([x], "quick gelu") { tape, v in tape.quickGELU(v[0]) }
        checkGradients([Tensor(randomNormal: [3, 2 * 17], std: 2, seed: 32)], "geglu") { tape, v in tape.geglu(v[0]) }
    }

    // MARK: - large sizes vs a Double reference (the SIMD blocks, their tails and the thread split)

    func testGroupNormAtLargeSizeMatchesDoubleReference() {
        // 32 groups of 4 channels × 37·41 = 6068 elements per group: several 4096-element blocks plus a tail.
        let n = 2, c = 128, s = 37 * 41, groups = 32, cg = c / groups, eps: Float = 1e-6
        let x = Tensor(randomNormal: [n, c, 37, 41], std: 2, seed: 41)
        let xs = x.scalars.map { $0 + 20 }
        let xo = Tensor(shape: x.shape, xs)
        let w = Tensor(randomUniform: [c], in: 0.5...1.5, seed: 42), b = Tensor(randomNormal: [c], seed: 43)
        let dy = Tensor(randomNormal: x.shape, seed: 44)
        let f = GroupNorm.forward(xo, groups: groups, weight: w, bias: b, eps: eps)
        let d = GroupNorm.backward(dy, x: xo, mean: f.mean, rstd: f.rstd, groups: groups, weight: w,
                                   wantX: true, wantWeight: true, wantBias: true)
        let ws = w.scalars, bs = b.scalars, gs = dy.scalars
        var y = [Float](repeating: 0, count: xs.count), dx = y
        var dw = [Double](repeating: 0, count: c), db = dw
        let dCount = Double(cg * s)
        for nn in 0..<n {
            for g in 0..<groups {
                let base = (nn * c + g * cg) * s, range = base..<(base + cg * s)
                let m = range.reduce(0.0) { $0 + Double(xs[$1]) } / dCount
                let v = range.reduce(0.0) { $0 + (Double(xs[$1]) - m) * (Double(xs[$1]) - m) } / dCount
                let rs = 1 / (v + Double(eps)).squareRoot()
                var sgx = 0.0, sg = 0.0
                for i in range {
                    let ch = i / s % c, xhat = (Double(xs[i]) - m) * rs
                    y[i] = Float(xhat * Double(ws[ch]) + Double(bs[ch]))
                    sgx += Double(ws[ch]) * Double(gs[i]) * xhat; sg += Double(ws[ch]) * Double(gs[i])
                    dw[ch] += Double(gs[i]) * xhat; db[ch] += Double(gs[i])
                }
                for i in range {
                    let ch = i / s % c, xhat = (Double(xs[i]) - m) * rs
                    dx[i] = Float(rs * (Double(ws[ch]) * Double(gs[i]) - sg / dCount - xhat * sgx / dCount))
                }
            }
        }
        assertClose(f.y, Tensor(shape: x.shape, y), atol: 2e-5, rtol: 1e-5, "large group norm y")
        assertClose(d.dX!, Tensor(shape: x.shape, dx), atol: 2e-5, rtol: 1e-4, "large group norm dX")
        assertClose(d.dWeight!, Tensor(shape: [c], dw.map { Float($0) }), atol: 1e-3, rtol: 1e-4, "large group norm dW")
        assertClose(d.dBias!, Tensor(shape: [c], db.map { Float($0) }), atol: 1e-3, rtol: 1e-4, "large group norm dB")
    }

    func testLayerNormAtLargeSizeMatchesDoubleReference() {
        // 4500 > 4096: each row's statistics merge two blocks.
        let rows = 13, c = 4500, eps: Float = 1e-5
        let x = Tensor(randomNormal: [rows, c], std: 2, seed: 51)
        let xs = x.scalars.map { $0 - 30 }
        let xo = Tensor(shape: x.shape, xs)
        let w = Tensor(randomUniform: [c], in: 0.5...1.5, seed: 52), b = Tensor(randomNormal: [c], seed: 53)
        let dy = Tensor(randomNormal: x.shape, seed: 54)
        let f = LayerNorm.forward(xo, weight: w, bias: b, eps: eps)
        let d = LayerNorm.backward(dy, x: xo, mean: f.mean, rstd: f.rstd, weight: w, wantX: true, wantWeight: true, wantBias: true)
        let ws = w.scalars, bs = b.scalars, gs = dy.scalars
        var y = [Float](repeating: 0, count: xs.count), dx = y
        var dw = [Double](repeating: 0, count: c), db = dw
        for r in 0..<rows {
            let range = (r * c)..<((r + 1) * c)
            let m = range.reduce(0.0) { $0 + Double(xs[$1]) } / Double(c)
            let v = range.reduce(0.0) { $0 + (Double(xs[$1]) - m) * (Double(xs[$1]) - m) } / Double(c)
            let rs = 1 / (v + Double(eps)).squareRoot()
            var sgx = 0.0, sg = 0.0
            for i in range {
                let j = i - r * c, xhat = (Double(xs[i]) - m) * rs
                y[i] = Float(xhat * Double(ws[j]) + Double(bs[j]))
                sgx += Double(ws[j]) * Double(gs[i]) * xhat; sg += Double(ws[j]) * Double(gs[i])
                dw[j] += Double(gs[i]) * xhat; db[j] += Double(gs[i])
            }
            for i in range {
                let j = i - r * c, xhat = (Double(xs[i]) - m) * rs
                dx[i] = Float(rs * (Double(ws[j]) * Double(gs[i]) - sg / Double(c) - xhat * sgx / Double(c)))
            }
        }
        assertClose(f.y, Tensor(shape: x.shape, y), atol: 2e-5, rtol: 1e-5, "large layer norm y")
        assertClose(d.dX!, Tensor(shape: x.shape, dx), atol: 2e-5, rtol: 1e-4, "large layer norm dX")
        assertClose(d.dWeight!, Tensor(shape: [c], dw.map { Float($0) }), atol: 1e-4, rtol: 1e-4, "large layer norm dW")
        assertClose(d.dBias!, Tensor(shape: [c], db.map { Float($0) }), atol: 1e-4, rtol: 1e-4, "large layer norm dB")
    }

    func testNarrowInputsAreWidened() {
        // fp16 storage goes through the same fp32 kernels as its widened copy.
        let x = Tensor(randomNormal: [2, 32, 3, 3], seed: 61)
        let h = x.converted(to: .f16)
        let viaHalf = GroupNorm.forward(h, groups: 8, weight: nil, bias: nil, eps: 1e-5).y
        let viaWide = GroupNorm.forward(h.fp32(), groups: 8, weight: nil, bias: nil, eps: 1e-5).y
        XCTAssertEqual(viaHalf.scalars, viaWide.scalars)
        XCTAssertEqual(Activation.forward(h, .silu).scalars, Activation.forward(h.fp32(), .silu).scalars)
    }
}
