import Foundation
import Tensor
import XCTest

final class AttentionTests: XCTestCase {
    // MARK: golden (PyTorch)

    /// Fixtures from Tests/Fixtures/ops_attention.py:
    ///     qh = q.view(B, Nq, heads, D).transpose(1, 2)   (k, v alike)
    ///     o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, scale=scale)
    ///     out = o.transpose(1, 2).reshape(B, Nq, C)
    ///     lse = torch.logsumexp((qh @ kh.transpose(-1, -2)) * scale [masked_fill(triu(1), -inf) if causal], dim=-1)
    /// and dq, dk, dv = autograd of Σ out ⊙ grad_output.
    private func checkGolden(_ name: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let g = try Golden(name)
        let q = try g.input("q"), k = try g.input("k"), v = try g.input("v")
        let heads = g.int("heads"), causal = g.bool("causal")
        let scale: Float? = g.args["scale"] == nil ? nil : g.float("scale")
        let (out, lse) = Attention.forward(q: q, k: k, v: v, heads: heads, causal: causal, scale: scale)
        assertClose(out, try g.output("out"), atol: 1e-5, rtol: 1e-4, "\(name) output", file: file, line: line)
        assertClose(lse, try g.output("lse"), atol: 1e-5, rtol: 1e-5, "\(name) logsumexp", file: file, line: line)
        let r = Attention.backward(dOut: try g.gradOutput("out"), q: q, k: k, v: v, out: out, logsumexp: lse,
                                   heads: heads, causal: causal, scale: scale, wantQ: true, wantK: true, wantV: true)
        assertClose(r.dQ!, try g.grad("q"), atol: 1e-4, rtol: 1e-4, "\(name) dq", file: file, line: line)
        assertClose(r.dK!, try g.grad("k"), atol: 1e-4, rtol: 1e-4, "\(name) dk", file: file, line: line)
        assertClose(r.dV!, try g.grad("v"), atol: 1e-4, rtol: 1e-4, "\(name) dv", file: file, line: line)

        // Each gradient alone (the query-block path when only dq is wanted) matches the full backward.
        for (wq, wk, wv) in [(true, false, false), (false, true, false), (false, false, true), (true, false, true)] {
            let s = Attention.backward(dOut: try g.gradOutput("out"), q: q, k: k, v: v, out: out, logsumexp: lse,
                                       heads: heads, causal: causal, scale: scale, wantQ: wq, wantK: wk, wantV: wv)
            XCTAssertEqual(s.dQ == nil, !wq, file: file, line: line)
            XCTAssertEqual(s.dK == nil, !wk, file: file, line: line)
            XCTAssertEqual(s.dV == nil, !wv, file: file, line: line)
            if let d = s.dQ { assertClose(d, r.dQ!, atol: 1e-6, rtol: 1e-5, "\(name) dq alone", file: file, line: line) }
            if let d = s.dK { assertClose(d, r.dK!, atol: 1e-6, rtol: 1e-5, "\(name) dk alone", file: file, line: line) }
            if let d = s.dV { assertClose(d, r.dV!, atol: 1e-6, rtol: 1e-5, "\(name) dv alone", file: file, line: line) }
        }
    }

    /// attention(heads=3)(q, k, v) on [2, 77, 12]: N not a multiple of the tile, D = 4.
    func testGoldenSelfAttentionN77() throws { try checkGolden("attention_self_n77") }

    /// attention(heads=2)(q, k, v) on [1, 150, 16]: two query tiles, D = 8.
    func testGoldenSelfAttentionN150() throws { try checkGolden("attention_self_n150") }

    /// attention(heads=2, scale=0.3)(q [2, 50, 16], k, v [2, 77, 16]): cross-attention with an explicit scale.
    func testGoldenCrossAttention() throws { try checkGolden("attention_cross") }

    /// attention(heads=3, causal=True)(q, k, v) on [2, 77, 12]: CLIP's causal mask.
    func testGoldenCausalAttention() throws { try checkGolden("attention_causal_n77") }

