@testable import Tensor
import XCTest

/// The bf16 kernel family (oneDNN) against PyTorch's CPU autocast: fixtures from Tests/Fixtures/ops_bf16.py
/// (`python3 Tests/Fixtures/make_op_fixtures.py ops_bf16`, PyTorch 2.15 CPU), and against the fp32 family.
///
/// Tolerances follow from bf16's 8-bit significand: both sides multiply the same bf16-rounded inputs and accumulate
/// in fp32; PyTorch then rounds its result to bf16 (half an ulp, 2⁻⁸ relative) and lora-dist keeps fp32. So an
/// element may differ by one bf16 ulp (2⁻⁷ relative), plus one ulp at the tensor's rms for elements that cancel to
/// near zero: autocast rounds the bias to bf16 too, lora-dist adds it in fp32 (1×1 case, element 1502: sum −2.0503,
/// bias 2.1176 → PyTorch 0.0747 with the bias rounded to 2.125, lora-dist 0.0674, fp32 0.0644).
/// A composite (a LoRA linear: base + scale·up(down(x))) rounds three times in PyTorch: twice those bounds.
final class BF16KernelTests: XCTestCase {
    override func setUpWithError() throws {
        if let why = Kernels.bf16UnavailableReason { throw XCTSkip("bf16 family unavailable here: \(why)") }
    }

    private func rms(_ t: Tensor) -> Float {
        let s = t.scalars
        return (s.reduce(0) { $0 + $1 * $1 } / Float(max(s.count, 1))).squareRoot()
    }

    /// ‖a − b‖ / ‖b‖.
    private func relativeError(_ a: Tensor, _ b: Tensor) -> Float {
        let x = a.scalars, y = b.scalars
        var num: Float = 0, den: Float = 0
        for i in 0..<x.count { num += (x[i] - y[i]) * (x[i] - y[i]); den += y[i] * y[i] }
        return (num / max(den, .leastNormalMagnitude)).squareRoot()
    }

    private func close(_ a: Tensor, _ ref: Tensor, ulps: Float, _ what: String, file: StaticString = #filePath, line: UInt = #line) {
        let ulp: Float = 1.0 / 128
        assertClose(a, ref, atol: ulps * rms(ref) * ulp, rtol: ulps * ulp, what, file: file, line: line)
    }

    /// Runs `f` on the fixture's inputs in `family`; returns the output and the gradients of the inputs that have one.
    private func run(_ g: Golden, _ names: [String], _ family: KernelFamily, _ f: (Tape, [Var]) -> Var) throws
        -> (out: Tensor, grads: [String: Tensor]) {
        try Kernels.with(family) {
            let tape = Tape()
            let vars = try names.map { Var(try g.input($0), requiresGrad: g.has("grad.\($0)")) }
            let out = f(tape, vars)
            let grads = tape.backward(from: out, seed: try g.gradOutput())
            var byName: [String: Tensor] = [:]
            for (k, v) in zip(names, vars) where v.requiresGrad { byName[k] = grads[v] }
            return (out.value, byName)
        }
    }

    /// Output and gradients against PyTorch autocast (within `ulps` bf16 ulps), against the fp32 family (relative
    /// rms error below 2⁻⁷, and not zero: the bf16 family really rounds), and bit-identical when run twice.
    private func check(_ name: String, _ names: [String], ulps: Float = 1, file: StaticString = #filePath, line: UInt = #line,
                       _ f: @escaping (Tape, [Var]) -> Var) throws {
        let g = try Golden(name)
        let bf = try run(g, names, .bf16, f), again = try run(g, names, .bf16, f), fp = try run(g, names, .fp32, f)
        close(bf.out, try g.output(), ulps: ulps, "\(name) output vs PyTorch autocast", file: file, line: line)
        XCTAssertEqual(bf.out.scalars, again.out.scalars, "\(name): bf16 output not deterministic", file: file, line: line)
        let e = relativeError(bf.out, fp.out)
        XCTAssertTrue(e > 0 && e < 1.0 / 128, "\(name): bf16 vs fp32 output relative error \(e)", file: file, line: line)
        XCTAssertEqual(Set(bf.grads.keys), Set(names.filter { g.has("grad.\($0)") }), file: file, line: line)
        for (k, grad) in bf.grads {
            close(grad, try g.grad(k), ulps: ulps, "\(name) d\(k) vs PyTorch autocast", file: file, line: line)
            XCTAssertEqual(grad.scalars, again.grads[k]!.scalars, "\(name): d\(k) not deterministic", file: file, line: line)
            let e = relativeError(grad, fp.grads[k]!)
            XCTAssertTrue(e > 0 && e < 1.0 / 128, "\(name): d\(k) bf16 vs fp32 relative error \(e)", file: file, line: line)
        }
    }

    // autocast F.linear(x, w, b), x [2,37,160], w [96,160]: output, dx, dw, db
    func testLinear() throws {
        try check("bf16_linear_bias", ["x", "w", "b"]) { t, v in t.linear(v[0], v[1], v[2]) }
    }

