import Base
import Foundation
import Tensor

/// How the training noise and timesteps are drawn: kohya's noise options (library/train_util.py
/// add_training_arguments) with kohya's defaults. As in kohya, an option that is nil or 0 is off.
public struct NoiseOptions: Sendable, Equatable {
    /// --noise_offset: add `offset · N(0,1)` per (sample, channel) to the noise (crosslabs "offset noise").
    public var noiseOffset: Double?
    /// --noise_offset_random_strength: the offset is U[0,1) · noiseOffset, one draw per step.
    public var noiseOffsetRandomStrength: Bool
    /// --adaptive_noise_scale: the offset grows by this × |mean of the latent channel| (needs noiseOffset).
    public var adaptiveNoiseScale: Double?
    /// --multires_noise_iterations: pyramid noise with this many levels.
    public var multiresNoiseIterations: Int?
    /// --multires_noise_discount: the weight of level i is discount^i.
    public var multiresNoiseDiscount: Double
    /// --ip_noise_gamma: input perturbation (arXiv 2301.11706): the UNet input gets extra γ · N(0,1) noise that
    /// the target does not contain.
    public var ipNoiseGamma: Double?
    /// --ip_noise_gamma_random_strength: γ is U[0,1) · ipNoiseGamma, one draw per step.
    public var ipNoiseGammaRandomStrength: Bool
    /// --min_timestep / --max_timestep: timesteps are uniform integers in [min ?? 0, max ?? trainSteps).
    public var minTimestep: Int?
    public var maxTimestep: Int?

    public init(noiseOffset: Double? = nil, noiseOffsetRandomStrength: Bool = false, adaptiveNoiseScale: Double? = nil,
                multiresNoiseIterations: Int? = nil, multiresNoiseDiscount: Double = 0.3, ipNoiseGamma: Double? = nil,
                ipNoiseGammaRandomStrength: Bool = false, minTimestep: Int? = nil, maxTimestep: Int? = nil) {
        self.noiseOffset = noiseOffset
        self.noiseOffsetRandomStrength = noiseOffsetRandomStrength
        self.adaptiveNoiseScale = adaptiveNoiseScale
        self.multiresNoiseIterations = multiresNoiseIterations
        self.multiresNoiseDiscount = multiresNoiseDiscount
        self.ipNoiseGamma = ipNoiseGamma
        self.ipNoiseGammaRandomStrength = ipNoiseGammaRandomStrength
        self.minTimestep = minTimestep
        self.maxTimestep = maxTimestep
    }

    /// The timestep range kohya samples from (get_noise_noisy_latents_and_timesteps / get_timesteps):
    /// randint(min, max) when min < max, otherwise every sample gets max.
    public func timestepBounds(trainSteps: Int) -> (min: Int, max: Int) {
        (minTimestep ?? 0, maxTimestep ?? trainSteps)
    }

    /// Rejects settings kohya would crash on or silently misuse, naming the option and the fix.
    public func validate(trainSteps: Int = 1000) throws {
        let (lo, hi) = timestepBounds(trainSteps: trainSteps)
        if lo < 0 || lo >= trainSteps {
            throw DiffusionStepError(option: "min_timestep", problem: "\(lo) is outside 0...\(trainSteps - 1); use a value in that range")
        }
        if hi < 0 || hi > trainSteps {
            throw DiffusionStepError(option: "max_timestep", problem: "\(hi) is outside 1...\(trainSteps); use a value in that range")
        }
        if lo > hi {
            throw DiffusionStepError(option: "min_timestep", problem: "\(lo) is larger than max_timestep \(hi); make min_timestep <= max_timestep")
        }
        if lo == hi && hi == trainSteps {
            throw DiffusionStepError(option: "max_timestep", problem: "min_timestep = max_timestep = \(hi) would train on timestep \(hi), which does not exist (timesteps are 0...\(trainSteps - 1)); lower both")
        }
        if adaptiveNoiseScale != nil && noiseOffset == nil {
            throw DiffusionStepError(option: "adaptive_noise_scale", problem: "needs noise_offset (as in kohya); set noise_offset or remove adaptive_noise_scale")
        }
        if let n = multiresNoiseIterations, n < 0 {
            throw DiffusionStepError(option: "multires_noise_iterations", problem: "\(n) is negative; use a count such as 6-10, or leave it unset")
        }
        for (name, value) in [("noise_offset", noiseOffset), ("ip_noise_gamma", ipNoiseGamma),
                              ("adaptive_noise_scale", adaptiveNoiseScale), ("multires_noise_discount", multiresNoiseDiscount)] {
            if let v = value, !v.isFinite {
                throw DiffusionStepError(option: name, problem: "\(v) is not a finite number")
            }
        }
    }
}

