import Foundation
import Tensor

/// The samplers `lora-dist generate` and training-time sampling offer, each a port of the diffusers scheduler of the
/// same name as StableDiffusionXLPipeline runs it with SDXL's scheduler config (scaled_linear betas 0.00085…0.012,
/// 1000 train steps, "leading" timestep spacing, steps_offset 1, set_alpha_to_one false, clip_sample false):
///
/// | kind | diffusers class | A1111 / ComfyUI name |
/// |---|---|---|
/// | `eulerAncestral` | EulerAncestralDiscreteScheduler | Euler a / euler_ancestral |
/// | `euler` | EulerDiscreteScheduler | Euler / euler |
/// | `dpmpp2m` | DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint, lower_order_final) | DPM++ 2M / dpmpp_2m |
/// | `ddim` | DDIMScheduler (eta 0) | DDIM / ddim |
///
/// `karras` (Euler, DPM++ 2M) is diffusers' `use_karras_sigmas=True` (k-diffusion's Karras et al. ρ = 7 ramp).
public enum SamplerKind: String, CaseIterable, Sendable {
    case eulerAncestral = "euler_a"
    case euler = "euler"
    case dpmpp2m = "dpm++_2m"
    case ddim = "ddim"

    /// The name A1111 writes in its "parameters" text (and users type).
    public var displayName: String {
        switch self {
        case .eulerAncestral: return "Euler a"
        case .euler: return "Euler"
        case .dpmpp2m: return "DPM++ 2M"
        case .ddim: return "DDIM"
        }
    }
}

/// How the UNet's output is read: ε (noise) or v (velocity, e.g. NoobAI-XL V-Pred).
public enum PredictionType: String, Sendable { case epsilon, vPrediction = "v_prediction" }

/// diffusers' `timestep_spacing` (Table 2 of arXiv 2305.08891). SDXL's config says "leading"; "trailing" is what
/// zero-terminal-SNR models are usually sampled with (it starts at t = 999).
public enum TimestepSpacing: String, CaseIterable, Sendable { case leading, trailing }

public struct SamplerError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// A sampler as the user names it: kind + Karras sigmas.
public struct SamplerChoice: Equatable, Sendable, CustomStringConvertible {
    public var kind: SamplerKind
    public var karras: Bool

    public init(kind: SamplerKind, karras: Bool = false) throws {
        if karras && (kind == .eulerAncestral || kind == .ddim) {
            throw SamplerError("\(kind.displayName) has no Karras sigmas (diffusers' \(kind == .ddim ? "DDIMScheduler" : "EulerAncestralDiscreteScheduler") offers none); Karras works with euler and dpm++_2m")
        }
        self.kind = kind
        self.karras = karras
    }

    public var description: String { kind.displayName + (karras ? " Karras" : "") }

    /// Accepted spellings: ours (euler_a, euler, dpm++_2m, dpm++_2m_karras, ddim, euler_karras), A1111's display names
    /// ("Euler a", "DPM++ 2M Karras"), ComfyUI's (euler_ancestral, dpmpp_2m) and kohya's sample_sampler values that
    /// are these samplers (k_euler_a, k_euler, dpmsolver++).
    public static let names: [String: (SamplerKind, Bool)] = {
        var table: [String: (SamplerKind, Bool)] = [:]
        for (k, spellings) in [(SamplerKind.eulerAncestral, ["euler_a", "k_euler_a", "euler_ancestral", "euler a"]),
                               (.euler, ["euler", "k_euler"]),
                               (.dpmpp2m, ["dpm++_2m", "dpmpp_2m", "dpm++ 2m", "dpmsolver++", "dpmpp2m"]),
                               (.ddim, ["ddim"])] {
            for s in spellings {
                table[s] = (k, false)
                if k == .euler || k == .dpmpp2m {
                    table[s + "_karras"] = (k, true)
                    table[s + " karras"] = (k, true)
                }
            }
        }
        return table
    }()

    /// Parses a sampler name (case-insensitive); the error lists what is offered.
    public init(parsing name: String) throws {
        let key = name.trimmingCharacters(in: .whitespaces).lowercased()
        guard let (kind, karras) = SamplerChoice.names[key] else {
            let kohyaOthers = ["pndm", "lms", "k_lms", "heun", "dpm_2", "k_dpm_2", "dpm_2_a", "k_dpm_2_a", "dpmsolver", "dpmsingle", "ddpm"]
            let hint = kohyaOthers.contains(key) ? " (kohya's \(key) is not implemented in lora-dist)" : ""
            throw SamplerError("unknown sampler '\(name)'\(hint): use euler_a, euler, euler_karras, dpm++_2m, dpm++_2m_karras or ddim")
        }
        try self.init(kind: kind, karras: karras)
    }
}

