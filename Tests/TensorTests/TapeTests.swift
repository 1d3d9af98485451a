import Tensor
import XCTest

final class TapeTests: XCTestCase {
    /// Frozen weights get no gradient and nothing is recorded for constant-only computations.
    func testOnlyWhatNeedsGradientIsRecorded() {
        let tape = Tape()
        let x = Var(Tensor(randomNormal: [4, 6], seed: 1))
        let frozen = Var(Tensor(randomNormal: [6, 6], seed: 2))
        let h = tape.linear(x, frozen)
        XCTAssertFalse(h.requiresGrad)
        XCTAssertEqual(tape.recordedCount, 0)
        let down = Var(Tensor(randomNormal: [2, 6], seed: 3), requiresGrad: true)
        let up = Var(Tensor(randomNormal: [6, 2], seed: 4), requiresGrad: true)
        let y = tape.add(tape.linear(h, frozen), tape.linear(tape.linear(h, down), up))
        let grads = tape.backward(from: tape.sum(y))
        XCTAssertNil(grads[frozen])
        XCTAssertNil(grads[x])
        XCTAssertNotNil(grads[down])
        XCTAssertNotNil(grads[up])
        XCTAssertEqual(grads.count, 2)
    }

    /// A checkpointed block gives the same gradients as the plain one — for its inputs and for the
    /// trainable weights it captures — and records one node instead of its inner ones.
    func testCheckpointMatchesPlainBackward() {
        let x = Tensor(randomNormal: [3, 8], seed: 5)
        let w1 = Tensor(randomNormal: [8, 8], seed: 6), w2 = Tensor(randomNormal: [8, 8], seed: 7)
        let lora = Tensor(randomNormal: [8, 8], std: 0.1, seed: 8)
        func block(_ t: Tape, _ h: Var, _ w1: Var, _ w2: Var, _ l: Var) -> Var {
            let a = t.mul(t.linear(h, w1), t.linear(h, l))
            return t.add(t.linear(a, w2), h)
        }
        func run(checkpointed: Bool) -> (GradStore, Var, Var, Int) {
            let tape = Tape()
            let xv = Var(x, requiresGrad: true), lv = Var(lora, requiresGrad: true)
            let f1 = Var(w1), f2 = Var(w2)
            let pre = tape.scale(xv, 1.5)
            let out = checkpointed
                ? tape.checkpoint([pre]) { t, ins in block(t, ins[0], f1, f2, lv) }
                : block(tape, pre, f1, f2, lv)
            let count = tape.recordedCount
            return (tape.backward(from: tape.sum(tape.mul(out, out))), xv, lv, count)
        }
        let (plain, px, pl, plainCount) = run(checkpointed: false)
        let (ckpt, cx, cl, ckptCount) = run(checkpointed: true)
        XCTAssertLessThan(ckptCount, plainCount)
        assertClose(ckpt[cx]!, plain[px]!, atol: 1e-5, rtol: 1e-5, "dx through checkpoint")
        assertClose(ckpt[cl]!, plain[pl]!, atol: 1e-5, rtol: 1e-5, "d lora captured by checkpoint")
    }

    /// A Var used twice accumulates both gradients.
    func testGradientAccumulatesOverUses() {
        let tape = Tape()
        let x = Var(Tensor(shape: [3], [1, 2, 3]), requiresGrad: true)
        let y = tape.add(tape.mul(x, x), tape.scale(x, 3))   // d/dx = 2x + 3
        let g = tape.backward(from: tape.sum(y))
        XCTAssertEqual(g[x]!.scalars, [5, 7, 9])
    }
}
