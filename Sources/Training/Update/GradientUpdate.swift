import Distributed
import Foundation

/// Stage 4 — every rank's gradient sum → one all-reduce (compressed on the wire) → ÷ the total sample count, once →
/// clipping (torch.clip_grad_norm_ on the reduced gradient) → the optimizer step with the scheduled learning rates.
final class GradientUpdate {
    let communicator: any Communicator
    let reducer: GradientAllReduce
    let optimizer: Optimizer
    let schedule: LRSchedule
    /// One base rate per parameter group (`LoRANetwork.parameterLayout`'s order).
    let baseLearningRates: [Double]
    let maxGradNorm: Double

    init(communicator: any Communicator, reducer: GradientAllReduce, optimizer: Optimizer, schedule: LRSchedule,
         baseLearningRates: [Double], maxGradNorm: Double) {
        self.communicator = communicator
        self.reducer = reducer
        self.optimizer = optimizer
        self.schedule = schedule
        self.baseLearningRates = baseLearningRates
        self.maxGradNorm = maxGradNorm
    }

    /// What one update did.
    struct Outcome {
        /// Mean loss over every rank's samples (NaN when there were none).
        var meanLoss: Double
        var samples: Int
        /// False: a loss or gradient was not finite, and the parameters were left as they were.
        var applied: Bool
        var gradientNorm: Double?
        /// The scheduled rates of this step, per group (before the optimizer's own adaptation).
        var learningRates: [Double]
        var reduce: GradientAllReduce.Stats?
    }

    /// The learning rates of optimizer step `step` (0-based), per group.
    func learningRates(step: Int) -> [Double] { baseLearningRates.map { $0 * schedule.factor(step: step) } }

    /// Collective. `gradients`: this rank's Σ of per-sample gradients over its accumulation window (left reduced and
    /// divided; the caller zeroes it); `lossSum`, `samples`, `nonFinite`: the window's. `step`: optimizer steps done.
    /// `committed` runs holding `lock` right after the optimizer's update (or the decision to skip it), so that the
    /// caller can publish the position that goes with the new parameters atomically (ImmediateStop).
    /// `reduced`: the gradients were already summed over ranks during backward (GradientBuckets), with these statistics.
    func apply(gradients: inout [Float], lossSum: Double, samples: Int, nonFinite: Bool, parameters: inout [Float],
               step: Int, reduced: GradientAllReduce.Stats? = nil, lock: NSLock? = nil,
               committed: (Outcome) -> Void = { _ in }) throws -> Outcome {
        // Loss, samples and the non-finite flag of every rank: one small all-reduce.
        var summary: [Float] = [Float(lossSum.isFinite ? lossSum : 0), Float(samples), nonFinite ? 1 : 0]
        try communicator.allReduceSum(&summary)
        let total = Int(summary[1])
        let rates = learningRates(step: step)
        var outcome = Outcome(meanLoss: total > 0 ? Double(summary[0]) / Double(total) : .nan, samples: total, applied: false,
                              gradientNorm: nil, learningRates: rates, reduce: nil)
        var ready = false
        if total > 0 {
            outcome.reduce = try reduced ?? reducer.sum(&gradients)
            let inverse = 1 / Float(total)
            for i in gradients.indices { gradients[i] *= inverse }
            if summary[2] == 0, gradients.allSatisfy({ $0.isFinite }) {
                outcome.gradientNorm = maxGradNorm > 0 ? GradientClipping.clip(&gradients, maxNorm: maxGradNorm)
                    : GradientClipping.totalNorm(gradients)
                ready = true
            }
        }
        lock?.lock()
        defer { lock?.unlock() }
        if ready {
            optimizer.step(parameters: &parameters, gradients: gradients, learningRates: rates)
            outcome.applied = true
        }
        committed(outcome)
        return outcome
    }
}