/// One generation's schedule and update rule: the timesteps the UNet sees, the sigmas (Euler/DPM) and the step that
/// turns a model output into the next latents — op for op as the diffusers scheduler does it in fp32, so a run with
/// the same initial (and, for Euler a, per-step) noise ends on diffusers' latents.
public struct Sampler: Sendable {
    public let choice: SamplerChoice
    public let prediction: PredictionType
    public let steps: Int
    /// What the UNet is given at step i (float: Euler with Karras sigmas uses fractional timesteps).
    public let timesteps: [Float]
    /// σ_i for i in 0...steps, the last 0 (Euler, Euler a, DPM++ 2M); empty for DDIM.
    public let sigmas: [Float]
    /// The initial latents are unit noise times this (diffusers' `init_noise_sigma`).
    public let initNoiseSigma: Float
    /// diffusers' alphas_cumprod (with zero-terminal-SNR rescaling: the last entry 2⁻²⁴ for Euler/DPM, 0 for DDIM).
    let alphasCumprod: [Float]
    let ddimStride: Int
    /// DPM++ 2M: the previous step's x₀ prediction.
    private var previousX0: [Float]?

    public init(_ choice: SamplerChoice, steps: Int, prediction: PredictionType = .epsilon, zeroTerminalSNR: Bool = false,
                spacing: TimestepSpacing = .leading, stepsOffset: Int = 1, schedule: NoiseSchedule? = nil) throws {
        guard steps >= 1 && steps <= 1000 else { throw SamplerError("steps \(steps): use 1 to 1000") }
        let schedule = schedule ?? NoiseSchedule(zeroTerminalSNR: zeroTerminalSNR)
        let trainSteps = schedule.trainSteps
        self.choice = choice
        self.prediction = prediction
        self.steps = steps
        var ac = schedule.alphasCumprod
        // diffusers (Euler, Euler a, DPM): `if rescale_betas_zero_snr: alphas_cumprod[-1] = 2**-24` so σ stays finite.
        if schedule.zeroTerminalSNR && choice.kind != .ddim { ac[trainSteps - 1] = 0x1p-24 }
        alphasCumprod = ac
        ddimStride = trainSteps / steps

        // σ(t) = ((1 − ᾱ) / ᾱ) ** 0.5 in fp32, as a float32 numpy array (diffusers set_timesteps).
        let allSigmas: [Float] = ac.map { (((1 - $0) / $0)).squareRoot() }
        let logSigmas: [Float] = allSigmas.map { Float(log(Double($0))) }   // np.log of a float32 array: float32

        switch choice.kind {
        case .ddim:
            timesteps = Sampler.spacedTimesteps(steps, trainSteps: trainSteps, spacing: spacing, stepsOffset: stepsOffset).map(Float.init)
            sigmas = []
            initNoiseSigma = 1
        case .euler, .eulerAncestral:
            // Euler[Ancestral]DiscreteScheduler.set_timesteps: float32 timesteps, σ by np.interp (float64) at them.
            let ts = Sampler.spacedTimesteps(steps, trainSteps: trainSteps, spacing: spacing, stepsOffset: stepsOffset).map(Double.init)
            var s = ts.map { Sampler.interp($0, allSigmas) }
            var t = ts
            if choice.karras {
                s = Sampler.karras(sigmaMin: s[s.count - 1], sigmaMax: s[0], steps: steps)
                t = s.map { Sampler.sigmaToT($0, logSigmas: logSigmas) }
            }
            timesteps = t.map { Float($0) }
            sigmas = s.map { Float($0) } + [0]
            let maxSigma = sigmas.max()!
            // init_noise_sigma: max σ for trailing spacing, else (max σ² + 1) ** 0.5 (fp32 tensor ops).
            initNoiseSigma = spacing == .leading ? (maxSigma * maxSigma + 1).squareRoot() : maxSigma
        case .dpmpp2m:
            // DPMSolverMultistepScheduler.set_timesteps: int64 timesteps ("leading": n + 1 points, the 0 dropped).
            let ts: [Int]
            switch spacing {
            case .leading:
                let ratio = trainSteps / (steps + 1)
                ts = (1...steps).reversed().map { $0 * ratio + stepsOffset }
            case .trailing:
                ts = Sampler.trailing(steps, trainSteps: trainSteps)
            }
            if choice.karras {
                // σ from the whole table (flipped: σ_max first), timesteps rounded half-to-even.
                let s = Sampler.karras(sigmaMin: Double(allSigmas[0]), sigmaMax: Double(allSigmas[trainSteps - 1]), steps: steps)
                timesteps = s.map { Float(Sampler.sigmaToT($0, logSigmas: logSigmas).rounded(.toNearestOrEven)) }
                sigmas = s.map { Float($0) } + [0]
            } else {
                timesteps = ts.map(Float.init)
                sigmas = ts.map { Float(Sampler.interp(Double($0), allSigmas)) } + [0]
            }
            initNoiseSigma = 1
        }
    }