/// One step's noise: the clean noise that is the ε target (v targets are built from it), the UNet input, and the
/// timesteps.
public struct NoisedBatch: Sendable {
    /// [B, C, H, W]: ε after offset / pyramid noise, without the ip perturbation (kohya returns it as the target).
    public let noise: Tensor
    /// [B, C, H, W]: add_noise(latents, noise (+ ip perturbation), timesteps), the UNet input.
    public let noisyLatents: Tensor
    /// B entries in 0..<trainSteps.
    public let timesteps: [Int]
}

/// Where the random numbers of one noise step come from. kohya draws them in a fixed order (see
/// `DiffusionNoise.sample`); a source that replays recorded numbers reproduces kohya's step exactly.
public protocol NoiseDrawSource {
    /// torch.randn / torch.randn_like: standard normal samples of this shape.
    mutating func normal(_ shape: [Int]) -> Tensor
    /// torch.rand(1) / random.random(): one uniform number in [0, 1).
    mutating func uniform() -> Double
    /// torch.randint(range.lowerBound, range.upperBound, (count,)): uniform integers in the range.
    mutating func timesteps(count: Int, in range: Range<Int>) -> [Int]
}

extension SplitMix64: NoiseDrawSource {
    /// Box–Muller normals, element after element in row-major order.
    public mutating func normal(_ shape: [Int]) -> Tensor {
        let count = shape.reduce(1, *)
        var values = [Float](repeating: 0, count: count)
        for i in 0..<count { values[i] = Float(normal()) }
        return Tensor(shape: shape, values)
    }

    /// Lemire's multiply-high mapping of 64 random bits onto the range (bias < range / 2^64, i.e. none that
    /// matters), one generator step per timestep, so a seed gives the same timesteps on every platform.
    public mutating func timesteps(count: Int, in range: Range<Int>) -> [Int] {
        precondition(!range.isEmpty, "timesteps: empty range \(range)")
        let width = UInt64(range.count)
        return (0..<count).map { _ in range.lowerBound + Int(width.multipliedFullWidth(by: next()).high) }
    }
}

public enum DiffusionNoise {
    /// kohya library/train_util.py get_noise_noisy_latents_and_timesteps with our generator: noise ~ N(0,1)
    /// (+ offset noise, + multires pyramid), timesteps uniform in [min_timestep ?? 0, max_timestep ?? trainSteps),
    /// ip-noise perturbation of the UNet input (the returned noise, the ε target, stays clean).
    /// latents: [B, C, H, W].
    public static func sample(latents: Tensor, schedule: NoiseSchedule, options: NoiseOptions,
                              rng: inout SplitMix64) -> NoisedBatch {
        sample(latents: latents, schedule: schedule, options: options, draws: &rng)
    }

