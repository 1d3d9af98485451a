import Distributed
import Foundation

/// lion_pytorch.Lion 0.2.5 (`update_fn` in lion_pytorch/lion_pytorch.py), as kohya builds it:
/// `Lion(params, lr=learning_rate, **optimizer_args)`.
/// Args: betas=(0.9,0.99), weight_decay=0, use_triton (same math), decoupled_weight_decay=False
/// (then weight decay is divided by kohya's --learning_rate, the constructor's lr).
public final class Lion: Optimizer {
    public let name = "Lion"
    public let layout: ParameterLayout
    public let beta1: Double, beta2: Double
    /// The weight decay multiplied by lr each step (already divided by the initial lr when decoupled).
    public let weightDecay: Double
    public private(set) var stepCount: Int = 0
    var expAvg: [Float]  // [totalCount] momentum

    static let accepted = ["betas", "weight_decay", "use_triton", "decoupled_weight_decay"]

    public init(layout: ParameterLayout, betas: (Double, Double) = (0.9, 0.99), weightDecay: Double = 0) throws {
        guard (0...1).contains(betas.0), (0...1).contains(betas.1) else {
            throw OptimizerError("Lion: betas=(\(betas.0), \(betas.1)) must be in [0, 1]")
        }
        self.layout = layout
        beta1 = betas.0; beta2 = betas.1
        self.weightDecay = weightDecay
        expAvg = [Float](repeating: 0, count: layout.totalCount)
    }

    convenience init(layout: ParameterLayout, args: OptimizerArgs, baseLearningRate: Double?) throws {
        var a = args
        let betas = try a.doubles("betas", [0.9, 0.99], counts: 2...2)
        var wd = try a.double("weight_decay", 0)
        _ = try a.bool("use_triton", false)  // the triton kernel computes the same update
        let decoupled = try a.bool("decoupled_weight_decay", false)
        try a.finish(optimizer: "Lion (lion_pytorch.Lion)", accepted: Lion.accepted)
        if decoupled {
            guard let lr0 = baseLearningRate, lr0 > 0 else {
                throw OptimizerError(
                    "Lion decoupled_weight_decay=True divides weight_decay by --learning_rate; pass the base learning rate (> 0)")
            }
            wd /= lr0
        }
        try self.init(layout: layout, betas: (betas[0], betas[1]), weightDecay: wd)
    }

    public func step(parameters: inout [Float], gradients: [Float], learningRates: [Double]) {
        checkStepInputs(name, layout: layout, parameters: parameters.count, gradients: gradients.count,
                        learningRates: learningRates.count)
        stepCount += 1
        let b1 = Float(beta1), oneMinusB1 = Float(1 - beta1)
        let b2 = Float(beta2), oneMinusB2 = Float(1 - beta2)
        let entries = layout.entries
        let weightDecay = self.weightDecay
        parameters.withUnsafeMutableBufferPointer { p in
            gradients.withUnsafeBufferPointer { g in
                expAvg.withUnsafeMutableBufferPointer { m in
                    forEachEntryConcurrently(entries.count) { e in
                        let entry = entries[e]
                        let lr = learningRates[entry.group]
                        let decay = Float(1 - lr * weightDecay)
                        let negLr = Float(-lr)
                        for i in entry.offset..<(entry.offset + entry.count) {
                            p[i] *= decay
                            let c = m[i] * b1 + oneMinusB1 * g[i]
                            // torch.sgn: -1, 0 or 1
                            let sign: Float = c > 0 ? 1 : (c < 0 ? -1 : 0)
                            p[i] = p[i] + negLr * sign
                            m[i] = m[i] * b2 + oneMinusB2 * g[i]
                        }
                    }
                }
            }
        }
    }

    public func stateBlobs() -> StateBlobList {
        [("step", StateBlob.bytes([Int64(stepCount)])), ("exp_avg", StateBlob.bytes(expAvg))]
    }

    public func restore(_ blobs: [String: [UInt8]]) throws {
        let step = try StateBlob.int64s(blobs, "step", count: 1, optimizer: name)[0]
        let m = try StateBlob.floats(blobs, "exp_avg", count: layout.totalCount, optimizer: name)
        stepCount = Int(step); expAvg = m
    }

    public func effectiveLearningRates(_ learningRates: [Double]) -> [Double] { learningRates }
}
