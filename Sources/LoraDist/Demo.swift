import ArgumentParser
import Foundation
import Tensor

/// A short engine demo: a miniature SDXL transformer block (conv in, group norm + SiLU, self-attention,
/// GEGLU feed-forward, conv out) with frozen random weights and LoRA adapters on q, v and the
/// feed-forward projection, trained by SGD to match a "teacher" (the same block with a hidden low-rank
/// change). It exercises every kernel family forward and backward, with gradient checkpointing.
struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Train LoRA adapters on a miniature SDXL block (engine demo; no model files needed).")

    @OptionGroup var engine: EngineOptions
    @Option(help: "Optimisation steps.") var steps = 40
    @Option(help: "Latent side (the block sees [2, 64, side, side]).") var size = 32
    @Option(help: "Learning rate (plain SGD).") var lr: Float = 2
    @Flag(help: "Checkpoint the transformer block (recompute activations in backward).") var checkpoint = false

    func validate() throws {
        guard steps >= 1 else { throw ValidationError("--steps must be at least 1 (got \(steps))") }
        guard size >= 4, size % 2 == 0 else { throw ValidationError("--size must be even and at least 4 (got \(size))") }
        guard lr > 0 else { throw ValidationError("--lr must be positive (got \(lr))") }
    }

    func run() throws {
        engine.apply()
        print("engine: OpenBLAS \(BLAS.coreName), \(Threads.count) threads")
        let c = 64, heads = 2, rank = 4, batch = 2
        var seed: UInt64 = 100
        func w(_ shape: [Int], _ std: Float) -> Var { seed += 1; return Var(Tensor(randomNormal: shape, std: std, seed: seed)) }
        let convIn = w([c, 4, 3, 3], 0.2), convOut = w([4, c, 3, 3], 0.05)
        let gnW = Var(Tensor(shape: [c], [Float](repeating: 1, count: c))), gnB = w([c], 0.1)
        let wq = w([c, c], 0.125), wk = w([c, c], 0.125), wv = w([c, c], 0.125), wo = w([c, c], 0.125)
        let ff1 = w([8 * c, c], 0.125), ff2 = w([c, 4 * c], 0.06)

        struct LoRA { let down: Var; let up: Var }
        func lora(_ inF: Int, _ outF: Int, teacher: Bool) -> LoRA {
            seed += 1
            let down = Tensor(randomNormal: [rank, inF], std: 1 / Float(inF).squareRoot(), seed: seed)
            seed += 1
            // kohya initialises up to zero; the teacher's hidden change is a random up.
            let up = teacher ? Tensor(randomNormal: [outF, rank], std: 0.3, seed: seed) : Tensor(zeros: [outF, rank])
            return LoRA(down: Var(down, requiresGrad: !teacher), up: Var(up, requiresGrad: !teacher))
        }

        func block(_ t: Tape, _ x: Var, _ l: [LoRA]) -> Var {
            func adapted(_ h: Var, _ base: Var, _ a: LoRA) -> Var { t.add(t.linear(h, base), t.linear(t.linear(h, a.down), a.up)) }
            let n = x.shape[2] * x.shape[3]
            var h = t.conv2d(x, convIn, nil, stride: 1, padding: 1)   // [B, C, H, W]
            h = t.silu(t.groupNorm(h, groups: 32, weight: gnW, bias: gnB, eps: 1e-5))
            let tokens = t.reshape(t.permute(h, [0, 2, 3, 1]), [batch, n, c])                             // [B, N, C]
            let attn = t.attention(adapted(tokens, wq, l[0]), t.linear(tokens, wk), adapted(tokens, wv, l[1]), heads: heads)
            var y = t.add(tokens, t.linear(attn, wo))
            let ff = t.linear(t.geglu(adapted(y, ff1, l[2])), ff2)
            y = t.add(y, ff)
            let back = t.permute(t.reshape(y, [batch, x.shape[2], x.shape[3], c]), [0, 3, 1, 2])            // [B, C, H, W]
            return t.conv2d(back, convOut, nil, stride: 1, padding: 1)
        }
        let shapes = [(c, c), (c, c), (c, 8 * c)]
        let teacher = shapes.map { lora($0.0, $0.1, teacher: true) }
        let student = shapes.map { lora($0.0, $0.1, teacher: false) }
        let params = student.flatMap { [$0.down, $0.up] }
        var current = params.map(\.value)

        seed += 1
        let x = Var(Tensor(randomNormal: [batch, 4, size, size], seed: seed))
        let target = Var(block(Tape(recording: false), x, teacher).value)
        let ones = Var(Tensor(shape: [batch], [Float](repeating: 1, count: batch)))
        print("block: [\(batch), 4, \(size), \(size)] → conv → GN+SiLU → attention (\(size * size) tokens, \(heads) heads) → GEGLU → conv; LoRA rank \(rank) on q, v, ff")

        var first: Float = 0, last: Float = 0
        var times: [Double] = []
        for step in 1...steps {
            let start = Date()
            let tape = Tape()
            let vars = current.map { Var($0, requiresGrad: true) }
            let l = (0..<3).map { LoRA(down: vars[2 * $0], up: vars[2 * $0 + 1]) }
            let out = checkpoint ? tape.checkpoint([x]) { t, ins in block(t, ins[0], l) } : block(tape, x, l)
            let loss = tape.weightedMSE(out, target, weights: ones)
            let grads = tape.backward(from: loss)
            current = zip(vars, current).map { v, p in Elementwise.sub(p, Elementwise.scale(grads[v]!, lr)) }
            times.append(Date().timeIntervalSince(start))
            let value = loss.value[flat: 0]
            if step == 1 { first = value }
            last = value
            if step == 1 || step % 5 == 0 || step == steps {
                print(String(format: "step %3d  loss %.6f  %.0f ms", step, value, times.last! * 1000))
            }
        }
        let median = times.sorted()[times.count / 2]
        print(String(format: "loss %.6f → %.6f (%.1f%% lower); median step %.0f ms", first, last, 100 * (1 - last / first), median * 1000))
        if !(last < first) {
            print("error: the loss did not decrease (\(first) → \(last)); with the default --lr this means a broken kernel")
            throw ExitCode.failure
        }
    }
}
