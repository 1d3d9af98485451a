import Foundation
import SafeTensors
import Tensor

/// Runs one network of a checkpoint on tensors read from a safetensors file (`lora-dist eval`), with the
/// tensor names documented in the README. Inputs are checked before anything runs: a missing or
/// mis-shaped tensor is an error naming it and what was expected.
public enum Evaluate {
    public struct InputError: Error, CustomStringConvertible {
        public let description: String
    }

    static func input(_ file: SafeTensorsFile, _ name: String, rank: Int, _ expect: String) throws -> Tensor {
        guard file.entries[name] != nil else {
            throw InputError(description: "\(file.path) has no tensor '\(name)' (expected \(expect))")
        }
        let t = try file.tensor(name)
        guard t.rank == rank else {
            throw InputError(description: "\(file.path): '\(name)' is \(t.shape), expected \(expect)")
        }
        return t.fp32()
    }

    /// x [B,4,h,w], timesteps [B], context [B,T,contextDim], y [B,admIn] → out [B,4,h,w]. `adapters` (e.g. a LoRA)
    /// is built on the loaded UNet and runs with it.
    public static func unet(_ ckpt: SDXLCheckpoint, inputs: SafeTensorsFile,
                            adapters: ((UNet) throws -> LayerAdapters)? = nil) throws -> [String: Tensor] {
        let c = ckpt.unetConfig
        let x = try input(inputs, "x", rank: 4, "[B, \(c.inChannels), h, w]")
        let b = x.shape[0]
        let ts = try input(inputs, "timesteps", rank: 1, "[\(b)]")
        let context = try input(inputs, "context", rank: 3, "[\(b), T, \(c.contextDim)]")
        let y = try input(inputs, "y", rank: 2, "[\(b), \(c.admInChannels)]")
        let levels = 1 << (c.channelMult.count - 1)
        guard x.shape[1] == c.inChannels, x.shape[2] % levels == 0, x.shape[3] % levels == 0 else {
            throw InputError(description: "\(inputs.path): 'x' is \(x.shape); the UNet takes [B, \(c.inChannels), h, w] with h and w multiples of \(levels)")
        }
        guard ts.shape == [b], context.shape[0] == b, context.shape[2] == c.contextDim, y.shape == [b, c.admInChannels] else {
            throw InputError(description: "\(inputs.path): timesteps \(ts.shape), context \(context.shape), y \(y.shape) do not fit x \(x.shape): expected [\(b)], [\(b), T, \(c.contextDim)], [\(b), \(c.admInChannels)]")
        }
        let model = try ckpt.unet()
        let tape = Tape(recording: false, adapters: try adapters?(model))
        let out = model(tape, x: Var(x), timesteps: Var(ts), context: Var(context), y: Var(y))
        return ["out": out.value]
    }

    /// image [B,3,H,W] in [−1, 1] → mean, logvar [B,4,H/f,W/f] (unscaled: multiply by the scaling factor to get latents).
    public static func vaeEncode(_ ckpt: SDXLCheckpoint, inputs: SafeTensorsFile) throws -> [String: Tensor] {
        let image = try input(inputs, "image", rank: 4, "[B, 3, H, W] in [-1, 1]")
        guard image.shape[1] == 3 else { throw InputError(description: "\(inputs.path): 'image' is \(image.shape), expected [B, 3, H, W]") }
        let model = try ckpt.vae()
        let (mean, logvar) = model.encode(Tape(recording: false), Var(image))
        return ["mean": mean.value, "logvar": logvar.value]
    }

    /// latents [B,4,h,w] (already divided by the scaling factor) → image [B,3,H,W].
    public static func vaeDecode(_ ckpt: SDXLCheckpoint, inputs: SafeTensorsFile) throws -> [String: Tensor] {
        let z = try input(inputs, "latents", rank: 4, "[B, 4, h, w], divided by the scaling factor")
        let model = try ckpt.vae()
        return ["image": model.decode(Tape(recording: false), Var(z)).value]
    }

    /// prompts → context [B, 75n+2, contextDim], pooled [B, P], tokens1/tokens2 [B, n, 77] (as floats), and y for
    /// a square `size` image without crop. maxTokenLength 75, 150 or 225 (kohya's max_token_length). `adapters`
    /// (e.g. a LoRA's text-encoder modules) are built for the two encoders.
    public static func text(_ ckpt: SDXLCheckpoint, prompts: [String], maxTokenLength: Int, size: Int,
                            tokenizers: (CLIPTokenizer, CLIPTokenizer),
                            adapters: ((CLIPTextEncoderL, OpenCLIPTextEncoderG) throws -> LayerAdapters)? = nil) throws -> [String: Tensor] {
        guard [75, 150, 225].contains(maxTokenLength) else {
            throw InputError(description: "max token length \(maxTokenLength): use 75, 150 or 225 (as kohya's max_token_length)")
        }
        let (l, g) = try ckpt.textEncoders()
        for (tokenizer, config, name) in [(tokenizers.0, l.config, "CLIP-L"), (tokenizers.1, g.config, "bigG")]
        where tokenizer.vocabularySize > config.vocab {
            throw InputError(description: "\(ckpt.path): the \(name) text encoder has a \(config.vocab)-token vocabulary, the CLIP tokenizer produces ids up to \(tokenizer.vocabularySize - 1)")
        }
        let idsL = prompts.map { tokenizers.0.chunks($0, maxTokenLength: maxTokenLength) }
        let idsG = prompts.map { tokenizers.1.chunks($0, maxTokenLength: maxTokenLength) }
        let t = Tape(recording: false, adapters: try adapters?(l, g))
        let (context, pooled) = Conditioning.encode(t, l: l, g: g, idsL: idsL, idsG: idsG)
        let sizes = prompts.map { _ in (h: size, w: size) }
        let y = Conditioning.y(t, pooled: pooled, originalSize: sizes, cropTopLeft: prompts.map { _ in (top: 0, left: 0) },
                               targetSize: sizes, embedDim: ckpt.sizeEmbedDim ?? 256)
        func ids(_ all: [[[Int]]]) -> Tensor {
            Tensor(shape: [all.count, all[0].count, all[0][0].count], all.flatMap { $0.flatMap { $0.map(Float.init) } })
        }
        return ["context": context.value, "pooled": pooled.value, "y": y.value, "tokens1": ids(idsL), "tokens2": ids(idsG)]
    }
}
