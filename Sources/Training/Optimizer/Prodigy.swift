import Distributed
import Foundation

/// prodigyopt.Prodigy 1.1.2 (prodigyopt/prodigy.py `Prodigy.step`), Adam with a D-adapted step size,
/// as kohya builds it: `Prodigy(params, lr=learning_rate, **optimizer_args)`; kohya recommends lr=1.
/// Args: betas=(0.9,0.999), beta3=None (sqrt(beta2)), eps=1e-8, weight_decay=0, decouple=True,
/// use_bias_correction=False, safeguard_warmup=False, d0=1e-6, d_coef=1, growth_rate=inf,
/// fsdp_in_use=False (only False: gradients here are already all-reduced), slice_p=1.
///
/// Like prodigyopt, all groups share one d; groups must use the same learning rate or 0 (prodigyopt raises
/// otherwise). Reductions (dot products, |s| sums) are taken per tensor in Double, rounded to Float as
/// torch's fp32 `.item()` would be, and summed in layout order, so d does not depend on thread count.
public final class Prodigy: Optimizer {
    public let name = "Prodigy"
    public let layout: ParameterLayout
    public let beta1: Double, beta2: Double, beta3: Double, eps: Double, weightDecay: Double
    public let decouple: Bool, useBiasCorrection: Bool, safeguardWarmup: Bool
    public let d0: Double, dCoef: Double, growthRate: Double, sliceP: Int

    /// The D estimate (prodigyopt's group["d"]), its running max and the numerator's running sum.
    public private(set) var d: Double
    public private(set) var dMax: Double
    public private(set) var dNumerator: Double = 0
    /// prodigyopt's group["k"]: completed updates (not counting steps skipped because d_denom was 0).
    public private(set) var k: Int = 0
    /// Whether the per-tensor state exists yet (prodigyopt creates it, p0 included, on the first step).
    var initialized = false
    var s: [Float]        // [slicedCount] running sum of sliced gradients
    var p0: [Float]       // [slicedCount] sliced parameters at the first step
    var expAvg: [Float]   // [totalCount] (empty when beta1 == 0)
    var expAvgSq: [Float] // [totalCount]
    /// Start of each entry's slice in `s`/`p0` ([entries.count]), and the total.
    let sliceOffsets: [Int]
    let slicedCount: Int

    static let accepted = ["betas", "beta3", "eps", "weight_decay", "decouple", "use_bias_correction",
                           "safeguard_warmup", "d0", "d_coef", "growth_rate", "fsdp_in_use", "slice_p"]

    public init(layout: ParameterLayout, betas: (Double, Double) = (0.9, 0.999), beta3: Double? = nil,
                eps: Double = 1e-8, weightDecay: Double = 0, decouple: Bool = true, useBiasCorrection: Bool = false,
                safeguardWarmup: Bool = false, d0: Double = 1e-6, dCoef: Double = 1, growthRate: Double = .infinity,
                sliceP: Int = 1) throws {
        guard d0 > 0 else { throw OptimizerError("Prodigy: d0=\(d0) must be > 0") }
        guard eps > 0 else { throw OptimizerError("Prodigy: eps=\(eps) must be > 0") }
        guard (0..<1).contains(betas.0), (0..<1).contains(betas.1) else {
            throw OptimizerError("Prodigy: betas=(\(betas.0), \(betas.1)) must be in [0, 1)")
        }
        guard sliceP >= 1 else { throw OptimizerError("Prodigy: slice_p=\(sliceP) must be >= 1") }
        self.layout = layout
        beta1 = betas.0; beta2 = betas.1
        self.beta3 = beta3 ?? betas.1.squareRoot()
        self.eps = eps; self.weightDecay = weightDecay; self.decouple = decouple
        self.useBiasCorrection = useBiasCorrection; self.safeguardWarmup = safeguardWarmup
        self.d0 = d0; self.dCoef = dCoef; self.growthRate = growthRate; self.sliceP = sliceP
        d = d0; dMax = d0
        var offsets: [Int] = []
        var total = 0
        for e in layout.entries {
            offsets.append(total)
            total += (e.count + sliceP - 1) / sliceP  // len(flatten()[::slice_p])
        }
        sliceOffsets = offsets; slicedCount = total
        s = [Float](repeating: 0, count: total)
        p0 = [Float](repeating: 0, count: total)
        expAvg = betas.0 > 0 ? [Float](repeating: 0, count: layout.totalCount) : []
        expAvgSq = [Float](repeating: 0, count: layout.totalCount)
    }

