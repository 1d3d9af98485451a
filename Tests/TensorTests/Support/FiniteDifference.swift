import Base
import Tensor
import XCTest

/// Central-difference gradient check (ggml's test-backend-ops style).
///
/// L = Σ out ⊙ R for a fixed random R, accumulated in Double. For each input marked in `check`, up to
/// `samples` elements are perturbed by ±eps and (L₊ − L₋)/2eps is compared with the tape's gradient.
/// Each input is a parameter (requiresGrad) iff `check` says so, so frozen-input paths are tested too.
func checkGradients(_ inputs: [Tensor], check: [Bool]? = nil, eps: Float = 1e-2, atol: Double = 1e-3,
                    rtol: Double = 1e-2, samples: Int = 48, seed: UInt64 = 7, _ what: String,
                    file: StaticString = #filePath, line: UInt = #line, _ f: (Tape, [Var]) -> Var) {
    let check = check ?? inputs.map { _ in true }
    let firstOut = f(Tape(recording: false), inputs.map { Var($0) }).value
    let r = Tensor(randomNormal: firstOut.shape, seed: seed ^ 0xABCD).scalars

    func loss(_ xs: [Tensor]) -> Double {
        let out = f(Tape(recording: false), xs.map { Var($0) }).value.scalars
        var s = 0.0
        for i in 0..<out.count { s += Double(out[i]) * Double(r[i]) }
        return s
    }

    let tape = Tape()
    let vars = zip(inputs, check).map { Var($0.0, requiresGrad: $0.1) }
    let out = f(tape, vars)
    let grads = tape.backward(from: out, seed: Tensor(shape: firstOut.shape, r))

    var rng = SplitMix64(seed: seed)
    for (i, x) in inputs.enumerated() where check[i] {
        guard let g = grads[vars[i]] else {
            XCTFail("\(what): no gradient for input \(i)", file: file, line: line); continue
        }
        XCTAssertEqual(g.shape, x.shape, "\(what): gradient shape of input \(i)", file: file, line: line)
        let gs = g.scalars
        let n = x.count
        let picks = n <= samples ? Array(0..<n) : (0..<samples).map { _ in Int(rng.next() % UInt64(n)) }
        var base = x.scalars
        for j in picks {
            let orig = base[j]
            base[j] = orig + eps
            var xs = inputs; xs[i] = Tensor(shape: x.shape, base)
            let lp = loss(xs)
            base[j] = orig - eps
            xs[i] = Tensor(shape: x.shape, base)
            let lm = loss(xs)
            base[j] = orig
            let numeric = (lp - lm) / (2 * Double(eps))
            let analytic = Double(gs[j])
            XCTAssertLessThanOrEqual(abs(numeric - analytic), atol + rtol * abs(numeric),
                "\(what): d/d input\(i)[\(j)]: tape \(analytic), finite difference \(numeric)",
                file: file, line: line)
        }
    }
}
