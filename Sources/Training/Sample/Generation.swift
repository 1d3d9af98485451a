import Base
import Foundation
import SDXL
import Tensor

/// One image to make: txt2img as StableDiffusionXLPipeline does it (classifier-free guidance with the negative prompt,
/// SDXL's size conditioning with original = target = the image size and no crop).
public struct GenerationRequest: Sendable, Equatable {
    public var prompt: String
    public var negativePrompt: String
    public var width: Int
    public var height: Int
    public var steps: Int
    public var cfgScale: Float
    public var seed: UInt64
    public var sampler: SamplerChoice

    public init(prompt: String, negativePrompt: String = "", width: Int = 1024, height: Int = 1024, steps: Int = 28,
                cfgScale: Float = 7, seed: UInt64 = 0, sampler: SamplerChoice) {
        self.prompt = prompt
        self.negativePrompt = negativePrompt
        self.width = width
        self.height = height
        self.steps = steps
        self.cfgScale = cfgScale
        self.seed = seed
        self.sampler = sampler
    }

    /// Refuses what cannot be generated, naming the value and what to do.
    public func validate(latentFactor: Int = 8) throws {
        guard width >= 64, height >= 64, width % latentFactor == 0, height % latentFactor == 0, width <= 8192, height <= 8192 else {
            throw SamplerError("size \(width)×\(height): width and height must be multiples of \(latentFactor) between 64 and 8192 (e.g. 1024×1024, 832×1216)")
        }
        guard steps >= 1 && steps <= 1000 else { throw SamplerError("steps \(steps): use 1 to 1000 (20–30 is usual)") }
        guard cfgScale.isFinite && cfgScale >= 0 else { throw SamplerError("CFG scale \(cfgScale): use a number ≥ 0 (5–7 is usual for SDXL)") }
    }
}

/// Where the noise of a generation comes from: PyTorch's CPU generator seeded with the request's seed (the initial
/// latents, then Euler a's per-step draws, as diffusers does with `generator=torch.Generator().manual_seed(seed)`), or
/// given tensors (conformance checks: `lora-dist generate --noise FILE`).
public enum GenerationNoise {
    case seeded
    /// initial [1, 4, h, w] unit noise; per step (Euler a) [1, 4, h, w] each.
    case given(initial: [Float], steps: [[Float]])
}

/// A generated image: the final latents (before the VAE), 8-bit RGB (HWC), and what made it.
public struct GeneratedImage: Sendable {
    public let request: GenerationRequest
    public let latents: Tensor              // [1, 4, h, w]
    public let rgb: [UInt8]                 // [H, W, 3]
    public let seconds: Double              // text encoding + UNet steps + decode
    public let unetSeconds: Double
    /// Each sampling step's seconds (UNet evaluation(s) + sampler update).
    public let stepSeconds: [Double]
    public let textSeconds: Double
    public let decodeSeconds: Double
    /// The prompt or negative prompt had more tokens than the windows hold (the rest was dropped).
    public let truncated: Bool
}

/// Several LoRAs at once: each adds its branch to the layer's output in turn (A1111/ComfyUI stack LoRAs the same way:
/// the sum of the weight deltas).
public final class StackedAdapters: LayerAdapters {
    let members: [LayerAdapters]
    public init(_ members: [LayerAdapters]) { self.members = members }
    public func adapt(_ t: Tape, path: String, input: Var, output: Var) -> Var {
        members.reduce(output) { $1.adapt(t, path: path, input: input, output: $0) }
    }
}

/// The models of txt2img, loaded once: both text encoders, the UNet, the VAE, with optional adapters (LoRAs) on all of
/// them. Used by `lora-dist generate` and by training-time sampling (with the LoRA being trained).
public final class ImageGenerator {
    public let unet: UNet
    public let vae: VAE
    public let textL: CLIPTextEncoderL
    public let textG: OpenCLIPTextEncoderG
    public let tokenizers: (CLIPTokenizer, CLIPTokenizer)
    public let sizeEmbedDim: Int
    public let prediction: PredictionType
    public let zeroTerminalSNR: Bool
    public let spacing: TimestepSpacing
    /// Adapters on the UNet and both text encoders (one LoRANetwork covers all three), nil for the bare model.
    public var adapters: LayerAdapters?
    /// 75-token windows per prompt: nil = as many as the longer of prompt and negative prompt needs (up to 3);
    /// training-time sampling fixes it from max_token_length as kohya does.
    public var promptWindows: Int?
    /// The kernels the VAE decodes with (kohya's no_half_vae: fp32 while the rest runs in bf16); nil: the current ones.
    public var vaeFamily: KernelFamily?

