import Foundation

/// kohya `--lr_scheduler` schedules: the learning-rate multipliers of transformers.optimization's
/// TYPE_TO_SCHEDULER_FUNCTION (which kohya's get_scheduler_fix uses; the formulas equal
/// diffusers.optimization.get_scheduler's), with the arguments kohya passes to each:
/// cosine gets the default num_cycles 0.5 (kohya does not pass --lr_scheduler_num_cycles to it),
/// cosine_with_restarts gets numCycles, polynomial gets power and lr_end = 1e-7 (relative to kohya's
/// --learning_rate, hence `baseLearningRate`). "adafactor" is kohya's proxy for Adafactor's own
/// relative-step lr: a constant multiplier 1 (the optimizer ignores it).
public struct LRSchedule: Sendable {
    public static let names = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                               "polynomial", "adafactor"]

    public let name: String
    public let warmupSteps: Int
    public let totalSteps: Int
    public let numCycles: Int
    public let power: Double
    /// kohya --learning_rate (the optimizer's default lr): polynomial decays towards lr_end / this.
    public let baseLearningRate: Double?
    /// transformers' polynomial default end lr.
    public static let polynomialEndLR = 1e-7

    /// kohya --lr_scheduler names: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial
    /// (+ "adafactor"). Unknown name -> error listing valid ones.
    public init(name: String, warmupSteps: Int, totalSteps: Int, numCycles: Int = 1, power: Double = 1,
                baseLearningRate: Double? = nil) throws {
        // kohya turns the adafactor scheduler into "adafactor:<lr>"
        let key = name.hasPrefix("adafactor") ? "adafactor" : name
        guard LRSchedule.names.contains(key) else {
            throw OptimizerError("--lr_scheduler '\(name)' is not supported; use one of \(LRSchedule.names.joined(separator: ", "))")
        }
        guard warmupSteps >= 0 else { throw OptimizerError("--lr_warmup_steps \(warmupSteps) must be >= 0") }
        if key == "constant" || key == "adafactor", warmupSteps != 0 {
            // kohya: wrap_check_needless_num_warmup_steps
            throw OptimizerError("--lr_scheduler \(key) does not use --lr_warmup_steps (got \(warmupSteps)); set it to 0 or use constant_with_warmup")
        }
        if key == "polynomial" {
            guard let lr = baseLearningRate else {
                throw OptimizerError("--lr_scheduler polynomial decays to lr_end=1e-7 relative to --learning_rate; pass baseLearningRate")
            }
            guard lr > LRSchedule.polynomialEndLR else {
                throw OptimizerError("--lr_scheduler polynomial: lr_end (1e-07) must be smaller than --learning_rate (\(lr))")
            }
        }
        if key == "polynomial" || key == "linear" || key.hasPrefix("cosine") {
            guard totalSteps >= 1 else { throw OptimizerError("--lr_scheduler \(key) needs the total step count (got \(totalSteps))") }
        }
        self.name = key
        self.warmupSteps = warmupSteps
        self.totalSteps = totalSteps
        self.numCycles = numCycles
        self.power = power
        self.baseLearningRate = baseLearningRate
    }

    /// Multiplier at optimizer step `step` (0-based: the lr used for the first update is base * factor(0)).
    public func factor(step: Int) -> Double {
        let current = step
        if name == "constant" || name == "adafactor" { return 1 }
        if current < warmupSteps {
            return Double(current) / Double(max(1, warmupSteps))
        }
        switch name {
        case "constant_with_warmup":
            return 1
        case "linear":
            return max(0, Double(totalSteps - current) / Double(max(1, totalSteps - warmupSteps)))
        case "cosine":
            let progress = Double(current - warmupSteps) / Double(max(1, totalSteps - warmupSteps))
            return max(0, 0.5 * (1 + cos(Double.pi * 0.5 * 2 * progress)))
        case "cosine_with_restarts":
            let progress = Double(current - warmupSteps) / Double(max(1, totalSteps - warmupSteps))
            if progress >= 1 { return 0 }
            let phase = (Double(numCycles) * progress).truncatingRemainder(dividingBy: 1)
            return max(0, 0.5 * (1 + cos(Double.pi * phase)))
        case "polynomial":
            let lrInit = baseLearningRate!, lrEnd = LRSchedule.polynomialEndLR
            if current > totalSteps { return lrEnd / lrInit }
            let decaySteps = totalSteps - warmupSteps
            let pctRemaining = 1 - Double(current - warmupSteps) / Double(decaySteps)
            return ((lrInit - lrEnd) * pow(pctRemaining, power) + lrEnd) / lrInit
        default:
            return 1
        }
    }

    /// Scheduler steps per optimizer step: kohya under accelerate on N processes steps the LambdaLR N times
    /// per optimizer step (AcceleratedScheduler with split_batches=False); 1 otherwise.
    public private(set) var stepsPerOptimizerStep: Int = 1

    /// The schedule exactly as kohya builds it when training on `processes` ranks: get_scheduler_fix uses
    /// num_training_steps = max_train_steps · processes (a ratio --lr_warmup_steps is taken of that, a count is
    /// used as is) and accelerate steps the scheduler `processes` times per optimizer step, so optimizer step s
    /// uses factor(step: s · processes) — read it with `factor(optimizerStep:)`.
    public static func kohya(name: String, lrWarmupSteps: Double, maxTrainSteps: Int, processes: Int,
                             numCycles: Int = 1, power: Double = 1, baseLearningRate: Double? = nil) throws -> LRSchedule {
        guard processes >= 1 else { throw OptimizerError("LRSchedule.kohya: processes=\(processes) must be >= 1") }
        let total = maxTrainSteps * processes
        var schedule = try LRSchedule(name: name, warmupSteps: warmupSteps(lrWarmupSteps, totalSteps: total),
                                      totalSteps: total, numCycles: numCycles, power: power,
                                      baseLearningRate: baseLearningRate)
        schedule.stepsPerOptimizerStep = processes
        return schedule
    }

    /// Multiplier for the update at 0-based optimizer step `optimizerStep` (= factor(step:) on one process).
    public func factor(optimizerStep: Int) -> Double { factor(step: optimizerStep * stepsPerOptimizerStep) }

    /// kohya's --lr_warmup_steps: an integer count, or a float < 1 read as a ratio of total steps
    /// (`int(ratio * total)`).
    public static func warmupSteps(_ value: Double, totalSteps: Int) -> Int {
        if value < 1 { return Int((value * Double(totalSteps)).rounded(.towardZero)) }
        return Int(value)
    }
}