    /// The same step with its random numbers taken from `draws`, in kohya's order:
    ///  1. normal [B,C,H,W]                                  the noise (torch.randn_like)
    ///  2. if noise offset: uniform if random strength,      torch.rand(1)
    ///     then normal [B,C,1,1]                             apply_noise_offset's torch.randn
    ///  3. if multires, per level i: uniform, then normal [B,C,hᵢ,wᵢ]   pyramid_noise_like (random.random, torch.randn)
    ///  4. timesteps (only when min < max)                   torch.randint
    ///  5. if ip noise: uniform if random strength, then normal [B,C,H,W]
    public static func sample<Draws: NoiseDrawSource>(latents: Tensor, schedule: NoiseSchedule, options: NoiseOptions,
                                                      draws: inout Draws) -> NoisedBatch {
        precondition(latents.rank == 4, "DiffusionNoise.sample: latents must be [B, C, H, W], got \(latents.shape)")
        let shape = latents.shape
        let (b, c, h, w) = (shape[0], shape[1], shape[2], shape[3])
        let latentValues = latents.scalars
        var noise = draws.normal(shape).scalars
        precondition(noise.count == latentValues.count, "noise draw has \(noise.count) values for latents \(shape)")

        if let offset = options.noiseOffset, offset != 0 {
            // get_noise_noisy_latents_and_timesteps: noise_offset = torch.rand(1) * args.noise_offset (fp32).
            let strength = options.noiseOffsetRandomStrength ? Float(draws.uniform()) * Float(offset) : Float(offset)
            noise = applyNoiseOffset(latents: latentValues, noise: noise, b: b, c: c, hw: h * w, offset: strength,
                                     adaptiveScale: options.adaptiveNoiseScale, offsetNormals: draws.normal([b, c, 1, 1]).scalars)
        }
        if let iterations = options.multiresNoiseIterations, iterations != 0 {
            noise = pyramidNoise(noise, b: b, c: c, h: h, w: w, iterations: iterations,
                                 discount: options.multiresNoiseDiscount, draws: &draws)
        }

        let (lo, hi) = options.timestepBounds(trainSteps: schedule.trainSteps)
        let timesteps = lo < hi ? draws.timesteps(count: b, in: lo..<hi) : [Int](repeating: hi, count: b)

        let noiseTensor = Tensor(shape: shape, noise)
        let noisy: Tensor
        if let gamma = options.ipNoiseGamma, gamma != 0 {
            let strength = options.ipNoiseGammaRandomStrength ? Float(draws.uniform()) * Float(gamma) : Float(gamma)
            let perturbation = draws.normal(shape).scalars
            // noise + strength * torch.randn_like(latents): only the UNet input sees the perturbation.
            var perturbed = noise
            for i in perturbed.indices { perturbed[i] += strength * perturbation[i] }
            noisy = schedule.addNoise(latents, noise: Tensor(shape: shape, perturbed), timesteps: timesteps)
        } else {
            noisy = schedule.addNoise(latents, noise: noiseTensor, timesteps: timesteps)
        }
        return NoisedBatch(noise: noiseTensor, noisyLatents: noisy, timesteps: timesteps)
    }

    /// kohya custom_train_functions.apply_noise_offset: noise + offset · N(0,1)[B,C,1,1], where the offset grows by
    /// adaptive_noise_scale · |mean over H,W of the latent channel| (clamped at 0) when that is set.
    /// latents, noise: B·C·hw values; offsetNormals: B·C values.
    static func applyNoiseOffset(latents: [Float], noise: [Float], b: Int, c: Int, hw: Int, offset: Float,
                                 adaptiveScale: Double?, offsetNormals: [Float]) -> [Float] {
        precondition(offsetNormals.count == b * c, "noise offset draw has \(offsetNormals.count) values for [\(b), \(c), 1, 1]")
        var out = noise
        for plane in 0..<(b * c) {
            var planeOffset = offset
            if let scale = adaptiveScale {
                // latents.mean(dim=(2, 3)) per (sample, channel), then offset + scale * |mean|, clamp(min: 0).
                var sum = 0.0
                for i in plane * hw ..< (plane + 1) * hw { sum += Double(latents[i]) }
                let mean = Float(sum / Double(hw))
                planeOffset = max(offset + Float(scale) * abs(mean), 0)
            }
            let add = planeOffset * offsetNormals[plane]
            for i in plane * hw ..< (plane + 1) * hw { out[i] += add }
        }
        return out
    }