    /// Euler/Euler a/DDIM timesteps for a spacing (diffusers: the same formula in all three).
    static func spacedTimesteps(_ n: Int, trainSteps: Int, spacing: TimestepSpacing, stepsOffset: Int) -> [Int] {
        switch spacing {
        case .leading:
            let ratio = trainSteps / n
            return (0..<n).reversed().map { $0 * ratio + stepsOffset }
        case .trailing:
            return trailing(n, trainSteps: trainSteps)
        }
    }

    /// np.arange(T, 0, −T/n).round() − 1.
    static func trailing(_ n: Int, trainSteps: Int) -> [Int] {
        let ratio = Double(trainSteps) / Double(n)
        var out: [Int] = []
        var v = Double(trainSteps)
        var i = 0
        while v > 0 && out.count < n {
            out.append(Int(v.rounded(.toNearestOrEven)) - 1)
            i += 1
            v = Double(trainSteps) - Double(i) * ratio
        }
        return out
    }

    /// np.interp(t, arange(T), table) for t within [0, T − 1], in float64.
    static func interp(_ t: Double, _ table: [Float]) -> Double {
        let lo = max(0, min(table.count - 1, Int(t.rounded(.down))))
        if lo >= table.count - 1 { return Double(table[table.count - 1]) }
        let frac = t - Double(lo)
        let a = Double(table[lo]), b = Double(table[lo + 1])
        return frac == 0 ? a : a + (b - a) * frac
    }

    /// diffusers `_convert_to_karras`: (σ_max^(1/ρ) + ramp · (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, ρ = 7, ramp = linspace(0, 1, n).
    static func karras(sigmaMin: Double, sigmaMax: Double, steps n: Int) -> [Double] {
        let rho = 7.0
        let minInv = pow(sigmaMin, 1 / rho), maxInv = pow(sigmaMax, 1 / rho)
        return (0..<n).map { i in
            let ramp = n == 1 ? 0 : Double(i) / Double(n - 1)
            return pow(maxInv + ramp * (minInv - maxInv), rho)
        }
    }

    /// diffusers `_sigma_to_t`: the fractional table index whose log σ interpolates to log σ.
    static func sigmaToT(_ sigma: Double, logSigmas: [Float]) -> Double {
        let logSigma = log(max(sigma, 1e-10))
        // low = the last index with log σ_table ≤ log σ (0 when none), clipped to T − 2.
        var low = 0
        for (i, l) in logSigmas.enumerated() where logSigma - Double(l) >= 0 { low = i }
        low = min(low, logSigmas.count - 2)
        let lo = Double(logSigmas[low]), hi = Double(logSigmas[low + 1])
        let w = min(1, max(0, (lo - logSigma) / (lo - hi)))
        return (1 - w) * Double(low) + w * Double(low + 1)
    }

    /// Whether `step` needs fresh unit noise (Euler a).
    public var needsStepNoise: Bool { choice.kind == .eulerAncestral }

    /// The UNet's input at step i: diffusers' `scale_model_input` (Euler: x / (σ² + 1) ** 0.5; others unchanged).
    public func scaleInput(_ x: [Float], step i: Int) -> [Float] {
        switch choice.kind {
        case .euler, .eulerAncestral:
            let s = sigmas[i]
            let d = (s * s + 1).squareRoot()
            return x.map { $0 / d }
        case .dpmpp2m, .ddim:
            return x
        }
    }