    /// The tape records q, k and v, and routes each gradient (frozen inputs get none).
    func testTapeAttentionMatchesGolden() throws {
        let g = try Golden("attention_cross")   // same PyTorch expression as testGoldenCrossAttention
        let tape = Tape()
        let q = Var(try g.input("q"), requiresGrad: true), k = Var(try g.input("k")), v = Var(try g.input("v"), requiresGrad: true)
        let out = tape.attention(q, k, v, heads: 2, scale: 0.3)
        assertClose(out.value, try g.output("out"), atol: 1e-5, rtol: 1e-4, "tape output")
        let grads = tape.backward(from: out, seed: try g.gradOutput("out"))
        assertClose(grads[q]!, try g.grad("q"), atol: 1e-4, rtol: 1e-4, "tape dq")
        assertClose(grads[v]!, try g.grad("v"), atol: 1e-4, rtol: 1e-4, "tape dv")
        XCTAssertNil(grads[k], "a frozen k gets no gradient")
    }

    // MARK: tiled vs a materialised reference

    /// softmax(scale·QKᵀ)·V and its gradients with the whole [Nq, Nk] matrix, in Double.
    private func naive(q: Tensor, k: Tensor, v: Tensor, dOut: Tensor, heads: Int, causal: Bool)
        -> (out: [Double], lse: [Double], dq: [Double], dk: [Double], dv: [Double]) {
        let b = q.shape[0], nq = q.shape[1], c = q.shape[2], nk = k.shape[1], d = c / heads
        let scale = 1 / Double(d).squareRoot()
        let qs = q.scalars.map(Double.init), ks = k.scalars.map(Double.init), vs = v.scalars.map(Double.init)
        let gs = dOut.scalars.map(Double.init)
        var out = [Double](repeating: 0, count: b * nq * c), lse = [Double](repeating: 0, count: b * heads * nq)
        var dq = out, dk = [Double](repeating: 0, count: b * nk * c), dv = dk
        for bi in 0..<b {
            for h in 0..<heads {
                func qi(_ i: Int, _ x: Int) -> Int { (bi * nq + i) * c + h * d + x }
                func kj(_ j: Int, _ x: Int) -> Int { (bi * nk + j) * c + h * d + x }
                var p = [Double](repeating: 0, count: nq * nk)
                for i in 0..<nq {
                    var m = -Double.infinity
                    for j in 0..<nk {
                        var s = 0.0
                        for x in 0..<d { s += qs[qi(i, x)] * ks[kj(j, x)] }
                        p[i * nk + j] = causal && j > i ? -.infinity : s * scale
                        m = max(m, p[i * nk + j])
                    }
                    var sum = 0.0
                    for j in 0..<nk { p[i * nk + j] = exp(p[i * nk + j] - m); sum += p[i * nk + j] }
                    for j in 0..<nk { p[i * nk + j] /= sum }
                    lse[(bi * heads + h) * nq + i] = m + log(sum)
                    for x in 0..<d {
                        var o = 0.0
                        for j in 0..<nk { o += p[i * nk + j] * vs[kj(j, x)] }
                        out[qi(i, x)] = o
                    }
                }
                for i in 0..<nq {
                    // dP = dO·Vᵀ; dS = P ∘ (dP − Σⱼ P∘dP)
                    var dp = [Double](repeating: 0, count: nk)
                    var rowDot = 0.0
                    for j in 0..<nk {
                        for x in 0..<d { dp[j] += gs[qi(i, x)] * vs[kj(j, x)] }
                        rowDot += p[i * nk + j] * dp[j]
                    }
                    for j in 0..<nk {
                        let pij = p[i * nk + j], ds = pij * (dp[j] - rowDot) * scale
                        for x in 0..<d {
                            dv[kj(j, x)] += pij * gs[qi(i, x)]
                            dq[qi(i, x)] += ds * ks[kj(j, x)]
                            dk[kj(j, x)] += ds * qs[qi(i, x)]
                        }
                    }
                }
            }
        }
        return (out, lse, dq, dk, dv)
    }

