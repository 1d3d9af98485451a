import Distributed
import Foundation

/// torch.optim.AdamW (kohya's default optimizer), single-tensor CPU path
/// (torch/optim/adam.py `_single_tensor_adam` with decoupled weight decay), in fp32 like torch with the
/// same per-step scalars computed in Double.
/// Args: betas=(0.9,0.999), eps=1e-8, weight_decay=0.01, amsgrad=False.
public final class AdamW: Optimizer {
    public let name = "AdamW"
    public let layout: ParameterLayout
    public let beta1: Double, beta2: Double, eps: Double, weightDecay: Double, amsgrad: Bool
    /// Number of updates done (torch's `state["step"]`, the same for every tensor here).
    public private(set) var stepCount: Int = 0
    var expAvg: [Float]      // [totalCount] first moment
    var expAvgSq: [Float]    // [totalCount] second moment
    var maxExpAvgSq: [Float] // [totalCount] when amsgrad, else []

    static let accepted = ["betas", "eps", "weight_decay", "amsgrad"]

    public init(layout: ParameterLayout, betas: (Double, Double) = (0.9, 0.999), eps: Double = 1e-8,
                weightDecay: Double = 0.01, amsgrad: Bool = false) throws {
        guard eps >= 0 else { throw OptimizerError("AdamW: eps=\(eps) must be >= 0") }
        guard (0..<1).contains(betas.0), (0..<1).contains(betas.1) else {
            throw OptimizerError("AdamW: betas=(\(betas.0), \(betas.1)) must be in [0, 1)")
        }
        guard weightDecay >= 0 else { throw OptimizerError("AdamW: weight_decay=\(weightDecay) must be >= 0") }
        self.layout = layout
        beta1 = betas.0; beta2 = betas.1
        self.eps = eps; self.weightDecay = weightDecay; self.amsgrad = amsgrad
        expAvg = [Float](repeating: 0, count: layout.totalCount)
        expAvgSq = [Float](repeating: 0, count: layout.totalCount)
        maxExpAvgSq = amsgrad ? [Float](repeating: 0, count: layout.totalCount) : []
    }

    /// torch.optim.AdamW arguments that pick an implementation (foreach/fused kernels, CUDA-graph capture, autograd
    /// through the step) and leave the update unchanged.
    public static let runtimeOnly = ["foreach", "fused", "capturable", "differentiable"]

    convenience init(layout: ParameterLayout, args: OptimizerArgs) throws {
        var a = args
        let betas = try a.doubles("betas", [0.9, 0.999], counts: 2...2)
        let eps = try a.double("eps", 1e-8)
        let wd = try a.double("weight_decay", 0.01)
        let ams = try a.bool("amsgrad", false)
        // torch.optim.AdamW's implementation switches (which kernel runs, not what it computes): accepted, unused.
        for runtime in AdamW.runtimeOnly { _ = try a.bool(runtime, false) }
        guard try !a.bool("maximize", false) else {
            throw OptimizerError("--optimizer_args maximize=True (gradient ascent) is not implemented in lora-dist's AdamW")
        }
        try a.finish(optimizer: "AdamW (torch.optim.AdamW)", accepted: AdamW.accepted + AdamW.runtimeOnly + ["maximize"])
        try self.init(layout: layout, betas: (betas[0], betas[1]), eps: eps, weightDecay: wd, amsgrad: ams)
    }

    public func step(parameters: inout [Float], gradients: [Float], learningRates: [Double]) {
        checkStepInputs(name, layout: layout, parameters: parameters.count, gradients: gradients.count,
                        learningRates: learningRates.count)
        stepCount += 1
        let step = Double(stepCount)
        let biasCorrection1 = 1 - pow(beta1, step)
        let biasCorrection2Sqrt = (1 - pow(beta2, step)).squareRoot()
        let lerpWeight = Float(1 - beta1)
        let beta2F = Float(beta2), oneMinusBeta2 = Float(1 - beta2)
        let bc2SqrtF = Float(biasCorrection2Sqrt), epsF = Float(eps)
        let amsgrad = self.amsgrad
        let entries = layout.entries
        parameters.withUnsafeMutableBufferPointer { p in
            gradients.withUnsafeBufferPointer { g in
                expAvg.withUnsafeMutableBufferPointer { m in
                    expAvgSq.withUnsafeMutableBufferPointer { v in
                        maxExpAvgSq.withUnsafeMutableBufferPointer { vmax in
                            forEachEntryConcurrently(entries.count) { e in
                                let entry = entries[e]
                                let lr = learningRates[entry.group]
                                let decay = Float(1 - lr * weightDecay)
                                let negStepSize = Float(-(lr / biasCorrection1))
                                for i in entry.offset..<(entry.offset + entry.count) {
                                    if weightDecay != 0 { p[i] *= decay }
                                    let gi = g[i]
                                    // torch lerp: weight < 0.5 ? self + w*(end-self) : end - (end-self)*(1-w)
                                    if lerpWeight < 0.5 {
                                        m[i] = m[i] + lerpWeight * (gi - m[i])
                                    } else {
                                        m[i] = gi - (gi - m[i]) * (1 - lerpWeight)
                                    }
                                    v[i] = v[i] * beta2F + oneMinusBeta2 * gi * gi
                                    var second = v[i]
                                    if amsgrad {
                                        vmax[i] = max(vmax[i], v[i])
                                        second = vmax[i]
                                    }
                                    let denom = second.squareRoot() / bc2SqrtF + epsF
                                    p[i] = p[i] + negStepSize * (m[i] / denom)
                                }
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
            ("exp_avg", StateBlob.raw(expAvg)),
            ("exp_avg_sq", StateBlob.raw(expAvgSq)),
        ]
        if amsgrad { blobs.append(("max_exp_avg_sq", StateBlob.raw(maxExpAvgSq))) }
        return blobs
    }

    public func restore(_ blobs: [String: [UInt8]]) throws {
        let n = layout.totalCount
        let step = try StateBlob.int64s(blobs, "step", count: 1, optimizer: name)[0]
        let m = try StateBlob.floats(blobs, "exp_avg", count: n, optimizer: name)
        let v = try StateBlob.floats(blobs, "exp_avg_sq", count: n, optimizer: name)
        let vmax = amsgrad ? try StateBlob.floats(blobs, "max_exp_avg_sq", count: n, optimizer: name) : []
        stepCount = Int(step); expAvg = m; expAvgSq = v; maxExpAvgSq = vmax
    }

    public func effectiveLearningRates(_ learningRates: [Double]) -> [Double] { learningRates }
}
