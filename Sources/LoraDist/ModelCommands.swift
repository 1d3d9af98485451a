import ArgumentParser
import Foundation
import SafeTensors
import SDXL
import Tensor
import Training

/// Errors from the model commands print as one clear line, without a usage dump.
struct CommandFailure: Error, CustomStringConvertible {
    let description: String
}

/// Runs `body`, turning library errors into a clean message and exit code 1.
func reporting<T>(_ body: () throws -> T) throws -> T {
    do { return try body() } catch let e as ValidationError { throw e } catch let e as ExitCode { throw e } catch {
        FileHandle.standardError.write(Data("error: \(error)\n".utf8))
        throw ExitCode.failure
    }
}

struct MakeModel: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "make-model",
        abstract: "Write a random-weight SDXL checkpoint in the real single-file layout (for tests, demos, benchmarks).")

    @OptionGroup var engine: EngineOptions
    @Option(help: "tiny (SDXL topology at toy widths) or sdxl (the real dims, ~7 GB in fp16/bf16).") var preset: String
    @Option(help: "Random seed.") var seed: UInt64 = 0
    @Option(help: "Storage dtype: fp16, bf16 or fp32.") var dtype: String = "fp16"
    @Option(help: "Output .safetensors file.") var out: String
    @Flag(help: "Write only the UNet (model.diffusion_model.*), e.g. for the UNet benchmark.") var unetOnly = false

    func validate() throws {
        guard SDXLPreset.named(preset) != nil else { throw ValidationError("--preset must be tiny or sdxl (got '\(preset)')") }
        guard ["fp16", "bf16", "fp32"].contains(dtype) else { throw ValidationError("--dtype must be fp16, bf16 or fp32 (got '\(dtype)')") }
        guard out.hasSuffix(".safetensors") else { throw ValidationError("--out must name a .safetensors file (got '\(out)')") }
    }

    func run() throws {
        engine.apply()
        let p = SDXLPreset.named(preset)!
        let dt: DType = dtype == "fp16" ? .f16 : dtype == "bf16" ? .bf16 : .f32
        try reporting {
            let tensors: [String: Tensor]
            if unetOnly {   // the same UNet tensors randomWeights makes (RandomWeights depends on seed and key only)
                let binder = WeightBinder(RandomWeights(seed: seed, dtype: dt))
                _ = UNet(binder.scope(SDXLCheckpoint.unetPrefix), config: p.unet)
                tensors = Dictionary(uniqueKeysWithValues: binder.bound.map { ($0.key, $0.tensor) })
            } else {
                tensors = p.randomWeights(seed: seed, dtype: dt)
            }
            var meta = p.metadata
            meta["lora_dist.seed"] = String(seed)
            try writeSafeTensors(tensors, metadata: meta, to: out)
            let params = tensors.values.reduce(0) { $0 + $1.count }
            print("wrote \(out): \(p.name) preset\(unetOnly ? " (UNet only)" : ""), \(tensors.count) tensors, \(params) parameters, \(dtype)")
        }
    }
}

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show what a safetensors file (or diffusers SDXL folder) holds: family, inferred configuration, dtypes, sizes, metadata.")

    @Argument(help: "A .safetensors file, or a diffusers SDXL folder.") var file: String

    func run() throws {
        try reporting {
            if DiffusersFolder.isFolder(file) {
                let ckpt = try SDXLCheckpoint(path: file)
                let folder = ckpt.diffusersFolder!
                print("folder:   \(file) (diffusers folder, read in the single-file key space)")
                for c in DiffusersComponent.allCases {
                    print("  \(c.rawValue):".padding(toLength: 20, withPad: " ", startingAt: 0) + (folder.files[c]?.joined(separator: ", ") ?? "absent"))
                }
                print("tensors:  \(folder.shapes.count)")
                print("family:   \(ckpt.family)")
                printConfiguration(ckpt)
                let unmapped = folder.unmappedKeys
                if !unmapped.isEmpty { print("unmapped diffusers keys (no SDXL tensor corresponds): " + unmapped.prefix(10).joined(separator: ", ") + (unmapped.count > 10 ? " …" : "")) }
                return
            }
            let f = try SafeTensorsFile(path: file)
            let shapes = f.shapes
            var dtypes: [String: (count: Int, bytes: Int)] = [:]
            for e in f.entries.values { dtypes[e.dtype, default: (0, 0)].count += 1; dtypes[e.dtype]!.bytes += e.range.count }
            print("file:     \(file)")
            print("tensors:  \(f.entries.count), \(f.dataBytes) bytes (\(String(format: "%.2f", Double(f.dataBytes) / 1e9)) GB)")
            print("dtypes:   " + dtypes.sorted { $0.key < $1.key }.map { "\($0.key) ×\($0.value.count)" }.joined(separator: ", "))
            let family = ModelFamily.detect(shapes)
            print("family:   \(family)")
            if family.isSDXL {
                let ckpt = try SDXLCheckpoint(path: file)
                printConfiguration(ckpt)
                let unknown = ckpt.unknownTopLevelKeys
                if !unknown.isEmpty { print("unknown keys (not loaded by any network): " + unknown.prefix(10).joined(separator: ", ") + (unknown.count > 10 ? " …" : "")) }
            }
            if !f.metadata.isEmpty {
                print("metadata:")
                for (k, v) in f.metadata.sorted(by: { $0.key < $1.key }) {
                    print("  \(k): \(v.count > 120 ? String(v.prefix(117)) + "…" : v)")
                }
            }
        }
    }
}