    convenience init(layout: ParameterLayout, args: OptimizerArgs) throws {
        var a = args
        let betas = try a.doubles("betas", [0.9, 0.999], counts: 2...2)
        let beta3 = try a.optionalDouble("beta3", nil)
        let eps = try a.double("eps", 1e-8)
        let wd = try a.double("weight_decay", 0)
        let decouple = try a.bool("decouple", true)
        let bias = try a.bool("use_bias_correction", false)
        let safeguard = try a.bool("safeguard_warmup", false)
        let d0 = try a.double("d0", 1e-6)
        let dCoef = try a.double("d_coef", 1)
        let growth = try a.double("growth_rate", .infinity)
        let fsdp = try a.bool("fsdp_in_use", false)
        let sliceP = try a.int("slice_p", 1)
        try a.finish(optimizer: "Prodigy (prodigyopt.Prodigy)", accepted: Prodigy.accepted)
        if fsdp {
            throw OptimizerError("Prodigy fsdp_in_use=True is not supported: gradients reach the optimizer already all-reduced; leave it False")
        }
        try self.init(layout: layout, betas: (betas[0], betas[1]), beta3: beta3, eps: eps, weightDecay: wd,
                      decouple: decouple, useBiasCorrection: bias, safeguardWarmup: safeguard, d0: d0, dCoef: dCoef,
                      growthRate: growth, sliceP: sliceP)
    }

    public func validate(learningRates: [Double]) throws {
        let lr = learningRates.max() ?? 0
        if let bad = learningRates.firstIndex(where: { $0 != lr && $0 != 0 }) {
            throw OptimizerError(
                "Prodigy: group '\(layout.groupNames[bad])' has learning rate \(learningRates[bad]) but the largest is \(lr); "
                    + "prodigyopt only allows one learning rate (or 0) across groups: set unet_lr and text_encoder_lr equal (kohya recommends 1.0)")
        }
    }

