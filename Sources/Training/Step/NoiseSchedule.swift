import Foundation
import Tensor

/// A bad noise / loss setting, named with the kohya option it came from and what to do about it.
public struct DiffusionStepError: Error, CustomStringConvertible, Equatable {
    public let option: String
    public let problem: String
    public var description: String { "\(option): \(problem)" }
    public init(option: String, problem: String) { self.option = option; self.problem = problem }
}

/// The DDPM forward-process schedule SDXL was trained with, as kohya builds it in train_network.py
/// `NetworkTrainer.get_noise_scheduler`: diffusers `DDPMScheduler(beta_start=0.00085, beta_end=0.012,
/// beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False)`, then
/// `prepare_scheduler_for_custom_training` (all_snr), then optionally
/// `fix_noise_scheduler_betas_for_zero_terminal_snr` (library/custom_train_functions.py).
///
/// Every value is computed with the same fp32 operations torch performs (betas from a float32 linspace of the
/// square roots, squared; cumprod accumulated in double and rounded per element as torch's CPU cumprod does), so
/// the tables agree with PyTorch's to the last bit or so.
public struct NoiseSchedule: Sendable {
    public let trainSteps: Int
    public let zeroTerminalSNR: Bool
    /// ᾱ_t for t in 0..<trainSteps: what add_noise / get_velocity / the huber "snr" schedule use. With
    /// zeroTerminalSNR the last entry is exactly 0.
    public let alphasCumprod: [Float]
    /// kohya's `noise_scheduler.all_snr`: ᾱ/(1−ᾱ) per timestep. kohya computes it in get_noise_scheduler BEFORE
    /// the zero-terminal-SNR fix, so it always comes from the unfixed schedule (min-SNR, debiased estimation and
    /// the v-prediction scalings therefore never see SNR = 0); we keep that behaviour so losses match kohya's.
    public let allSNR: [Float]

    public init(trainSteps: Int = 1000, betaStart: Double = 0.00085, betaEnd: Double = 0.012, zeroTerminalSNR: Bool = false) {
        precondition(trainSteps >= 1, "NoiseSchedule needs at least one train step, got \(trainSteps)")
        precondition(!zeroTerminalSNR || trainSteps >= 2, "zero terminal SNR needs at least two train steps")
        self.trainSteps = trainSteps
        self.zeroTerminalSNR = zeroTerminalSNR
        // diffusers betas_for scaled_linear: torch.linspace(beta_start**0.5, beta_end**0.5, N, dtype=float32) ** 2.
        // torch's CPU linspace fills the first half as start + step·i and the second half as end − step·(N−1−i),
        // each with one rounding (its x86 build contracts them to fused multiply-adds; checked bit for bit against
        // torch 2.13 by the fixture test), in fp32.
        let start = Float(betaStart.squareRoot()), end = Float(betaEnd.squareRoot())
        let step = trainSteps > 1 ? (end - start) / Float(trainSteps - 1) : 0
        let halfway = trainSteps / 2
        let betas: [Float] = (0..<trainSteps).map { i in
            let root = i < halfway ? start.addingProduct(step, Float(i)) : end.addingProduct(-step, Float(trainSteps - i - 1))
            return root * root
        }
        let baseCumprod = NoiseSchedule.cumprod(betas.map { 1 - $0 })
        // prepare_scheduler_for_custom_training: all_snr = (sqrt(ᾱ) / sqrt(1 − ᾱ)) ** 2 in fp32.
        allSNR = baseCumprod.map { a in
            let ratio = a.squareRoot() / (1 - a).squareRoot()
            return ratio * ratio
        }
        alphasCumprod = zeroTerminalSNR ? NoiseSchedule.zeroTerminalCumprod(betas: betas) : baseCumprod
    }

    /// kohya `all_snr[t]` (see `allSNR`).
    public func snr(_ t: Int) -> Float {
        precondition(t >= 0 && t < trainSteps, "timestep \(t) is outside 0..<\(trainSteps)")
        return allSNR[t]
    }