    public init(unet: UNet, vae: VAE, textL: CLIPTextEncoderL, textG: OpenCLIPTextEncoderG, sizeEmbedDim: Int,
                prediction: PredictionType = .epsilon, zeroTerminalSNR: Bool = false, spacing: TimestepSpacing = .leading,
                adapters: LayerAdapters? = nil) throws {
        self.unet = unet
        self.vae = vae
        self.textL = textL
        self.textG = textG
        self.sizeEmbedDim = sizeEmbedDim
        self.prediction = prediction
        self.zeroTerminalSNR = zeroTerminalSNR
        self.spacing = spacing
        self.adapters = adapters
        tokenizers = (try CLIPTokenizer.bundled(padding: .endOfText), try CLIPTokenizer.bundled(padding: .zero))
        for (tokenizer, config, name) in [(tokenizers.0, textL.config, "CLIP-L"), (tokenizers.1, textG.config, "bigG")]
        where tokenizer.vocabularySize > config.vocab {
            throw SamplerError("the \(name) text encoder has a \(config.vocab)-token vocabulary; the CLIP tokenizer produces ids up to \(tokenizer.vocabularySize - 1)")
        }
    }

    /// The latent grid's downsampling factor (8 for SDXL's VAE).
    public var latentFactor: Int { vae.config.downsamplingFactor }

    /// Text conditioning for the negative and positive prompt of a request: context [2, T, C] (negative first, as
    /// diffusers concatenates them), pooled [2, P], and whether either prompt was cut to fit.
    func encode(negative: String, positive: String) throws -> (context: Tensor, pooled: Tensor, truncated: Bool) {
        let t = Tape(recording: false, adapters: adapters)
        let e = try PromptEncoding.encode(t, l: textL, g: textG, tokenizers: tokenizers, prompts: [negative, positive],
                                          windows: promptWindows)
        return (e.context, e.pooled, e.truncated.contains(true))
    }

    /// Runs one request to the final latents and the decoded image. `progress(step, steps)` after every UNet step.
    public func generate(_ r: GenerationRequest, noise: GenerationNoise = .seeded,
                         progress: ((Int, Int) -> Void)? = nil) throws -> GeneratedImage {
        try r.validate(latentFactor: latentFactor)
        let start = Date()
        var sampler = try Sampler(r.sampler, steps: r.steps, prediction: prediction, zeroTerminalSNR: zeroTerminalSNR, spacing: spacing)
        let h = r.height / latentFactor, w = r.width / latentFactor
        let shape = [1, vae.config.zChannels, h, w]
        let count = shape.reduce(1, *)
        var generator = TorchGenerator(seed: r.seed)
        var latents: [Float]
        var stepNoise: [[Float]] = []
        switch noise {
        case .seeded:
            latents = generator.randn(count: count)
        case .given(let initial, let steps):
            guard initial.count == count else { throw SamplerError("initial noise has \(initial.count) values; a \(r.width)×\(r.height) image needs \(shape) = \(count)") }
            if sampler.needsStepNoise {
                guard steps.count >= r.steps, steps.allSatisfy({ $0.count == count }) else {
                    throw SamplerError("\(r.sampler) needs \(r.steps) per-step noise tensors of shape \(shape); got \(steps.count)")
                }
            }
            latents = initial
            stepNoise = steps
        }
        latents = latents.map { $0 * sampler.initNoiseSigma }

        let textStart = Date()
        let (context, pooled, truncated) = try encode(negative: r.negativePrompt, positive: r.prompt)
        let textSeconds = Date().timeIntervalSince(textStart)
        let guided = r.cfgScale > 1
        let rows = guided ? 2 : 1
        // diffusers runs no unconditional half when guidance_scale ≤ 1 (do_classifier_free_guidance).
        let ctx = guided ? context : Tensor(shape: [1] + Array(context.shape.dropFirst()), Array(context.scalars[(context.count / 2)...]))
        let pooledRows = guided ? pooled : Tensor(shape: [1, pooled.shape[1]], Array(pooled.scalars[(pooled.count / 2)...]))
        let t0 = Tape(recording: false)
        let sizes = Array(repeating: (h: r.height, w: r.width), count: rows)
        let y = Conditioning.y(t0, pooled: Var(pooledRows), originalSize: sizes, cropTopLeft: Array(repeating: (top: 0, left: 0), count: rows),
                               targetSize: sizes, embedDim: sizeEmbedDim).value

        let unetStart = Date()
        var stepSeconds: [Double] = []
        for i in 0..<r.steps {
            let stepStart = Date()
            let input = sampler.scaleInput(latents, step: i)
            let x = Tensor(shape: [rows] + shape.dropFirst(), Array([[Float]](repeating: input, count: rows).joined()))
            let ts = Tensor(shape: [rows], [Float](repeating: sampler.timesteps[i], count: rows))
            let tape = Tape(recording: false, adapters: adapters)
            let out = unet(tape, x: Var(x), timesteps: Var(ts), context: Var(ctx), y: Var(y)).value.scalars
            var guidedOut: [Float]
            if guided {
                // noise_pred_uncond + guidance_scale · (noise_pred_text − noise_pred_uncond)
                guidedOut = [Float](repeating: 0, count: count)
                for j in 0..<count { guidedOut[j] = out[j] + r.cfgScale * (out[count + j] - out[j]) }
            } else {
                guidedOut = out
            }
            var draw: [Float]? = nil
            if sampler.needsStepNoise {
                switch noise {
                case .seeded: draw = generator.randn(count: count)
                case .given: draw = stepNoise[i]
                }
            }
            latents = sampler.step(guidedOut, step: i, sample: latents, noise: draw)
            stepSeconds.append(Date().timeIntervalSince(stepStart))
            if ImageGenerator.benchCounters {   // bench: oneDNN's clocks of this step
                let c = DNNL.takeCounters().filter { $0.calls > 0 }
                print("step \(i + 1) oneDNN: " + c.map { String(format: "%@ %.2f s (%d calls)", $0.kind, $0.seconds, $0.calls) }.joined(separator: ", "))
            }
            progress?(i + 1, r.steps)
        }
        let unetSeconds = Date().timeIntervalSince(unetStart)

        let decodeStart = Date()
        let z = Tensor(shape: shape, latents.map { $0 / vae.config.scalingFactor })
        let family = Kernels.family
        if let vaeFamily { Kernels.use(vaeFamily) }
        let image = vae.decode(Tape(recording: false), Var(z)).value     // [1, 3, H, W] in about [−1, 1]
        Kernels.use(family)
        let rgb = ImageGenerator.toRGB(image)
        let decodeSeconds = Date().timeIntervalSince(decodeStart)
        return GeneratedImage(request: r, latents: Tensor(shape: shape, latents), rgb: rgb,
                              seconds: Date().timeIntervalSince(start), unetSeconds: unetSeconds, stepSeconds: stepSeconds,
                              textSeconds: textSeconds, decodeSeconds: decodeSeconds, truncated: truncated)
    }

