import Distributed
import Foundation

/// transformers.optimization.Adafactor (transformers 5.23, `Adafactor.step`) as kohya builds it:
/// relative_step defaults to True (then kohya passes lr=None, drops the group lrs and logs through
/// AdafactorSchedule); warmup_init=True forces relative_step=True.
/// Args: eps=(1e-30,1e-3), clip_threshold=1, decay_rate=-0.8, beta1=None, weight_decay=0,
/// scale_parameter=True, relative_step=True (kohya default), warmup_init=False.
///
/// Tensors with >= 2 dimensions keep factored second moments like torch: for shape [..., R, C] a row
/// statistic [..., R] and a column statistic [..., C] (a conv LoRA [r, in, k, k] has rows [r, in, k]
/// and columns [r, in, k]); 0-d and 1-d tensors keep a full second moment.
public final class Adafactor: Optimizer {
    public let name = "Adafactor"
    public let layout: ParameterLayout
    public let eps1: Double, eps2: Double, clipThreshold: Double, decayRate: Double
    public let beta1: Double?
    public let weightDecay: Double
    public let scaleParameter: Bool, relativeStep: Bool, warmupInit: Bool

    /// transformers keeps state["step"] per tensor; every tensor steps together here.
    public private(set) var stepCount: Int = 0
    var expAvg: [Float]   // [totalCount] when beta1 != nil
    var secondMoment: [Float] // per entry: factored rows then columns, or the full [count] moment
    var rms: [Float]      // [entries.count] state["RMS"] of each tensor at its last step
    /// Per entry: (batch B, rows R, cols C) for factored entries (nil: not factored) and its start in `secondMoment`.
    let factorShapes: [(b: Int, r: Int, c: Int)?]
    let momentOffsets: [Int]

    static let accepted = ["eps", "clip_threshold", "decay_rate", "beta1", "weight_decay", "scale_parameter",
                           "relative_step", "warmup_init"]

    public init(layout: ParameterLayout, eps: (Double, Double) = (1e-30, 1e-3), clipThreshold: Double = 1,
                decayRate: Double = -0.8, beta1: Double? = nil, weightDecay: Double = 0, scaleParameter: Bool = true,
                relativeStep: Bool = true, warmupInit: Bool = false) throws {
        if warmupInit && !relativeStep {
            throw OptimizerError("Adafactor: warmup_init=True requires relative_step=True")
        }
        self.layout = layout
        eps1 = eps.0; eps2 = eps.1
        self.clipThreshold = clipThreshold; self.decayRate = decayRate; self.beta1 = beta1
        self.weightDecay = weightDecay; self.scaleParameter = scaleParameter
        self.relativeStep = relativeStep; self.warmupInit = warmupInit
        var shapes: [(b: Int, r: Int, c: Int)?] = []
        var offsets: [Int] = []
        var total = 0
        for e in layout.entries {
            offsets.append(total)
            if e.shape.count >= 2 {
                let r = e.shape[e.shape.count - 2], c = e.shape[e.shape.count - 1]
                let b = e.shape.dropLast(2).reduce(1, *)
                shapes.append((b, r, c))
                total += b * r + b * c
            } else {
                shapes.append(nil)
                total += e.count
            }
        }
        factorShapes = shapes; momentOffsets = offsets
        secondMoment = [Float](repeating: 0, count: total)
        expAvg = beta1 != nil ? [Float](repeating: 0, count: layout.totalCount) : []
        rms = [Float](repeating: 0, count: layout.entries.count)
    }

    convenience init(layout: ParameterLayout, args: OptimizerArgs) throws {
        var a = args
        let eps = try a.doubles("eps", [1e-30, 1e-3], counts: 2...2)
        let clip = try a.double("clip_threshold", 1)
        let decay = try a.double("decay_rate", -0.8)
        let beta1 = try a.optionalDouble("beta1", nil)
        let wd = try a.double("weight_decay", 0)
        let scale = try a.bool("scale_parameter", true)
        // kohya: relative_step defaults to True, and warmup_init=True turns it on
        var relative = try a.bool("relative_step", true)
        let warmup = try a.bool("warmup_init", false)
        try a.finish(optimizer: "Adafactor (transformers.optimization.Adafactor)", accepted: Adafactor.accepted)
        if !relative && warmup { relative = true }
        try self.init(layout: layout, eps: (eps[0], eps[1]), clipThreshold: clip, decayRate: decay, beta1: beta1,
                      weightDecay: wd, scaleParameter: scale, relativeStep: relative, warmupInit: warmup)
    }

    /// transformers `Adafactor._get_lr` for a tensor whose last RMS is `rms` at step `step`.
    func learningRate(groupLR: Double, rms: Float, step: Int) -> Double {
        var relStep = groupLR
        if relativeStep {
            let minStep = warmupInit ? 1e-6 * Double(step) : 1e-2
            relStep = min(minStep, 1 / Double(step).squareRoot())
        }
        guard scaleParameter else { return relStep }
        // max(eps2, RMS) keeps torch's fp32 RMS tensor when it wins, so the product is fp32 as well
        if Double(rms) > eps2 { return Double(rms * Float(relStep)) }
        return eps2 * relStep
    }