    /// One update: model output (after CFG) at step i and the current latents → the next latents. `noise`: unit
    /// normal of the latents' size, for Euler a only.
    public mutating func step(_ modelOutput: [Float], step i: Int, sample: [Float], noise: [Float]? = nil) -> [Float] {
        precondition(modelOutput.count == sample.count, "sampler step: model output and sample sizes differ")
        precondition(i >= 0 && i < steps, "sampler step \(i) outside 0..<\(steps)")
        switch choice.kind {
        case .euler, .eulerAncestral:
            let sigma = sigmas[i]
            let x0: [Float]
            switch prediction {
            case .epsilon:       // sample − σ · ε
                x0 = zip(sample, modelOutput).map { $0 - sigma * $1 }
            case .vPrediction:   // model_output · (−σ / (σ² + 1) ** 0.5) + sample / (σ² + 1)
                let s2 = sigma * sigma + 1
                let c = -sigma / s2.squareRoot()
                x0 = zip(sample, modelOutput).map { $1 * c + $0 / s2 }
            }
            if choice.kind == .euler {
                let dt = sigmas[i + 1] - sigma
                return zip(sample, x0).map { s, p in s + ((s - p) / sigma) * dt }
            }
            guard let noise, noise.count == sample.count else { preconditionFailure("Euler a needs a unit-noise draw of the latents' size per step") }
            let from = sigma, to = sigmas[i + 1]
            let up = (to * to * (from * from - to * to) / (from * from)).squareRoot()
            let down = (to * to - up * up).squareRoot()
            let dt = down - sigma
            var out = zip(sample, x0).map { s, p in s + ((s - p) / sigma) * dt }
            for j in out.indices { out[j] = out[j] + noise[j] * up }
            return out
        case .dpmpp2m:
            // convert_model_output (dpmsolver++): x₀ = (x − σ_t ε) / α_t, or α_t x − σ_t v.
            let (alphaS, sigmaS) = Sampler.alphaSigma(sigmas[i])
            let x0: [Float]
            switch prediction {
            case .epsilon: x0 = zip(sample, modelOutput).map { ($0 - sigmaS * $1) / alphaS }
            case .vPrediction: x0 = zip(sample, modelOutput).map { alphaS * $0 - sigmaS * $1 }
            }
            defer { previousX0 = x0 }
            let (alphaT, sigmaT) = Sampler.alphaSigma(sigmas[i + 1])
            let lambdaT = Float(log(Double(alphaT))) - Float(log(Double(sigmaT)))
            let lambdaS = Float(log(Double(alphaS))) - Float(log(Double(sigmaS)))
            let h = lambdaT - lambdaS
            let a = sigmaT / sigmaS
            let b = alphaT * (Float(exp(Double(-h))) - 1)
            // First order at the first step and (final σ = 0, "lower_order_final") the last; second order between.
            guard i > 0, i < steps - 1, let m1 = previousX0 else {
                return zip(sample, x0).map { a * $0 - b * $1 }
            }
            let (alphaS1, sigmaS1) = Sampler.alphaSigma(sigmas[i - 1])
            let lambdaS1 = Float(log(Double(alphaS1))) - Float(log(Double(sigmaS1)))
            let r0 = (lambdaS - lambdaS1) / h
            let inv = 1 / r0
            let half = 0.5 * b
            var out = [Float](repeating: 0, count: sample.count)
            for j in out.indices {
                let d1 = inv * (x0[j] - m1[j])
                out[j] = (a * sample[j] - b * x0[j]) - half * d1
            }
            return out
        case .ddim:
            let t = Int(timesteps[i])
            let prevT = t - ddimStride
            let aT = alphasCumprod[t]
            let aPrev = prevT >= 0 ? alphasCumprod[prevT] : alphasCumprod[0]   // set_alpha_to_one = false
            let betaT = 1 - aT
            let sqrtA = aT.squareRoot(), sqrtB = betaT.squareRoot()
            let x0: [Float], eps: [Float]
            switch prediction {
            case .epsilon:
                x0 = zip(sample, modelOutput).map { ($0 - sqrtB * $1) / sqrtA }
                eps = modelOutput
            case .vPrediction:
                x0 = zip(sample, modelOutput).map { sqrtA * $0 - sqrtB * $1 }
                eps = zip(sample, modelOutput).map { sqrtA * $1 + sqrtB * $0 }
            }
            let dir = (1 - aPrev - 0).squareRoot()   // eta = 0: std_dev_t = 0
            let sqrtPrev = aPrev.squareRoot()
            return zip(x0, eps).map { sqrtPrev * $0 + dir * $1 }
        }
    }

    /// DPM-Solver's α_t = 1 / (σ² + 1) ** 0.5, σ_t = σ α_t (fp32).
    static func alphaSigma(_ sigma: Float) -> (Float, Float) {
        let alpha = 1 / (sigma * sigma + 1).squareRoot()
        return (alpha, sigma * alpha)
    }
}