extension Inspect {
    func printConfiguration(_ ckpt: SDXLCheckpoint) {
        print("unet:     \(ckpt.unetConfig)")
        if let v = ckpt.vaeConfig { print("vae:      channels \(v.baseChannels)×\(v.channelMult), \(v.resBlocks) res blocks, z \(v.zChannels), scale \(v.scalingFactor)") }
        if let l = ckpt.textLConfig { print("clip-l:   width \(l.width), \(l.layers) layers, \(l.heads) heads, vocab \(l.vocab)") }
        if let g = ckpt.textGConfig { print("clip-g:   width \(g.width), \(g.layers) layers, \(g.heads) heads, projection \(g.projection ?? 0), vocab \(g.vocab)") }
    }
}

struct Eval: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run one network of a checkpoint on tensors from a safetensors file and write its outputs.",
        discussion: """
            unet:        inputs x [B,4,h,w], timesteps [B], context [B,T,2048], y [B,2816] → out
            vae-encode:  image [B,3,H,W] in [-1,1] → mean, logvar (unscaled)
            vae-decode:  latents [B,4,h,w] (divided by the scaling factor) → image
            text:        --prompt (repeatable) → context, pooled, y, tokens1, tokens2
            """)

    enum Component: String, ExpressibleByArgument, CaseIterable { case unet, vaeEncode = "vae-encode", vaeDecode = "vae-decode", text }

    @OptionGroup var engine: EngineOptions
    @Argument(help: "unet, vae-encode, vae-decode or text.") var component: Component
    @Option(help: "The SDXL single-file checkpoint.") var model: String
    @Option(help: "Input tensors (.safetensors), for unet / vae-encode / vae-decode.") var inputs: String?
    @Option(help: "A prompt (text; repeat for a batch).") var prompt: [String] = []
    @Option(help: "Token length as kohya's max_token_length: 75, 150 or 225 (text).") var maxTokenLength = 75
    @Option(help: "Image size whose size/crop embedding goes into y (text).") var size = 1024
    @Option(help: "Attention head size of the UNet (shapes cannot tell; default: the file's metadata, else 64).") var headDim: Int?
    @Option(help: "GroupNorm groups of the UNet (shapes cannot tell; default: the file's metadata, else 32).") var normGroups: Int?
    @Option(help: "Output .safetensors file.") var out: String
    @Option(help: "A kohya-format LoRA (.safetensors): its UNet modules apply to eval unet, its text-encoder modules to eval text.") var lora: String?
    @Option(help: "The LoRA's multiplier (strength).") var loraMultiplier: Float = 1

    func validate() throws {
        if lora != nil && component != .unet && component != .text { throw ValidationError("--lora applies to eval unet and eval text") }
        if component == .text {
            guard !prompt.isEmpty else { throw ValidationError("eval text needs at least one --prompt") }
        } else {
            guard inputs != nil else { throw ValidationError("eval \(component.rawValue) needs --inputs FILE") }
        }
    }

    func run() throws {
        engine.apply()
        try reporting {
            let ckpt = try SDXLCheckpoint(path: model, headDim: headDim, normGroups: normGroups)
            let outputs: [String: Tensor]
            switch component {
            case .unet:
                var adapters: ((UNet) throws -> LayerAdapters)? = nil
                if let lora {
                    let contents = try LoRAFile.read(lora)
                    let te = contents.modules(of: .textEncoder1).count + contents.modules(of: .textEncoder2).count
                    if te > 0 { print("note: \(lora) also has \(te) text-encoder modules; eval unet applies the UNet's (eval text the others)") }
                    adapters = { try LoRANetwork(unet: $0, contents: contents, multiplier: self.loraMultiplier) }
                }
                outputs = try Evaluate.unet(ckpt, inputs: try SafeTensorsFile(path: inputs!), adapters: adapters)
            case .vaeEncode: outputs = try Evaluate.vaeEncode(ckpt, inputs: try SafeTensorsFile(path: inputs!))
            case .vaeDecode: outputs = try Evaluate.vaeDecode(ckpt, inputs: try SafeTensorsFile(path: inputs!))
            case .text:
                let tokenizers = (try CLIPTokenizer.bundled(padding: .endOfText), try CLIPTokenizer.bundled(padding: .zero))
                var adapters: ((CLIPTextEncoderL, OpenCLIPTextEncoderG) throws -> LayerAdapters)? = nil
                if let lora {
                    let contents = try LoRAFile.read(lora)
                    if contents.modules(of: .textEncoder1).isEmpty && contents.modules(of: .textEncoder2).isEmpty {
                        print("note: \(lora) has no text-encoder modules (trained UNet-only); the encoders run unchanged")
                    }
                    adapters = { try LoRANetwork(unet: nil, textEncoders: ($0, $1), contents: contents, multiplier: self.loraMultiplier) }
                }
                outputs = try Evaluate.text(ckpt, prompts: prompt, maxTokenLength: maxTokenLength, size: size, tokenizers: tokenizers,
                                            adapters: adapters)
            }
            try writeSafeTensors(outputs, metadata: ["lora_dist.eval": component.rawValue, "model": model], to: out)
            print("wrote \(out): " + outputs.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value.shape)" }.joined(separator: ", "))
        }
    }
}