    public func step(parameters: inout [Float], gradients: [Float], learningRates: [Double]) {
        checkStepInputs(name, layout: layout, parameters: parameters.count, gradients: gradients.count,
                        learningRates: learningRates.count)
        stepCount += 1
        let step = stepCount
        let beta2t = 1 - pow(Double(step), decayRate)
        let b2 = Float(beta2t), oneMinusB2 = Float(1 - beta2t)
        let epsF = Float(eps1)
        let entries = layout.entries
        let factorShapes = self.factorShapes, momentOffsets = self.momentOffsets
        let beta1 = self.beta1, weightDecay = self.weightDecay, clipThreshold = self.clipThreshold
        parameters.withUnsafeMutableBufferPointer { p in
            gradients.withUnsafeBufferPointer { g in
                expAvg.withUnsafeMutableBufferPointer { m in
                    secondMoment.withUnsafeMutableBufferPointer { sm in
                        rms.withUnsafeMutableBufferPointer { rmsv in
                            forEachEntryConcurrently(entries.count) { e in
                                let entry = entries[e]
                                let n = entry.count, o = entry.offset
                                // state["RMS"] = ||p|| / sqrt(numel)  (fp32)
                                var sq = 0.0
                                for i in o..<(o + n) { sq += Double(p[i]) * Double(p[i]) }
                                let paramRMS = Float(Float(sq.squareRoot()) / Float(Double(n).squareRoot()))
                                rmsv[e] = paramRMS
                                let lr = learningRate(groupLR: learningRates[entry.group], rms: paramRMS, step: step)
                                var update = [Float](repeating: 0, count: n)
                                if let f = factorShapes[e] {
                                    // rows [B, R] then columns [B, C]
                                    let rowBase = momentOffsets[e], colBase = rowBase + f.b * f.r
                                    for b in 0..<f.b {
                                        for r in 0..<f.r {
                                            var sum = 0.0
                                            for c in 0..<f.c {
                                                let gi = g[o + (b * f.r + r) * f.c + c]
                                                sum += Double(gi * gi + epsF)
                                            }
                                            let k = rowBase + b * f.r + r
                                            sm[k] = sm[k] * b2 + oneMinusB2 * Float(sum / Double(f.c))
                                        }
                                        for c in 0..<f.c {
                                            var sum = 0.0
                                            for r in 0..<f.r {
                                                let gi = g[o + (b * f.r + r) * f.c + c]
                                                sum += Double(gi * gi + epsF)
                                            }
                                            let k = colBase + b * f.c + c
                                            sm[k] = sm[k] * b2 + oneMinusB2 * Float(sum / Double(f.r))
                                        }
                                        // _approx_sq_grad: rsqrt(row / mean(row)) ⊗ rsqrt(col)
                                        var rowSum = 0.0
                                        for r in 0..<f.r { rowSum += Double(sm[rowBase + b * f.r + r]) }
                                        let rowMean = Float(rowSum / Double(f.r))
                                        for r in 0..<f.r {
                                            let rFactor = 1 / (sm[rowBase + b * f.r + r] / rowMean).squareRoot()
                                            for c in 0..<f.c {
                                                let cFactor = 1 / sm[colBase + b * f.c + c].squareRoot()
                                                let i = (b * f.r + r) * f.c + c
                                                update[i] = rFactor * cFactor * g[o + i]
                                            }
                                        }
                                    }
                                } else {
                                    let base = momentOffsets[e]
                                    for i in 0..<n {
                                        let gi = g[o + i]
                                        sm[base + i] = sm[base + i] * b2 + oneMinusB2 * (gi * gi + epsF)
                                        update[i] = (1 / sm[base + i].squareRoot()) * gi
                                    }
                                }
                                // update /= max(RMS(update) / clip_threshold, 1)
                                var usq = 0.0
                                for x in update { usq += Double(x) * Double(x) }
                                let updateRMS = Float(Float(usq.squareRoot()) / Float(Double(n).squareRoot()))
                                let divisor = max(updateRMS / Float(clipThreshold), 1)
                                let lrF = Float(lr)
                                for i in 0..<n { update[i] = update[i] / divisor * lrF }
                                if let beta1 {
                                    let b1 = Float(beta1), oneMinusB1 = Float(1 - beta1)
                                    for i in 0..<n {
                                        m[o + i] = m[o + i] * b1 + oneMinusB1 * update[i]
                                        update[i] = m[o + i]
                                    }
                                }
                                if weightDecay != 0 {
                                    let alpha = Float(-weightDecay * lr)
                                    for i in 0..<n { p[o + i] = p[o + i] + alpha * p[o + i] }
                                }
                                for i in 0..<n { p[o + i] = p[o + i] - update[i] }
                            }
                        }
                    }
                }
            }
        }
    }

    public func stateBlobs() -> StateBlobList {
        var blobs: StateBlobList = [
            ("step", StateBlob.bytes([Int64(stepCount)])),
            ("second_moment", StateBlob.bytes(secondMoment)),
            ("rms", StateBlob.bytes(rms)),
        ]
        if beta1 != nil { blobs.append(("exp_avg", StateBlob.bytes(expAvg))) }
        return blobs
    }

    public func restore(_ blobs: [String: [UInt8]]) throws {
        let step = try StateBlob.int64s(blobs, "step", count: 1, optimizer: name)[0]
        let v = try StateBlob.floats(blobs, "second_moment", count: secondMoment.count, optimizer: name)
        let r = try StateBlob.floats(blobs, "rms", count: rms.count, optimizer: name)
        let m = beta1 != nil ? try StateBlob.floats(blobs, "exp_avg", count: layout.totalCount, optimizer: name) : []
        stepCount = Int(step); secondMoment = v; rms = r; expAvg = m
    }

    /// What transformers' AdafactorSchedule reports: before the first step the given (initial) lrs, then
    /// `_get_lr` of each group's first tensor.
    public func effectiveLearningRates(_ learningRates: [Double]) -> [Double] {
        guard stepCount > 0 else { return learningRates }
        return learningRates.indices.map { group in
            guard let e = layout.entries.firstIndex(where: { $0.group == group }) else { return learningRates[group] }
            return learningRate(groupLR: learningRates[group], rms: rms[e], step: stepCount)
        }
    }
}