    static let benchCounters = ProcessInfo.processInfo.environment["LORA_DIST_BENCH_COUNTERS"] == "1"

    /// diffusers' postprocess: (x / 2 + 0.5).clamp(0, 1), then numpy_to_pil's (x · 255).round() → uint8, CHW → HWC.
    static func toRGB(_ image: Tensor) -> [UInt8] {
        let c = image.shape[1], hh = image.shape[2], ww = image.shape[3]
        precondition(c == 3, "VAE output must have 3 channels, got \(image.shape)")
        let v = image.scalars
        var out = [UInt8](repeating: 0, count: hh * ww * 3)
        for ch in 0..<3 {
            for p in 0..<(hh * ww) {
                let x = min(max(v[ch * hh * ww + p] / 2 + 0.5, 0), 1)
                out[p * 3 + ch] = UInt8((x * 255).rounded(.toNearestOrEven))
            }
        }
        return out
    }
}

extension GenerationRequest {
    /// A1111's "parameters" text (what its PNG Info tab, civitai and ComfyUI's A1111 importers read):
    /// the prompt, "Negative prompt: …", then "Steps: …, Sampler: …, Schedule type: …, CFG scale: …, Seed: …, Size: WxH,
    /// Model: …" (+ "Lora hashes" as A1111 writes them: name: the first 12 hex digits of the file's sshs_model_hash).
    public func parametersText(model: String?, loras: [(name: String, hash: String?)] = [], extra: [(String, String)] = []) -> String {
        var fields: [(String, String)] = [("Steps", "\(steps)"), ("Sampler", sampler.kind.displayName)]
        if sampler.karras { fields.append(("Schedule type", "Karras")) }
        fields += [("CFG scale", GenerationRequest.number(cfgScale)), ("Seed", "\(seed)"), ("Size", "\(width)x\(height)")]
        if let model { fields.append(("Model", model)) }
        let hashed = loras.compactMap { l in l.hash.map { "\(l.name): \($0.prefix(12))" } }
        if !hashed.isEmpty { fields.append(("Lora hashes", "\"" + hashed.joined(separator: ", ") + "\"")) }
        fields += extra
        fields.append(("Version", "lora-dist"))
        var text = prompt
        if !negativePrompt.isEmpty { text += "\nNegative prompt: " + negativePrompt }
        return text + "\n" + fields.map { "\($0.0): \($0.1)" }.joined(separator: ", ")
    }

    /// 7 → "7", 6.5 → "6.5" (as A1111 prints its floats).
    static func number(_ v: Float) -> String {
        v == v.rounded() && abs(v) < 1e7 ? String(Int(v)) : String(v)
    }
}