    // autocast F.linear(x, w, b) + 2·F.linear(F.linear(x, down), up) (kohya LoRA, rank 4, scale 2) on lora-dist's fused
    // low-rank linear: output, dx, d_down, d_up (w and b frozen)
    func testLoRALinear() throws {
        try check("bf16_lora_linear", ["x", "w", "b", "down", "up"], ulps: 2) { t, v in
            t.lowRankLinear(v[0], v[1], v[2], down: v[3], up: v[4], scale: 2)
        }
    }

    // autocast (a.t() if ta else a) @ (b.t() if tb else b), [70,80]·[80,48], plain and both transposed
    func testMatmul() throws {
        for name in ["bf16_matmul_00", "bf16_matmul_11"] {
            let g = try Golden(name)
            try check(name, ["a", "b"]) { t, v in t.matmul(v[0], v[1], transA: g.bool("transA"), transB: g.bool("transB")) }
        }
    }

    // autocast F.conv2d(x, w, b) with a frozen kernel (input gradient only), x [2,64,12,10], w [48,64,k,k]:
    // 3×3 stride 1 pad 1, 3×3 stride 2 pad 1 (downsample), 1×1
    func testConvolution() throws {
        for name in ["bf16_conv_k3s1p1", "bf16_conv_k3s2p1", "bf16_conv_k1s1p0"] {
            let g = try Golden(name)
            try check(name, ["x", "w", "b"]) { t, v in t.conv2d(v[0], v[1], v[2], stride: g.int("stride"), padding: g.int("padding")) }
        }
    }

    /// A frozen kernel is reordered once and reused; a trainable one (LoCon) is not cached, and its weight gradient
    /// stays fp32 on both families.
    func testFrozenConvWeightsPreparedOnce() throws {
        let g = try Golden("bf16_conv_k3s1p1")
        let x = try g.input("x"), w = try g.input("w")
        try Kernels.with(.bf16) {
            let before = DNNL.preparedWeightBytes
            let a = Tape().conv2d(Var(x), Var(w), nil, stride: 1, padding: 1)
            let grew = DNNL.preparedWeightBytes - before
            XCTAssertGreaterThanOrEqual(grew, 48 * 64 * 9 * 2, "one bf16 copy of the kernel")
            let b = Tape().conv2d(Var(x), Var(w), nil, stride: 1, padding: 1)
            XCTAssertEqual(DNNL.preparedWeightBytes - before, grew, "the second use reuses it")
            XCTAssertEqual(a.value.scalars, b.value.scalars)
            let tape = Tape()
            let wv = Var(w, requiresGrad: true)
            let y = tape.conv2d(Var(x), wv, nil, stride: 1, padding: 1)
            XCTAssertEqual(DNNL.preparedWeightBytes - before, grew, "a trainable kernel is not cached")
            let dW = tape.backward(from: y, seed: try g.gradOutput())[wv]!
            let ref = Conv2d.backward(try g.gradOutput(), x: x, w: w, stride: 1, padding: 1, wantX: false, wantW: true, wantB: false).dW!
            XCTAssertEqual(dW.scalars, ref.scalars, "LoCon weight gradient: fp32 kernel")
        }
    }

    // autocast F.scaled_dot_product_attention (PyTorch's CPU flash kernel on bf16 q, k, v; fp32 softmax), D = 64:
    // self over 150 tokens, cross 64 → 77, causal over 77. The gradients pass through three roundings (P, dS, the
    // result), and PyTorch rounds P unnormalised where lora-dist rounds it normalised: three ulps. For scale, PyTorch's
    // own autocast dK in the causal case is 10 ulps (of its rms) from its fp32 dK (measured with PyTorch 2.15).
    func testAttention() throws {
        for name in ["bf16_attention_self", "bf16_attention_cross", "bf16_attention_causal"] {
            let g = try Golden(name)
            try check(name, ["q", "k", "v"], ulps: 3) { t, v in
                t.attention(v[0], v[1], v[2], heads: g.int("heads"), causal: g.bool("causal"))
            }
        }
    }

    /// Query rows in several blocks (dK and dV accumulated across them) give what one block gives, within fp32
    /// rounding (oneDNN may block a 48-row product differently from a 150-row one).
    func testAttentionInSeveralBlocks() throws {
        let g = try Golden("bf16_attention_self")
        let saved = Attention.blockElements
        defer { Attention.blockElements = saved }
        Attention.blockElements = 2 * 150 * 48   // 2 heads × ≤ 48 rows × 150 keys: 4 blocks of 48, 48, 48, 6 rows
        let small = try run(g, ["q", "k", "v"], .bf16) { t, v in t.attention(v[0], v[1], v[2], heads: 2) }
        Attention.blockElements = saved
        let one = try run(g, ["q", "k", "v"], .bf16) { t, v in t.attention(v[0], v[1], v[2], heads: 2) }
        assertClose(small.out, one.out, atol: 1e-5, rtol: 1e-5, "output")
        for k in ["q", "k", "v"] { assertClose(small.grads[k]!, one.grads[k]!, atol: 1e-5, rtol: 1e-5, "d\(k)") }
        close(small.grads["k"]!, try g.grad("k"), ulps: 2, "dk in blocks vs PyTorch autocast")
    }
}