    /// kohya custom_train_functions.pyramid_noise_like: for level i, r = U[0,1)·2 + 2, a normal field of size
    /// (max(1, ⌊H / rⁱ⌋), max(1, ⌊W / rⁱ⌋)) bilinearly upsampled to H×W (align_corners=False) and weighted by
    /// discountⁱ is added; it stops after the first level that reaches 1 row or column. The sum is divided by its
    /// (unbiased) standard deviation over the whole batch.
    static func pyramidNoise<Draws: NoiseDrawSource>(_ noise: [Float], b: Int, c: Int, h: Int, w: Int, iterations: Int,
                                                     discount: Double, draws: inout Draws) -> [Float] {
        var out = noise
        for level in 0..<iterations {
            let r = draws.uniform() * 2 + 2
            // Python: max(1, int(w / (r**i))) with kohya's w = H and h = W.
            let levelH = max(1, Int(Double(h) / pow(r, Double(level))))
            let levelW = max(1, Int(Double(w) / pow(r, Double(level))))
            let field = draws.normal([b, c, levelH, levelW]).scalars
            precondition(field.count == b * c * levelH * levelW, "pyramid level \(level) draw has the wrong size")
            let weight = Float(pow(discount, Double(level)))
            let up = upsampleBilinear(field, planes: b * c, inH: levelH, inW: levelW, outH: h, outW: w)
            for i in out.indices { out[i] += up[i] * weight }
            if levelH == 1 || levelW == 1 { break }
        }
        // noise / noise.std(): unbiased, double accumulation, fixed order.
        var sum = 0.0
        for v in out { sum += Double(v) }
        let mean = sum / Double(out.count)
        var squares = 0.0
        for v in out { squares += (Double(v) - mean) * (Double(v) - mean) }
        let std = Float((squares / Double(max(out.count - 1, 1))).squareRoot())
        return out.map { $0 / std }
    }

    /// torch.nn.Upsample(size=(outH, outW), mode="bilinear") (align_corners=False), as torch's CPU kernel
    /// computes it in fp32: source = scale·(dst + 0.5) − 0.5 clamped at 0, scale = in/out.
    /// values: planes × inH × inW; returns planes × outH × outW.
    static func upsampleBilinear(_ values: [Float], planes: Int, inH: Int, inW: Int, outH: Int, outW: Int) -> [Float] {
        func taps(inSize: Int, outSize: Int) -> [(Int, Int, Float)] {
            let scale = Float(inSize) / Float(outSize)
            return (0..<outSize).map { o in
                let source = max(scale * (Float(o) + 0.5) - 0.5, 0)
                let i0 = Int(source)
                let lambda = min(max(source - Float(i0), 0), 1)
                return (i0, i0 < inSize - 1 ? i0 + 1 : i0, lambda)
            }
        }
        let rows = taps(inSize: inH, outSize: outH), cols = taps(inSize: inW, outSize: outW)
        var out = [Float](repeating: 0, count: planes * outH * outW)
        for p in 0..<planes {
            let src = p * inH * inW, dst = p * outH * outW
            for (y, (y0, y1, ly)) in rows.enumerated() {
                for (x, (x0, x1, lx)) in cols.enumerated() {
                    let top = (1 - lx) * values[src + y0 * inW + x0] + lx * values[src + y0 * inW + x1]
                    let bottom = (1 - lx) * values[src + y1 * inW + x0] + lx * values[src + y1 * inW + x1]
                    out[dst + y * outW + x] = (1 - ly) * top + ly * bottom
                }
            }
        }
        return out
    }
}