/// Gradient clipping over the whole flat gradient buffer.
public enum GradientClipping {
    /// torch.nn.utils.clip_grad_norm_ semantics (total L2 norm over all gradients, coef = max/(norm+1e-6) clamped to 1).
    /// Returns the norm before clipping. Fixed summation order (deterministic regardless of threads):
    /// squares summed in Double over fixed 4096-element chunks, chunks summed in order.
    public static func clip(_ gradients: inout [Float], maxNorm: Double) -> Double {
        let norm = totalNorm(gradients)
        let coefficient = maxNorm / (norm + 1e-6)
        if coefficient < 1 {
            // torch multiplies by the fp32 clamped coefficient
            let c = Float(coefficient)
            for i in 0..<gradients.count { gradients[i] *= c }
        }
        return norm
    }

    /// L2 norm of `values` in a fixed summation order.
    public static func totalNorm(_ values: [Float]) -> Double {
        let chunk = 4096
        let chunks = (values.count + chunk - 1) / chunk
        var partial = [Double](repeating: 0, count: chunks)
        values.withUnsafeBufferPointer { v in
            partial.withUnsafeMutableBufferPointer { out in
                forEachEntryConcurrently(chunks) { c in
                    var sum = 0.0
                    for i in (c * chunk)..<min((c + 1) * chunk, v.count) { sum += Double(v[i]) * Double(v[i]) }
                    out[c] = sum
                }
            }
        }
        return partial.reduce(0, +).squareRoot()
    }
}