    private func checkAgainstNaive(b: Int, nq: Int, nk: Int, heads: Int, d: Int, causal: Bool, _ what: String) {
        let c = heads * d
        let q = Tensor(randomNormal: [b, nq, c], seed: 11), k = Tensor(randomNormal: [b, nk, c], seed: 12)
        let v = Tensor(randomNormal: [b, nk, c], seed: 13), dOut = Tensor(randomNormal: [b, nq, c], seed: 14)
        let ref = naive(q: q, k: k, v: v, dOut: dOut, heads: heads, causal: causal)
        let (out, lse) = Attention.forward(q: q, k: k, v: v, heads: heads, causal: causal)
        let r = Attention.backward(dOut: dOut, q: q, k: k, v: v, out: out, logsumexp: lse, heads: heads,
                                   causal: causal, wantQ: true, wantK: true, wantV: true)
        func t(_ x: [Double], _ shape: [Int]) -> Tensor { Tensor(shape: shape, x.map(Float.init)) }
        assertClose(out, t(ref.out, [b, nq, c]), atol: 1e-5, rtol: 1e-4, "\(what) output")
        assertClose(lse, t(ref.lse, [b, heads, nq]), atol: 1e-5, rtol: 1e-5, "\(what) logsumexp")
        assertClose(r.dQ!, t(ref.dq, [b, nq, c]), atol: 1e-4, rtol: 1e-4, "\(what) dq")
        assertClose(r.dK!, t(ref.dk, [b, nk, c]), atol: 1e-4, rtol: 1e-4, "\(what) dk")
        assertClose(r.dV!, t(ref.dv, [b, nk, c]), atol: 1e-4, rtol: 1e-4, "\(what) dv")
        let alone = Attention.backward(dOut: dOut, q: q, k: k, v: v, out: out, logsumexp: lse, heads: heads,
                                       causal: causal, wantQ: true, wantK: false, wantV: false)
        assertClose(alone.dQ!, t(ref.dq, [b, nq, c]), atol: 1e-4, rtol: 1e-4, "\(what) dq alone")
    }

    /// Several query tiles (128 rows) and key tiles (256 rows), with ragged last tiles.
    func testTiledMatchesMaterialisedReference() {
        checkAgainstNaive(b: 2, nq: 290, nk: 530, heads: 2, d: 8, causal: false, "cross 290×530")
    }

    /// Fewer keys than queries (text cross-attention): the query-block backward with per-worker dK, dV.
    func testFewKeysMatchesMaterialisedReference() {
        checkAgainstNaive(b: 2, nq: 300, nk: 77, heads: 2, d: 8, causal: false, "cross 300×77")
    }

    /// Causal masks on diagonal tiles whose query and key tile boundaries differ (128 vs 256 rows).
    func testCausalTiledMatchesMaterialisedReference() {
        checkAgainstNaive(b: 1, nq: 300, nk: 300, heads: 3, d: 5, causal: true, "causal 300")
    }

    // MARK: finite differences

    func testFiniteDifferences() {
        let q = Tensor(randomNormal: [1, 5, 6], seed: 1), k = Tensor(randomNormal: [1, 7, 6], seed: 2)
        let v = Tensor(randomNormal: [1, 7, 6], seed: 3)
        checkGradients([q, k, v], eps: 1e-2, atol: 2e-3, rtol: 1e-2, "attention 2 heads") { tape, x in
            tape.attention(x[0], x[1], x[2], heads: 2)
        }
        let qc = Tensor(randomNormal: [2, 6, 6], seed: 4), kc = Tensor(randomNormal: [2, 6, 6], seed: 5)
        let vc = Tensor(randomNormal: [2, 6, 6], seed: 6)
        checkGradients([qc, kc, vc], eps: 1e-2, atol: 2e-3, rtol: 1e-2, "causal attention, scale 0.7") { tape, x in
            tape.attention(x[0], x[1], x[2], heads: 3, causal: true, scale: 0.7)
        }
        // frozen k: only q and v are parameters
        checkGradients([q, k, v], check: [true, false, true], eps: 1e-2, atol: 2e-3, rtol: 1e-2, "frozen k") { tape, x in
            tape.attention(x[0], x[1], x[2], heads: 3)
        }
    }

    // MARK: memory

    /// Reads a "VmHWM:   123 kB" style line of /proc/self/status, in bytes.
    private func procStatus(_ key: String) -> Int? {
        guard let text = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix(key + ":") {
            let kb = line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first.flatMap { Int($0) }
            return kb.map { $0 * 1024 }
        }
        return nil
    }

