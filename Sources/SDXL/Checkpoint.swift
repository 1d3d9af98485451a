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
        // Four VAE levels like SDXL's, so latents are 1/8 of the image as everywhere downstream assumes
        // (VAEConfig.tiny, the diffusers fixture's shape, has two levels: 1/2).
        let vae = VAEConfig(baseChannels: 32, channelMult: [1, 1, 1, 1], resBlocks: 1, zChannels: 4, scalingFactor: 0.13025)
        return SDXLPreset(name: "tiny", unet: unet, vae: vae, textL: l, textG: g)
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

/// An SDXL checkpoint — a single file, or a diffusers folder read in the single-file key space
/// (`DiffusersFolder`) — detected, its configuration inferred from its shapes, each network loaded strictly
/// on demand (frozen weights stay memory-mapped in the file's dtype).
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

    /// Where the networks' weights come from: the file, or the diffusers folder.
    public let source: any WeightSource
    /// The single file (nil when opened from a diffusers folder).
    public let file: SafeTensorsFile!
    /// The diffusers folder (nil for a single file).
    public let diffusersFolder: DiffusersFolder?
    public let path: String
    /// Canonical (single-file) key → shape.
    public let shapes: [String: [Int]]
    public let family: ModelFamily
    public let unetConfig: UNetConfig
    public let vaeConfig: VAEConfig?
    public let textLConfig: CLIPTextConfig?
    public let textGConfig: CLIPTextConfig?

    /// Opens and identifies `path`: a .safetensors file, or a diffusers folder (a directory: see
    /// `DiffusersFolder`). Other families are refused by name. `headDim`/`normGroups` override what shapes
    /// cannot tell (default: the file's lora_dist metadata or the folder's unet/config.json, else SDXL's 64 and 32).
    public init(path: String, headDim: Int? = nil, normGroups: Int? = nil) throws {
        self.path = path
        let metaHead: Int?, metaGroups: Int?, vaeScale: Float?
        if DiffusersFolder.isFolder(path) {
            let folder = try DiffusersFolder(path: path)
            (source, file, diffusersFolder) = (folder, nil, folder)
            (shapes, metaHead, metaGroups, vaeScale) = (folder.shapes, folder.unetHeadDim, folder.unetNormGroups, folder.vaeScalingFactor)
        } else {
            let file = try SafeTensorsFile(path: path)
            (source, self.file, diffusersFolder) = (file, file, nil)
            shapes = file.shapes
            metaHead = file.metadata[SDXLPreset.headDimKey].flatMap { Int($0) }
            metaGroups = file.metadata[SDXLPreset.normGroupsKey].flatMap { Int($0) }
            vaeScale = nil
        }
        let shapes = self.shapes
        family = ModelFamily.detect(shapes)
        try ModelFamily.requireSDXL(shapes, file: path)
        unetConfig = try UNetConfig.infer(shapes: shapes, headDim: headDim ?? metaHead ?? 64, normGroups: normGroups ?? metaGroups ?? 32)
        let has = { (prefix: String) in shapes.keys.contains { $0.hasPrefix(prefix + ".") } }
        var vae = has(Self.vaePrefix) ? try VAEConfig.infer(shapes: shapes) : nil
        if let vaeScale { vae?.scalingFactor = vaeScale }
        vaeConfig = vae
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

    private func missing(_ what: String, _ component: DiffusersComponent) -> Error {
        guard diffusersFolder != nil else {
            return SafeTensorsError(path: path, problem: "has no \(what) weights (a UNet-only or partial file?)")
        }
        let stem = "\(component.rawValue)/\(component.weightsStem)"
        return DiffusersFolderError(description: "\(path): diffusers folder without \(what) weights: no \(stem).safetensors (nor .fp16.safetensors)")
    }

    /// The strict check, with a folder's keys named as they are in the folder too.
    private func finish(_ binder: WeightBinder, _ prefixes: [String], ignorable: (String) -> Bool = { _ in false }) throws {
        do {
            try binder.finish(checkingUnusedUnder: prefixes, ignorable: ignorable)
        } catch let e as WeightLoadError {
            throw diffusersFolder?.annotate(e) ?? e
        }
    }

    public func unet() throws -> UNet {
        let binder = WeightBinder(source)
        let model = UNet(binder.scope(Self.unetPrefix), config: unetConfig)
        try finish(binder, [Self.unetPrefix + "."])
        return model
    }

    public func vae() throws -> VAE {
        guard let config = vaeConfig else { throw missing("VAE (first_stage_model.*)", .vae) }
        let binder = WeightBinder(source)
        let model = VAE(binder.scope(Self.vaePrefix), config: config)
        try finish(binder, [Self.vaePrefix + "."])
        return model
    }

    public func textEncoders(pooledProjection: OpenCLIPTextEncoderG.PooledProjection = .openCLIP) throws
        -> (l: CLIPTextEncoderL, g: OpenCLIPTextEncoderG) {
        guard let lc = textLConfig else { throw missing("CLIP-L text encoder (conditioner.embedders.0.*)", .textEncoder) }
        guard let gc = textGConfig else { throw missing("OpenCLIP bigG text encoder (conditioner.embedders.1.*)", .textEncoder2) }
        let binder = WeightBinder(source)
        let l = CLIPTextEncoderL(binder.scope(CLIPTextEncoderL.keyPrefix), config: lc)
        let g = OpenCLIPTextEncoderG(binder.scope(OpenCLIPTextEncoderG.keyPrefix), config: gc, pooledProjection: pooledProjection)
        try finish(binder, [CLIPTextEncoderL.keyPrefix + ".", OpenCLIPTextEncoderG.keyPrefix + "."]) {
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