    /// diffusers DDPMScheduler.add_noise: √ᾱ_t · latents + √(1 − ᾱ_t) · noise, one timestep per sample.
    /// latents, noise: [B, C, H, W] (any rank ≥ 1 with the batch first); timesteps: B entries.
    public func addNoise(_ latents: Tensor, noise: Tensor, timesteps: [Int]) -> Tensor {
        mix(latents, noise, timesteps: timesteps, what: "addNoise") { sqrtA, sqrtOneMinusA, x, n in
            sqrtA * x + sqrtOneMinusA * n
        }
    }

    /// diffusers DDPMScheduler.get_velocity: √ᾱ_t · noise − √(1 − ᾱ_t) · latents (the v-prediction target).
    public func velocity(_ latents: Tensor, noise: Tensor, timesteps: [Int]) -> Tensor {
        mix(latents, noise, timesteps: timesteps, what: "velocity") { sqrtA, sqrtOneMinusA, x, n in
            sqrtA * n - sqrtOneMinusA * x
        }
    }

    /// What the UNet is trained to predict (kohya NetworkTrainer.get_noise_pred_and_target): the velocity for
    /// v-prediction models, the noise itself for ε-prediction. [B, C, H, W].
    public func target(latents: Tensor, noise: Tensor, timesteps: [Int], vPrediction: Bool) -> Tensor {
        vPrediction ? velocity(latents, noise: noise, timesteps: timesteps) : noise
    }

    private func mix(_ latents: Tensor, _ noise: Tensor, timesteps: [Int], what: String,
                     _ f: (Float, Float, Float, Float) -> Float) -> Tensor {
        precondition(latents.shape == noise.shape, "\(what): latents \(latents.shape) and noise \(noise.shape) differ in shape")
        precondition(latents.rank >= 1 && latents.shape[0] == timesteps.count,
                     "\(what): \(timesteps.count) timesteps for a batch of shape \(latents.shape)")
        let x = latents.scalars, n = noise.scalars
        let perSample = timesteps.isEmpty ? 0 : x.count / timesteps.count
        var out = [Float](repeating: 0, count: x.count)
        for (b, t) in timesteps.enumerated() {
            precondition(t >= 0 && t < trainSteps, "\(what): timestep \(t) is outside 0..<\(trainSteps)")
            // diffusers: alphas_cumprod[t] ** 0.5 and (1 - alphas_cumprod[t]) ** 0.5, in the samples' fp32.
            let a = alphasCumprod[t]
            let sqrtA = a.squareRoot(), sqrtOneMinusA = (1 - a).squareRoot()
            for i in b * perSample ..< (b + 1) * perSample { out[i] = f(sqrtA, sqrtOneMinusA, x[i], n[i]) }
        }
        return Tensor(shape: latents.shape, out)
    }

    /// torch.cumprod on a CPU float32 tensor: a double accumulator, each prefix rounded to float.
    static func cumprod(_ values: [Float]) -> [Float] {
        var acc = 1.0
        return values.map { v in acc *= Double(v); return Float(acc) }
    }

    /// kohya fix_noise_scheduler_betas_for_zero_terminal_snr (arXiv 2305.08891, Algorithm 1), op for op in fp32:
    /// shift √ᾱ so the last step is 0, rescale so the first is unchanged, turn back into betas, and recompute
    /// alphas_cumprod from them.
    static func zeroTerminalCumprod(betas: [Float]) -> [Float] {
        var sqrtBar = cumprod(betas.map { 1 - $0 }).map { $0.squareRoot() }
        let first = sqrtBar[0], last = sqrtBar[sqrtBar.count - 1]
        let rescale = first / (first - last)
        for i in sqrtBar.indices { sqrtBar[i] -= last }
        for i in sqrtBar.indices { sqrtBar[i] *= rescale }
        let bar = sqrtBar.map { $0 * $0 }
        let fixedBetas: [Float] = bar.indices.map { i in 1 - (i == 0 ? bar[0] : bar[i] / bar[i - 1]) }
        return cumprod(fixedBetas.map { 1 - $0 })
    }
}
