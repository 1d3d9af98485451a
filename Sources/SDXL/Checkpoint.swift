import Foundation
import SafeTensors
import Tensor

/// The four networks of an SDXL checkpoint, as sizes. Presets: `sdxl` (the real dims) and `tiny` (the same
/// topology at toy widths, full 49,408-token vocabulary: real captions work, a step takes milliseconds).
public struct SDXLPreset: Equatable {
    public var name: String
    public var unet: UNetConfig
    public var vae: VAEConfig
    public var textL: CLIPTextConfig
    public var textG: CLIPTextConfig

    /// Width of each of the six size/crop embeddings in `y` (256 for SDXL): (adm − pooled) / 6.
    public var sizeEmbedDim: Int { (unet.admInChannels - (textG.projection ?? textG.width)) / 6 }

    public static let sdxl = SDXLPreset(name: "sdxl", unet: .sdxl, vae: .sdxl, textL: .clipL, textG: .bigG)

    public static let tiny: SDXLPreset = {
        let l = CLIPTextConfig(vocab: 49408, width: 32, layers: 2, heads: 2, projection: nil)
        let g = CLIPTextConfig(vocab: 49408, width: 48, layers: 2, heads: 3, projection: 48)
        var unet = UNetConfig.tiny
        unet.contextDim = l.width + g.width          // 80
        unet.admInChannels = 48 + 6 * 8              // pooled 48 ⊕ six 8-d size/crop embeddings
        return SDXLPreset(name: "tiny", unet: unet, vae: .tiny, textL: l, textG: g)
    }()

    public static func named(_ name: String) -> SDXLPreset? { ["sdxl": sdxl, "tiny": tiny][name] }

    /// Metadata that records what shapes cannot tell (head size, norm groups), so the file loads back as built.
    public var metadata: [String: String] {
        ["modelspec.architecture": "stable-diffusion-xl-v1-base", "lora_dist.preset": name,
         Self.headDimKey: String(unet.headDim), Self.normGroupsKey: String(unet.normGroups)]
    }

    public static let headDimKey = "lora_dist.unet.head_dim"
    public static let normGroupsKey = "lora_dist.unet.norm_groups"

    /// Every tensor of a random-weight checkpoint of this preset, under its single-file key: the models are
    /// built on a recording binder, so the file holds exactly the keys they load.
    public func randomWeights(seed: UInt64, dtype: DType) -> [String: Tensor] {
        let binder = WeightBinder(RandomWeights(seed: seed, dtype: dtype))
        _ = UNet(binder.scope(SDXLCheckpoint.unetPrefix), config: unet)
        _ = VAE(binder.scope(SDXLCheckpoint.vaePrefix), config: vae)
        _ = CLIPTextEncoderL(binder.scope(CLIPTextEncoderL.keyPrefix), config: textL)
        _ = OpenCLIPTextEncoderG(binder.scope(OpenCLIPTextEncoderG.keyPrefix), config: textG)
        return Dictionary(uniqueKeysWithValues: binder.bound.map { ($0.key, $0.tensor) })
    }
}

/// A single-file SDXL checkpoint: detected, its configuration inferred from its shapes, each network
/// loaded strictly on demand (frozen weights stay memory-mapped in the file's dtype).
public struct SDXLCheckpoint {
    public static let unetPrefix = "model.diffusion_model"
    public static let vaePrefix = "first_stage_model"

    /// Keys real SDXL files carry that no network uses: LDM's DDPM schedule buffers, EMA bookkeeping and
    /// prediction-type markers. Anything else outside the four networks is an error.
    public static let ignorableKeys: Set<String> = [
        "alphas_cumprod", "alphas_cumprod_prev", "betas", "log_one_minus_alphas_cumprod",
        "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance",
        "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod", "model_ema.decay", "model_ema.num_updates", "v_pred", "ztsnr",
    ]

    public let file: SafeTensorsFile
    public let shapes: [String: [Int]]
    public let family: ModelFamily
    public let unetConfig: UNetConfig
    public let vaeConfig: VAEConfig?
    public let textLConfig: CLIPTextConfig?
    public let textGConfig: CLIPTextConfig?