    public func step(parameters: inout [Float], gradients: [Float], learningRates: [Double]) {
        checkStepInputs(name, layout: layout, parameters: parameters.count, gradients: gradients.count,
                        learningRates: learningRates.count)
        do { try validate(learningRates: learningRates) } catch { fatalError("\(error)") }
        let lr = learningRates.max() ?? 0
        let biasCorrection = useBiasCorrection
            ? pow(1 - pow(beta2, Double(k + 1)), 0.5) / (1 - pow(beta1, Double(k + 1))) : 1
        let dlr = d * lr * biasCorrection
        let entries = layout.entries
        let sliceP = self.sliceP
        let d = self.d, d0 = self.d0

        // prodigyopt keeps p0 = the parameters at the first step (a 0-d zero when the tensor is all zeros,
        // which acts the same as zeros in the dot product).
        if !initialized {
            for (e, entry) in entries.enumerated() {
                var j = sliceOffsets[e]
                for i in stride(from: entry.offset, to: entry.offset + entry.count, by: sliceP) {
                    p0[j] = parameters[i]; j += 1
                }
            }
            initialized = true
        }

        // Coupled weight decay changes the gradient itself (grad.add_(p, alpha=decay)) before everything else.
        var grads = gradients
        if weightDecay != 0 && !decouple {
            let wd = Float(weightDecay)
            for i in 0..<grads.count { grads[i] = grads[i] + wd * parameters[i] }
        }

        var numeratorParts = [Double](repeating: 0, count: entries.count)
        var denomParts = [Double](repeating: 0, count: entries.count)
        let expAvgF1 = Float(d * (1 - beta1)), sqF = Float(d * d * (1 - beta2))
        let b1 = Float(beta1), b2 = Float(beta2), b3 = Float(beta3)
        let sAlpha = Float(safeguardWarmup ? (d / d0) * d : (d / d0) * dlr)
        let useFirstMoment = beta1 > 0
        parameters.withUnsafeMutableBufferPointer { p in
            grads.withUnsafeBufferPointer { g in
                expAvg.withUnsafeMutableBufferPointer { m in
                    expAvgSq.withUnsafeMutableBufferPointer { v in
                        s.withUnsafeMutableBufferPointer { sv in
                            p0.withUnsafeBufferPointer { p0v in
                                numeratorParts.withUnsafeMutableBufferPointer { num in
                                    denomParts.withUnsafeMutableBufferPointer { den in
                                        forEachEntryConcurrently(entries.count) { e in
                                            let entry = entries[e]
                                            guard learningRates[entry.group] > 0 else { return }
                                            let end = entry.offset + entry.count
                                            // torch.dot(sliced_grad, p0 - sliced_p) (fp32 result)
                                            var dot = 0.0
                                            var j = sliceOffsets[e]
                                            for i in stride(from: entry.offset, to: end, by: sliceP) {
                                                dot += Double(g[i]) * Double(p0v[j] - p[i]); j += 1
                                            }
                                            num[e] = (d / d0) * dlr * Double(Float(dot))
                                            for i in entry.offset..<end {
                                                if useFirstMoment { m[i] = m[i] * b1 + expAvgF1 * g[i] }
                                                v[i] = v[i] * b2 + sqF * g[i] * g[i]
                                            }
                                            var absSum = 0.0
                                            j = sliceOffsets[e]
                                            for i in stride(from: entry.offset, to: end, by: sliceP) {
                                                sv[j] = sv[j] * b3 + sAlpha * g[i]
                                                absSum += Double(abs(sv[j])); j += 1
                                            }
                                            den[e] = Double(Float(absSum))
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        var deltaNumerator = 0.0, dDenom = 0.0
        for e in 0..<entries.count { deltaNumerator += numeratorParts[e]; dDenom += denomParts[e] }
        // prodigyopt returns here without touching the parameters (and without counting the step)
        if dDenom == 0 { return }

        var newD = d
        if lr > 0 {
            let globalNumerator = dNumerator * beta3 + deltaNumerator
            let dHat = dCoef * globalNumerator / dDenom
            if newD == d0 { newD = max(newD, dHat) }
            dMax = max(dMax, dHat)
            newD = min(dMax, newD * growthRate)
            dNumerator = globalNumerator
        }
        self.d = newD

        let denomEps = Float(newD * eps)
        let decayAlpha = Float(-weightDecay * dlr)
        let negDlr = Float(-dlr), negDlrD = Float(-dlr * newD)
        let decoupledDecay = weightDecay != 0 && decouple
        parameters.withUnsafeMutableBufferPointer { p in
            grads.withUnsafeBufferPointer { g in
                expAvg.withUnsafeBufferPointer { m in
                    expAvgSq.withUnsafeBufferPointer { v in
                        forEachEntryConcurrently(entries.count) { e in
                            let entry = entries[e]
                            for i in entry.offset..<(entry.offset + entry.count) {
                                let denom = v[i].squareRoot() + denomEps
                                if decoupledDecay { p[i] = p[i] + decayAlpha * p[i] }
                                if useFirstMoment {
                                    p[i] = p[i] + negDlr * (m[i] / denom)
                                } else {
                                    p[i] = p[i] + negDlrD * (g[i] / denom)
                                }
                            }
                        }
                    }
                }
            }
        }
        k += 1
    }

    public func stateBlobs() -> StateBlobList {
        var blobs: StateBlobList = [
            ("scalars", StateBlob.bytes([d, dMax, dNumerator])),
            ("k_initialized", StateBlob.bytes([Int64(k), initialized ? 1 : 0])),
            ("s", StateBlob.bytes(s)),
            ("p0", StateBlob.bytes(p0)),
            ("exp_avg_sq", StateBlob.bytes(expAvgSq)),
        ]
        if beta1 > 0 { blobs.append(("exp_avg", StateBlob.bytes(expAvg))) }
        return blobs
    }

    public func restore(_ blobs: [String: [UInt8]]) throws {
        let scalars = try StateBlob.doubles(blobs, "scalars", count: 3, optimizer: name)
        let ki = try StateBlob.int64s(blobs, "k_initialized", count: 2, optimizer: name)
        let sv = try StateBlob.floats(blobs, "s", count: slicedCount, optimizer: name)
        let p0v = try StateBlob.floats(blobs, "p0", count: slicedCount, optimizer: name)
        let v = try StateBlob.floats(blobs, "exp_avg_sq", count: layout.totalCount, optimizer: name)
        let m = beta1 > 0 ? try StateBlob.floats(blobs, "exp_avg", count: layout.totalCount, optimizer: name) : []
        d = scalars[0]; dMax = scalars[1]; dNumerator = scalars[2]
        k = Int(ki[0]); initialized = ki[1] != 0
        s = sv; p0 = p0v; expAvgSq = v; expAvg = m
    }

    /// kohya logs d·lr for Prodigy.
    public func effectiveLearningRates(_ learningRates: [Double]) -> [Double] { learningRates.map { d * $0 } }
}
