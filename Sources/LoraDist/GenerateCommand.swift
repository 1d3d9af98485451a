import ArgumentParser
import Dataset
import Distributed
import Foundation
import Logging
import SafeTensors
import SDXL
import Tensor
import Training

/// `lora-dist generate`: txt2img on an SDXL checkpoint with optional LoRAs; under mpirun the images are split over the
/// ranks (image j on rank j mod N).
struct GenerateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "generate",
        abstract: "Generate images (txt2img) from an SDXL checkpoint, optionally with LoRAs.",
        discussion: """
            Samplers: euler_a (default), euler, euler_karras, dpm++_2m, dpm++_2m_karras, ddim — diffusers' schedulers \
            with SDXL's scheduler config. A seed gives the initial noise torch.randn gives with \
            torch.Generator().manual_seed(seed) on CPU (as diffusers on CPU and ComfyUI). Each PNG carries the \
            generation parameters as A1111's "parameters" text. Under mpirun/srun each rank renders whole images.
            """)

    @OptionGroup var engine: EngineOptions
    @Option(help: "The SDXL checkpoint (single .safetensors file or diffusers folder).") var model: String
    @Option(help: "A prompt (repeat for several).") var prompt: [String] = []
    @Option(help: "A kohya sample-prompts file (.txt: one prompt per line with --n/--w/--h/--d/--l/--s/--ss; .toml; .json).")
    var prompts: String?
    @Option(help: "Negative prompt (for prompts without their own --n).") var negativePrompt = ""
    @Option(help: "Image width (a multiple of 8).") var width = 1024
    @Option(help: "Image height (a multiple of 8).") var height = 1024
    @Option(help: "Sampling steps.") var steps = 28
    @Option(name: [.customLong("cfg"), .customLong("cfg-scale")], help: "Classifier-free guidance scale.") var cfg: Float = 7
    @Option(help: "Seed of the first image (each further image of a prompt: +1). Default: a random seed, printed.") var seed: UInt64?
    @Option(help: "Images per prompt.") var batch = 1
    @Option(help: "euler_a, euler, euler_karras, dpm++_2m, dpm++_2m_karras or ddim (A1111 names work too: \"DPM++ 2M Karras\").")
    var sampler = "euler_a"
    @Option(help: ArgumentHelp("A kohya-format LoRA, optionally with its multiplier: --lora style.safetensors:0.8 (repeatable).", valueName: "file[:multiplier]"))
    var lora: [String] = []
    @Option(help: "Output folder (images are named NNNNN-SEED.png).") var out = "outputs"
    @Option(help: "fp32 or bf16 (oneDNN; the default where the CPU has AVX512-BF16).") var precision: String?
    @Flag(help: "The checkpoint predicts v (default: read from the checkpoint's v_pred key).") var vPrediction = false
    @Flag(help: "Zero-terminal-SNR schedule (default: read from the checkpoint's ztsnr key).") var zeroTerminalSnr = false
    @Option(help: "leading (SDXL's scheduler config) or trailing.") var timestepSpacing = "leading"
    @Option(help: "Initial noise instead of the seed's: a .safetensors with 'noise' [1, 4, h, w] (and for euler_a 'step_noise' [steps, 4, h, w]). One image only.")
    var noise: String?
    @Option(help: "Also write the final latents (before the VAE) as 'latents' [1, 4, h, w] to this .safetensors. One image only.")
    var latentsOut: String?

    func validate() throws {
        if prompt.isEmpty && prompts == nil { throw ValidationError("give --prompt TEXT (repeatable) or --prompts FILE") }
        if batch < 1 { throw ValidationError("--batch must be at least 1 (got \(batch))") }
        for (name, v) in [("--width", width), ("--height", height)] where v % 8 != 0 || v < 64 {
            throw ValidationError("\(name) \(v): use a multiple of 8, at least 64 (e.g. 1024, 832, 1216)")
        }
        if let p = precision, !["fp32", "bf16"].contains(p) { throw ValidationError("--precision must be fp32 or bf16 (got '\(p)')") }
        if TimestepSpacing(rawValue: timestepSpacing) == nil { throw ValidationError("--timestep-spacing must be leading or trailing (got '\(timestepSpacing)')") }
        do { _ = try SamplerChoice(parsing: sampler) } catch { throw ValidationError("--sampler: \(error)") }
    }

    /// "file.safetensors:0.8" → (file, 0.8); a path whose last ':' part is not a number is a path.
    static func parseLoRA(_ s: String) throws -> (path: String, multiplier: Float) {
        if let colon = s.lastIndex(of: ":"), let m = Float(s[s.index(after: colon)...]) {
            return (String(s[..<colon]), m)
        }
        return (s, 1)
    }

    func run() throws {
        RankLogging.bootstrap()
        let log = Logger(label: "generate")
        // Everything that can be wrong with the inputs is found before any model is loaded.
        let jobs: [GenerationRequest]
        let loras: [(path: String, multiplier: Float)]
        let ckpt: SDXLCheckpoint
        do {
            loras = try lora.map(Self.parseLoRA)
            for l in loras where !FileManager.default.fileExists(atPath: l.path) {
                throw SamplerError("--lora \(l.path): no such file (a multiplier goes after a colon: --lora FILE:0.8)")
            }
            ckpt = try SDXLCheckpoint(path: model)
            guard ckpt.vaeConfig != nil, ckpt.textLConfig != nil, ckpt.textGConfig != nil else {
                throw SamplerError("\(model): generation needs the whole checkpoint (UNet, VAE and both text encoders); this file lacks \([ckpt.vaeConfig == nil ? "the VAE" : nil, ckpt.textLConfig == nil ? "CLIP-L" : nil, ckpt.textGConfig == nil ? "bigG" : nil].compactMap { $0 }.joined(separator: ", "))")
            }
            let defaults = SamplePromptDefaults(negativePrompt: negativePrompt, width: width, height: height, steps: steps,
                                                cfgScale: cfg, sampler: try SamplerChoice(parsing: sampler))
            var list: [SamplePrompt] = prompt.map { SamplePrompt(prompt: $0) }
            if let prompts { list += try SamplePrompt.load(path: prompts) }
            let firstSeed = seed ?? UInt64.random(in: 0..<(1 << 32))
            jobs = try SamplePrompt.requests(list, defaults: defaults, imagesEach: batch, firstSeed: firstSeed)
            for j in jobs {
                try j.validate(latentFactor: ckpt.vaeConfig!.downsamplingFactor)
                _ = try PromptAttention.parse(j.prompt)
                _ = try PromptAttention.parse(j.negativePrompt)
            }
            if (noise != nil || latentsOut != nil) && jobs.count != 1 {
                throw SamplerError("--noise and --latents-out work on one image; this run makes \(jobs.count)")
            }
        } catch {
            FileHandle.standardError.write(Data("error: \(error)\n".utf8))
            throw ExitCode.failure
        }

        let comm = try startRanks(log)
        engine.apply()
        let wantBF16 = (precision ?? "bf16") == "bf16"
        var precisionLine = "fp32"
        if wantBF16 {
            if let fallback = Kernels.use(.bf16) {
                if precision == "bf16" { print("note: \(fallback)") }
                _ = Kernels.use(.fp32)
            } else {
                precisionLine = "bf16 (oneDNN)"
            }
        } else {
            _ = Kernels.use(.fp32)
        }
        let mine = jobs.indices.filter { $0 % comm.size == comm.rank }
        if comm.rank == 0 {
            print("lora-dist generate: \(jobs.count) image\(jobs.count == 1 ? "" : "s") on \(comm.size) rank\(comm.size == 1 ? "" : "s"), \(Threads.count) threads each, \(precisionLine); model \(model)")
        }
        do {
            let (l, g) = try ckpt.textEncoders()
            var adapters: [LayerAdapters] = []
            let unet = try ckpt.unet()
            var loraNames: [(name: String, hash: String?)] = []
            for (path, multiplier) in loras {
                let contents = try LoRAFile.read(path)
                adapters.append(try LoRANetwork(unet: unet, textEncoders: (l, g), contents: contents, multiplier: multiplier))
                loraNames.append((URL(fileURLWithPath: path).deletingPathExtension().lastPathComponent, contents.metadata["sshs_model_hash"]))
            }
            let vPred = vPrediction || ckpt.shapes["v_pred"] != nil
            let ztsnr = zeroTerminalSnr || ckpt.shapes["ztsnr"] != nil
            let generator = try ImageGenerator(
                unet: unet, vae: try ckpt.vae(), textL: l, textG: g, sizeEmbedDim: ckpt.sizeEmbedDim ?? 256,
                prediction: vPred ? .vPrediction : .epsilon, zeroTerminalSNR: ztsnr,
                spacing: TimestepSpacing(rawValue: timestepSpacing)!,
                adapters: adapters.isEmpty ? nil : adapters.count == 1 ? adapters[0] : StackedAdapters(adapters))
            if comm.rank == 0 && (vPred || ztsnr) {
                print("note: \(vPred ? "v-prediction" : "ε-prediction")\(ztsnr ? ", zero-terminal-SNR schedule" : "")")
            }
            var given: GenerationNoise = .seeded
            if let noise {
                let f = try SafeTensorsFile(path: noise)
                guard f.entries["noise"] != nil else { throw SamplerError("\(noise) has no tensor 'noise' [1, 4, h, w]") }
                var steps: [[Float]] = []
                if f.entries["step_noise"] != nil {
                    let s = try f.tensor("step_noise").fp32()
                    let per = s.count / max(1, s.shape[0])
                    steps = (0..<s.shape[0]).map { Array(s.scalars[$0 * per ..< ($0 + 1) * per]) }
                }
                given = .given(initial: try f.tensor("noise").fp32().scalars, steps: steps)
            }
            try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)
            // Numbered after the folder's files as every rank saw them before any wrote (so the ranks agree).
            let base = Self.firstFreeNumber(in: out)
            try comm.barrier()
            let modelName = URL(fileURLWithPath: model).deletingPathExtension().lastPathComponent
            var total = 0.0
            for j in mine {
                let r = jobs[j]
                let bar = TrainingProgress(total: r.steps, logEvery: 5, label: "image \(j + 1)/\(jobs.count)")
                let image = try generator.generate(r, noise: given) { step, _ in bar.update(step: step, loss: nil) }
                bar.finish()
                let path = (out as NSString).appendingPathComponent(String(format: "%05d-%llu.png", base + j, r.seed))
                try ImageIO.writePNG(image.rgb, width: r.width, height: r.height,
                                     text: [("parameters", r.parametersText(model: modelName, loras: loraNames))], to: path)
                if let latentsOut { try writeSafeTensors(["latents": image.latents], metadata: [:], to: latentsOut) }
                if image.truncated { print("warning: image \(j + 1): the prompt or negative prompt is longer than 225 tokens; the rest was dropped") }
                total += image.seconds
                let steps = image.stepSeconds.sorted()
                print("wrote \(path) (" + String(format: "%.1f s: text %.2f s, %d steps at %.2f s/it (median), decode %.2f s",
                                                image.seconds, image.textSeconds, r.steps, steps[steps.count / 2], image.decodeSeconds) + ")")
                if Self.benchTimings {   // bench/generate: every step's time
                    print("timings: {\"steps\": [\(image.stepSeconds.map { String(format: "%.4f", $0) }.joined(separator: ", "))], \"text\": \(image.textSeconds), \"decode\": \(image.decodeSeconds), \"total\": \(image.seconds)}")
                }
            }
            try comm.barrier()
            if comm.rank == 0 { print("done: \(jobs.count) image\(jobs.count == 1 ? "" : "s") in \(out)") }
        } catch {
            FileHandle.standardError.write(Data("error (rank \(comm.rank)): \(error)\n".utf8))
            if comm.size > 1 { comm.abort(code: 1) }
            throw ExitCode.failure
        }
        try comm.finalize()
    }

    /// LORA_DIST_BENCH_TIMINGS=1: a JSON line of per-step seconds after each image (bench/generate).
    static let benchTimings = ProcessInfo.processInfo.environment["LORA_DIST_BENCH_TIMINGS"] == "1"

    /// One past the largest NNNNN of the folder's `NNNNN-*.png` files (0 for none), as A1111 numbers its outputs.
    static func firstFreeNumber(in folder: String) -> Int {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: folder)) ?? []
        let numbers = names.filter { $0.hasSuffix(".png") }.compactMap { Int($0.prefix { $0.isNumber }) }
        return (numbers.max() ?? -1) + 1
    }
}