    /// SDXL's largest self-attention: [1, 4096, 640] with 10 heads. A materialised [10, 4096, 4096] fp32
    /// score matrix is 671 MB; inputs, outputs and gradients are 10.5 MB each. The peak RSS (VmHWM, reset
    /// to the current RSS through /proc/self/clear_refs so earlier tests cannot pollute it) may grow by
    /// the outputs, the gradients and a per-thread dQ buffer, never by the score matrix.
    func testMemoryStaysBoundedAtN4096() throws {
        let heads = 10, n = 4096, c = 640
        let q = Tensor(randomNormal: [1, n, c], std: 0.5, seed: 21), k = Tensor(randomNormal: [1, n, c], std: 0.5, seed: 22)
        let v = Tensor(randomNormal: [1, n, c], seed: 23), dOut = Tensor(randomNormal: [1, n, c], seed: 24)
        guard FileManager.default.isWritableFile(atPath: "/proc/self/clear_refs"),
              (try? "5".write(toFile: "/proc/self/clear_refs", atomically: false, encoding: .utf8)) != nil,
              let before = procStatus("VmRSS") else {
            throw XCTSkip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
        }
        let (out, lse) = Attention.forward(q: q, k: k, v: v, heads: heads)
        let r = Attention.backward(dOut: dOut, q: q, k: k, v: v, out: out, logsumexp: lse, heads: heads,
                                   wantQ: true, wantK: true, wantV: true)
        guard let peak = procStatus("VmHWM") else { return XCTFail("no VmHWM in /proc/self/status") }
        let growth = peak - before
        print("attention N=4096 fwd+bwd: peak RSS grew by \(growth >> 20) MB")
        let tensorBytes = n * c * 4
        XCTAssertLessThan(growth, 12 * tensorBytes,
                          "peak RSS grew by \(growth >> 20) MB; a [10, 4096, 4096] score matrix is \(heads * n * n * 4 >> 20) MB")
        // the result is real, not skipped work
        XCTAssertEqual(r.dQ?.shape, [1, n, c]); XCTAssertEqual(r.dK?.shape, [1, n, c]); XCTAssertEqual(r.dV?.shape, [1, n, c])
        XCTAssertTrue(out.scalars.prefix(1000).allSatisfy { $0.isFinite })
        XCTAssertTrue(r.dK!.scalars.prefix(1000).allSatisfy { $0.isFinite })
    }
}

final class SoftmaxTests: XCTestCase {
    /// Fixtures from Tests/Fixtures/ops_attention.py: torch.softmax(x, dim=-1), x = randn(shape) * 3,
    /// dx = autograd of Σ y ⊙ grad_output. Row lengths 7, 33 and 100 (vector tails of 3, 1 and 0).
    func testGolden() throws {
        for name in ["softmax_rows7", "softmax_rows33", "softmax_rows100"] {
            let g = try Golden(name)
            let x = try g.input("x")
            let y = Softmax.forward(x)
            assertClose(y, try g.output(), atol: 1e-7, rtol: 1e-5, "\(name) output")
            assertClose(Softmax.backward(try g.gradOutput(), y: y), try g.grad("x"), atol: 1e-6, rtol: 1e-4, "\(name) dx")

            let tape = Tape()
            let xv = Var(x, requiresGrad: true)
            let out = tape.softmax(xv)
            let grads = tape.backward(from: out, seed: try g.gradOutput())
            assertClose(grads[xv]!, try g.grad("x"), atol: 1e-6, rtol: 1e-4, "\(name) tape dx")
        }
    }

    /// Large logits must not overflow: the row max is subtracted first.
    func testLargeLogits() {
        let y = Softmax.forward(Tensor(shape: [1, 3], [1000, 1001, -1000])).scalars
        // softmax([0, 1, −2000]) analytically: 1/(1 + e), e/(1 + e), 0
        XCTAssertEqual(y[0], Float(1 / (1 + M_E)), accuracy: 1e-6)
        XCTAssertEqual(y[1], Float(M_E / (1 + M_E)), accuracy: 1e-6)
        XCTAssertEqual(y[2], 0, accuracy: 1e-30)
    }

    func testFiniteDifferences() {
        checkGradients([Tensor(randomNormal: [3, 9], std: 2, seed: 5)], eps: 1e-2, atol: 1e-3, rtol: 1e-2, "softmax") { tape, x in
            tape.softmax(x[0])
        }
    }
}
