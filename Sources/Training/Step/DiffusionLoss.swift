import Foundation
import Tensor

/// kohya --loss_type.
public enum LossType: String, Sendable, CaseIterable {
    case l2, l1, huber
    case smoothL1 = "smooth_l1"

    /// The kohya option value ("l2", "l1", "huber", "smooth_l1"), or an error naming the allowed ones.
    public init(kohyaName: String) throws {
        guard let value = LossType(rawValue: kohyaName) else {
            throw DiffusionStepError(option: "loss_type", problem: "unknown value \"\(kohyaName)\"; use one of \(LossType.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        self = value
    }
}

/// kohya --huber_schedule: how the huber / smooth_l1 threshold c depends on the timestep.
public enum HuberSchedule: String, Sendable, CaseIterable {
    case constant, exponential, snr

    public init(kohyaName: String) throws {
        guard let value = HuberSchedule(rawValue: kohyaName) else {
            throw DiffusionStepError(option: "huber_schedule", problem: "unknown value \"\(kohyaName)\"; use one of \(HuberSchedule.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        self = value
    }
}

/// The loss settings of kohya's train_network.py, with kohya's defaults. As in kohya, minSNRGamma and
/// vPredLikeLoss of nil or 0 are off.
public struct LossOptions: Sendable, Equatable {
    public var type: LossType
    public var huberSchedule: HuberSchedule
    public var huberC: Double
    public var huberScale: Double
    /// --min_snr_gamma (arXiv 2303.09556).
    public var minSNRGamma: Double?
    /// --v_parameterization: the model predicts v; the target is `NoiseSchedule.velocity`.
    public var vPrediction: Bool
    /// --scale_v_pred_loss_like_noise_pred
    public var scaleVPredLossLikeNoisePred: Bool
    /// --v_pred_like_loss
    public var vPredLikeLoss: Double?
    /// --debiased_estimation_loss (arXiv 2310.08442).
    public var debiasedEstimation: Bool

    public init(type: LossType = .l2, huberSchedule: HuberSchedule = .snr, huberC: Double = 0.1, huberScale: Double = 1.0,
                minSNRGamma: Double? = nil, vPrediction: Bool = false, scaleVPredLossLikeNoisePred: Bool = false,
                vPredLikeLoss: Double? = nil, debiasedEstimation: Bool = false) {
        self.type = type
        self.huberSchedule = huberSchedule
        self.huberC = huberC
        self.huberScale = huberScale
        self.minSNRGamma = minSNRGamma
        self.vPrediction = vPrediction
        self.scaleVPredLossLikeNoisePred = scaleVPredLossLikeNoisePred
        self.vPredLikeLoss = vPredLikeLoss
        self.debiasedEstimation = debiasedEstimation
    }

    /// Rejects values that give NaN or nonsense losses, naming the option and the fix.
    public func validate() throws {
        if type == .huber || type == .smoothL1 {
            if !(huberC > 0) || !huberC.isFinite {
                throw DiffusionStepError(option: "huber_c", problem: "\(huberC) must be a positive number (kohya's default is 0.1)")
            }
            if huberSchedule == .snr && huberC > 1 {
                throw DiffusionStepError(option: "huber_c", problem: "\(huberC) is above 1, which makes the snr schedule's threshold negative at low noise; use 0 < huber_c <= 1")
            }
            if !huberScale.isFinite || !(huberScale > 0) {
                throw DiffusionStepError(option: "huber_scale", problem: "\(huberScale) must be a positive number (kohya's default is 1.0)")
            }
        }
        if let gamma = minSNRGamma, !(gamma >= 0) || !gamma.isFinite {
            throw DiffusionStepError(option: "min_snr_gamma", problem: "\(gamma) must be a non-negative number (5 is the paper's recommendation)")
        }
        if let v = vPredLikeLoss, !v.isFinite {
            throw DiffusionStepError(option: "v_pred_like_loss", problem: "\(v) is not a finite number")
        }
    }
}

public enum DiffusionLoss {
    /// Forward and backward of kohya's loss (train_network.py NetworkTrainer.process_batch after the UNet call, and
    /// post_process_loss), in this order:
    ///   1. per element: conditional_loss(pred, target, loss_type, "none", huber_c), huber_c per sample from
    ///      get_huber_threshold_if_needed (library/train_util.py);
    ///   2. mean over C, H, W;
    ///   3. × sampleWeights (kohya's batch["loss_weights"], e.g. prior_loss_weight for regularization images);
    ///   4. apply_snr_weight (ε: min(SNR, γ)/SNR; v: min(SNR, γ)/(SNR + 1)),
    ///      scale_v_prediction_loss_like_noise_prediction, add_v_prediction_like_loss, apply_debiased_estimation
    ///      (library/custom_train_functions.py), each when configured;
    ///   5. mean over the batch.
    /// prediction, target: [B, ...] (the UNet output and ε or v); timesteps, sampleWeights: B entries.
    /// Returns the scalar loss, the B per-sample losses after step 4, and dLoss/dPrediction with the prediction's
    /// shape: the seed for the UNet's backward. fp32 values, double accumulators in a fixed order, so the result
    /// does not depend on thread count.
    public static func evaluate(prediction: Tensor, target: Tensor, timesteps: [Int], sampleWeights: [Float],
                                schedule: NoiseSchedule, options: LossOptions) -> (loss: Float, perSample: [Float], gradient: Tensor) {
        precondition(prediction.shape == target.shape,
                     "DiffusionLoss: prediction \(prediction.shape) and target \(target.shape) differ in shape")
        let batch = timesteps.count
        precondition(prediction.rank >= 1 && prediction.shape[0] == batch && sampleWeights.count == batch,
                     "DiffusionLoss: prediction \(prediction.shape), \(batch) timesteps and \(sampleWeights.count) sample weights disagree on the batch size")
        for t in timesteps {
            precondition(t >= 0 && t < schedule.trainSteps, "DiffusionLoss: timestep \(t) is outside 0..<\(schedule.trainSteps)")
        }
        let pred = prediction.scalars, tgt = target.scalars
        let perSampleCount = batch == 0 ? 0 : pred.count / batch
        let thresholds = huberThresholds(timesteps: timesteps, schedule: schedule, options: options)

        var gradient = [Float](repeating: 0, count: pred.count)
        var perSample = [Float](repeating: 0, count: batch)
        var total = 0.0
        for b in 0..<batch {
            let c = thresholds?[b] ?? 0
            let range = b * perSampleCount ..< (b + 1) * perSampleCount
            // Steps 1-2. gradient[i] holds d(element loss)/d(prediction) until it is scaled below.
            var sum = 0.0
            for i in range {
                let d = pred[i] - tgt[i]
                let (value, slope) = elementLoss(d, type: options.type, c: c)
                sum += Double(value)
                gradient[i] = slope
            }
            var loss = Float(sum / Double(perSampleCount))
            // Steps 3-4: each is loss ← loss · factor, so d(final)/d(mean) is the product of the factors.
            var chain = 1.0
            func scale(_ factor: Float) { loss = loss * factor; chain *= Double(factor) }
            scale(sampleWeights[b])
            let snr = schedule.snr(timesteps[b])
            // kohya get_snr_scale / apply_debiased_estimation clamp SNR at 1000 (it is inf at t=0 for some schedules).
            let clampedSNR = min(snr, 1000)
            if let gamma = options.minSNRGamma, gamma != 0 {
                let minSNRGamma = min(snr, Float(gamma))
                scale(options.vPrediction ? minSNRGamma / (snr + 1) : minSNRGamma / snr)
            }
            if options.scaleVPredLossLikeNoisePred {
                scale(clampedSNR / (clampedSNR + 1))
            }
            if let vLike = options.vPredLikeLoss, vLike != 0 {
                // loss + loss / scale * v_pred_like_loss, evaluated as kohya writes it.
                let snrScale = clampedSNR / (clampedSNR + 1)
                loss = loss + loss / snrScale * Float(vLike)
                chain *= 1 + Double(Float(vLike)) / Double(snrScale)
            }
            if options.debiasedEstimation {
                scale(options.vPrediction ? 1 / (clampedSNR + 1) : 1 / clampedSNR.squareRoot())
            }
            perSample[b] = loss
            total += Double(loss)
            // Step 5 and the mean of step 2: d(loss)/d(element) = 1/B · 1/(C·H·W) · chain.
            let seed = Float(chain / Double(batch) / Double(perSampleCount))
            for i in range { gradient[i] *= seed }
        }
        let loss = batch == 0 ? 0 : Float(total / Double(batch))
        return (loss, perSample, Tensor(shape: prediction.shape, gradient))
    }

    /// kohya get_huber_threshold_if_needed: the per-sample huber c (nil for l2 / l1), in fp32 as torch computes it.
    public static func huberThresholds(timesteps: [Int], schedule: NoiseSchedule, options: LossOptions) -> [Float]? {
        guard options.type == .huber || options.type == .smoothL1 else { return nil }
        switch options.huberSchedule {
        case .exponential:
            // alpha = -log(huber_c) / num_train_timesteps; torch.exp(-alpha * timesteps) * huber_scale.
            let alpha = -Foundation.log(options.huberC) / Double(schedule.trainSteps)
            return timesteps.map { Foundation.exp(Float(-alpha) * Float($0)) * Float(options.huberScale) }
        case .snr:
            // sigmas = ((1 - ᾱ) / ᾱ) ** 0.5; (1 - huber_c) / (1 + sigmas) ** 2 + huber_c. (huber_scale is unused.)
            return timesteps.map { t in
                let a = schedule.alphasCumprod[t]
                let sigma = ((1 - a) / a).squareRoot()
                return Float(1 - options.huberC) / ((1 + sigma) * (1 + sigma)) + Float(options.huberC)
            }
        case .constant:
            return [Float](repeating: Float(options.huberC * options.huberScale), count: timesteps.count)
        }
    }

    /// kohya conditional_loss for one difference d = prediction − target, with its derivative in d.
    @inline(__always)
    static func elementLoss(_ d: Float, type: LossType, c: Float) -> (value: Float, slope: Float) {
        switch type {
        case .l2:
            return (d * d, 2 * d)
        case .l1:
            // torch's l1 backward uses sign(d), which is 0 at d = 0.
            return (abs(d), d > 0 ? 1 : (d < 0 ? -1 : 0))
        case .huber:
            // 2c(√(d² + c²) − c)
            let root = (d * d + c * c).squareRoot()
            return (2 * c * (root - c), 2 * c * d / root)
        case .smoothL1:
            // 2(√(d² + c²) − c)
            let root = (d * d + c * c).squareRoot()
            return (2 * (root - c), 2 * d / root)
        }
    }
}