    public var path: String { file.path }

    /// Opens and identifies `path`. Files of other families are refused by name. `headDim`/`normGroups`
    /// override what shapes cannot tell (default: the file's lora_dist metadata, else SDXL's 64 and 32).
    public init(path: String, headDim: Int? = nil, normGroups: Int? = nil) throws {
        file = try SafeTensorsFile(path: path)
        let shapes = file.shapes
        self.shapes = shapes
        family = ModelFamily.detect(shapes)
        try ModelFamily.requireSDXL(shapes, file: path)
        let head = headDim ?? file.metadata[SDXLPreset.headDimKey].flatMap { Int($0) } ?? 64
        let groups = normGroups ?? file.metadata[SDXLPreset.normGroupsKey].flatMap { Int($0) } ?? 32
        unetConfig = try UNetConfig.infer(shapes: shapes, headDim: head, normGroups: groups)
        let has = { (prefix: String) in shapes.keys.contains { $0.hasPrefix(prefix + ".") } }
        vaeConfig = has(Self.vaePrefix) ? try VAEConfig.infer(shapes: shapes) : nil
        textLConfig = has(CLIPTextEncoderL.keyPrefix) ? try CLIPTextConfig.inferL(shapes: shapes) : nil
        textGConfig = has(OpenCLIPTextEncoderG.keyPrefix) ? try CLIPTextConfig.inferG(shapes: shapes) : nil
    }

    /// Keys outside the four networks that are not on the ignorable list (a strict whole-file check).
    public var unknownTopLevelKeys: [String] {
        let prefixes = [Self.unetPrefix, Self.vaePrefix, "conditioner.embedders.0.", "conditioner.embedders.1."]
        return shapes.keys.filter { key in
            !prefixes.contains { key.hasPrefix($0) } && !Self.ignorableKeys.contains(key)
        }.sorted()
    }

    private func missing(_ what: String) -> Error {
        SafeTensorsError(path: path, problem: "has no \(what) weights (a UNet-only or partial file?)")
    }

    public func unet() throws -> UNet {
        let binder = WeightBinder(file)
        let model = UNet(binder.scope(Self.unetPrefix), config: unetConfig)
        try binder.finish(checkingUnusedUnder: [Self.unetPrefix + "."])
        return model
    }

    public func vae() throws -> VAE {
        guard let config = vaeConfig else { throw missing("VAE (first_stage_model.*)") }
        let binder = WeightBinder(file)
        let model = VAE(binder.scope(Self.vaePrefix), config: config)
        try binder.finish(checkingUnusedUnder: [Self.vaePrefix + "."])
        return model
    }

    public func textEncoders(pooledProjection: OpenCLIPTextEncoderG.PooledProjection = .openCLIP) throws
        -> (l: CLIPTextEncoderL, g: OpenCLIPTextEncoderG) {
        guard let lc = textLConfig else { throw missing("CLIP-L text encoder (conditioner.embedders.0.*)") }
        guard let gc = textGConfig else { throw missing("OpenCLIP bigG text encoder (conditioner.embedders.1.*)") }
        let binder = WeightBinder(file)
        let l = CLIPTextEncoderL(binder.scope(CLIPTextEncoderL.keyPrefix), config: lc)
        let g = OpenCLIPTextEncoderG(binder.scope(OpenCLIPTextEncoderG.keyPrefix), config: gc, pooledProjection: pooledProjection)
        try binder.finish(checkingUnusedUnder: [CLIPTextEncoderL.keyPrefix + ".", OpenCLIPTextEncoderG.keyPrefix + "."]) {
            CLIPTextEncoderL.isIgnorable($0) || OpenCLIPTextEncoderG.isIgnorable($0)
        }
        return (l, g)
    }

    /// Width of each size/crop embedding in `y`.
    public var sizeEmbedDim: Int? {
        guard let g = textGConfig else { return nil }
        return (unetConfig.admInChannels - (g.projection ?? g.width)) / 6
    }
}
