import Tensor

/// The shape of an LDM AutoencoderKL (sgm `AutoencoderKLInferenceWrapper` / diffusers `AutoencoderKL`).
///
/// `channelMult` is LDM's `ch_mult`: level i has `baseChannels · channelMult[i]` channels (diffusers'
/// `block_out_channels = [baseChannels · m for m in channelMult]`). `resBlocks` is LDM's
/// `num_res_blocks` (= diffusers' `layers_per_block`): the encoder has that many ResNet blocks per
/// level, the decoder one more. GroupNorm is always 32 groups with eps 1e-6, as in every LDM VAE.
public struct VAEConfig: Equatable {
    public var baseChannels: Int
    public var channelMult: [Int]
    public var resBlocks: Int
    public var zChannels: Int
    /// Latents are cached as `scalingFactor · sample` and fed back to `decode` divided by it (diffusers'
    /// `vae.config.scaling_factor`; sgm's `scale_factor`). Not a weight: `infer` cannot read it from a
    /// file and gives SDXL's value.
    public var scalingFactor: Float

    public init(baseChannels: Int, channelMult: [Int], resBlocks: Int, zChannels: Int, scalingFactor: Float) {
        self.baseChannels = baseChannels
        self.channelMult = channelMult
        self.resBlocks = resBlocks
        self.zChannels = zChannels
        self.scalingFactor = scalingFactor
    }

    /// SDXL's VAE (sgm `configs/inference/sd_xl_base.yaml`, first_stage_config): ch 128, ch_mult
    /// [1, 2, 4, 4], 2 res blocks, z 4, scale 0.13025. Downsampling factor 8.
    public static let sdxl = VAEConfig(baseChannels: 128, channelMult: [1, 2, 4, 4], resBlocks: 2, zChannels: 4,
                                       scalingFactor: 0.13025)
    /// The smallest VAE of the same design (32 channels, two levels, factor 2), for tests and the
    /// conformance fixture (Tests/Fixtures/sdxl/make_vae.py).
    public static let tiny = VAEConfig(baseChannels: 32, channelMult: [1, 2], resBlocks: 1, zChannels: 4,
                                       scalingFactor: 0.13025)

    /// Spatial downsampling factor: 2^(levels − 1).
    public var downsamplingFactor: Int { 1 << (channelMult.count - 1) }

    /// Reads the configuration from a checkpoint's `first_stage_model.*` shapes: the base width from
    /// `encoder.conv_in`, one level per `encoder.down.{i}`, its width from that level's first conv,
    /// the block count from `encoder.down.0.block.{j}`, z from `decoder.conv_in`. The scaling factor is
    /// SDXL's (see `scalingFactor`).
    public static func infer(shapes: [String: [Int]]) throws -> VAEConfig {
        let prefix = "first_stage_model."
        func shape(_ key: String, rank: Int) throws -> [Int] {
            guard let s = shapes[prefix + key] else { throw VAEConfigError(key: prefix + key, problem: "missing") }
            guard s.count == rank else { throw VAEConfigError(key: prefix + key, problem: "has shape \(s), want rank \(rank)") }
            return s
        }
        let base = try shape("encoder.conv_in.weight", rank: 4)[0]
        var mult: [Int] = []
        while shapes["\(prefix)encoder.down.\(mult.count).block.0.conv1.weight"] != nil {
            let key = "encoder.down.\(mult.count).block.0.conv1.weight"
            let width = try shape(key, rank: 4)[0]
            guard base > 0, width % base == 0 else {
                throw VAEConfigError(key: prefix + key, problem: "has \(width) channels, not a multiple of the base \(base)")
            }
            mult.append(width / base)
        }
        guard !mult.isEmpty else { throw VAEConfigError(key: prefix + "encoder.down.0.block.0.conv1.weight", problem: "missing") }
        var blocks = 0
        while shapes["\(prefix)encoder.down.0.block.\(blocks).conv1.weight"] != nil { blocks += 1 }
        let z = try shape("decoder.conv_in.weight", rank: 4)[1]
        return VAEConfig(baseChannels: base, channelMult: mult, resBlocks: blocks, zChannels: z,
                         scalingFactor: VAEConfig.sdxl.scalingFactor)
    }
}

/// `VAEConfig.infer` could not read a shape it needs.
public struct VAEConfigError: Error, CustomStringConvertible {
    public let key: String
    public let problem: String
    public var description: String { "cannot infer the VAE configuration: \(key) \(problem)" }
}

/// The SDXL VAE (LDM AutoencoderKL) in the single-file key space under `first_stage_model.`, matching
/// diffusers' `AutoencoderKL` (`convert_ldm_vae_checkpoint` maps between the two key spaces).
///
/// It computes on the current kernel family (Kernels): fp32, or bf16 with fp32 accumulation (bf16 has fp32's
/// exponent range, so SDXL's VAE does not overflow as it does in fp16); kohya's no_half_vae keeps it fp32.
///
/// Latent caching (kohya `cache_latents`, diffusers training scripts): `encode` gives the posterior's
/// mean and log-variance; the cached latent is `scalingFactor · (mean + exp(logvar / 2) · noise)` (or
/// `scalingFactor · mean`), and `decode` takes latents already divided by `scalingFactor`. Scaling is
/// the caller's business.
public final class VAE {
    public let config: VAEConfig
    let encoder: Encoder
    let decoder: Decoder
    let quantConv: Conv2dLayer          // 1×1, 2z → 2z
    let postQuantConv: Conv2dLayer      // 1×1, z → z

    /// `w` is the VAE's root: `binder.scope("first_stage_model")`.
    public init(_ w: WeightScope, config: VAEConfig) {
        self.config = config
        encoder = Encoder(w["encoder"], config)
        decoder = Decoder(w["decoder"], config)
        quantConv = Conv2dLayer(w["quant_conv"], 2 * config.zChannels, 2 * config.zChannels, kernel: 1)
        postQuantConv = Conv2dLayer(w["post_quant_conv"], config.zChannels, config.zChannels, kernel: 1)
    }

    /// image [B, 3, H, W] in [-1, 1] (H, W multiples of the downsampling factor) → the posterior's
    /// (mean, logvar), each [B, z, H/f, W/f]. logvar is clamped to [-30, 20] as diffusers'
    /// `DiagonalGaussianDistribution` does (`AutoencoderKL.encode(x).latent_dist`).
    public func encode(_ t: Tape, _ image: Var) -> (mean: Var, logvar: Var) {
        precondition(image.shape.count == 4 && image.shape[1] == 3, "VAE.encode takes [B, 3, H, W], got \(image.shape)")
        let f = config.downsamplingFactor
        precondition(image.shape[2] % f == 0 && image.shape[3] % f == 0,
                     "VAE.encode: \(image.shape[2])×\(image.shape[3]) is not a multiple of \(f)")
        let moments = quantConv(t, encoder(t, image))          // [B, 2z, h, w]
        let halves = t.chunk(moments, 2, axis: 1)
        return (halves[0], VAE.clamp(t, halves[1], -30, 20))
    }

    /// latents [B, z, h, w] (already divided by `scalingFactor`) → image [B, 3, h·f, w·f], nominally in
    /// [-1, 1] (diffusers `AutoencoderKL.decode(z).sample`).
    public func decode(_ t: Tape, _ z: Var) -> Var {
        precondition(z.shape.count == 4 && z.shape[1] == config.zChannels,
                     "VAE.decode takes [B, \(config.zChannels), h, w], got \(z.shape)")
        return decoder(t, postQuantConv(t, z))
    }

    /// torch.clamp(x, lo, hi): the gradient passes where lo ≤ x ≤ hi, as in PyTorch's clamp backward.
    static func clamp(_ t: Tape, _ x: Var, _ lo: Float, _ hi: Float) -> Var {
        let xs = x.value.scalars
        let out = Tensor(shape: x.shape, xs.map { Swift.min(Swift.max($0, lo), hi) })
        return t.record(out, inputs: [x]) { g, _ in
            let gs = g.scalars
            return [Tensor(shape: g.shape, (0..<gs.count).map { xs[$0] >= lo && xs[$0] <= hi ? gs[$0] : 0 })]
        }
    }

    static let groupNormEps: Float = 1e-6

    /// LDM `ResnetBlock` with no time embedding and no dropout (diffusers `ResnetBlock2D`, temb None):
    /// x + conv2(silu(norm2(conv1(silu(norm1(x)))))), the skip through a 1×1 `nin_shortcut` when the
    /// width changes (diffusers `conv_shortcut`).
    struct ResnetBlock {
        let norm1: GroupNormLayer, conv1: Conv2dLayer
        let norm2: GroupNormLayer, conv2: Conv2dLayer
        let shortcut: Conv2dLayer?

        init(_ w: WeightScope, _ inChannels: Int, _ outChannels: Int) {
            norm1 = GroupNormLayer(w["norm1"], channels: inChannels, eps: VAE.groupNormEps)
            conv1 = Conv2dLayer(w["conv1"], inChannels, outChannels, kernel: 3)
            norm2 = GroupNormLayer(w["norm2"], channels: outChannels, eps: VAE.groupNormEps)
            conv2 = Conv2dLayer(w["conv2"], outChannels, outChannels, kernel: 3)
            shortcut = inChannels == outChannels ? nil : Conv2dLayer(w["nin_shortcut"], inChannels, outChannels, kernel: 1)
        }

        func callAsFunction(_ t: Tape, _ x: Var) -> Var {
            let h = conv1(t, t.silu(norm1(t, x)))             // [B, out, H, W]
            let r = conv2(t, t.silu(norm2(t, h)))
            return t.add(shortcut.map { $0(t, x) } ?? x, r)
        }
    }

    /// LDM `AttnBlock` (diffusers mid-block `Attention`, one head of width C, residual): the H·W pixels
    /// are tokens. LDM files hold q/k/v/proj_out as 1×1 convs [C, C, 1, 1] — the canonical shape,
    /// required here; they run as linears on [B, HW, C] (the same product without two permutes).
    struct AttentionBlock {
        let norm: GroupNormLayer
        let q: LinearLayer, k: LinearLayer, v: LinearLayer, projOut: LinearLayer

        init(_ w: WeightScope, _ channels: Int) {
            norm = GroupNormLayer(w["norm"], channels: channels, eps: VAE.groupNormEps)
            func conv1x1(_ name: String) -> LinearLayer {
                let s = w[name]
                return LinearLayer(path: s.path, weight: s.tensor("weight", [channels, channels, 1, 1]).reshaped([channels, channels]),
                                   bias: s.tensor("bias", [channels]))
            }
            q = conv1x1("q"); k = conv1x1("k"); v = conv1x1("v"); projOut = conv1x1("proj_out")
        }

        func callAsFunction(_ t: Tape, _ x: Var) -> Var {
            let b = x.shape[0], c = x.shape[1], h = x.shape[2], w = x.shape[3]
            let tokens = t.reshape(t.permute(norm(t, x), [0, 2, 3, 1]), [b, h * w, c])     // [B, HW, C]
            let attended = t.attention(q(t, tokens), k(t, tokens), v(t, tokens), heads: 1)  // softmax(qkᵀ/√C)·v
            let out = t.permute(t.reshape(projOut(t, attended), [b, h, w, c]), [0, 3, 1, 2])  // [B, C, H, W]
            return t.add(x, out)
        }
    }

    /// LDM `mid`: block_1, attn_1, block_2 (diffusers `UNetMidBlock2D`).
    struct MidBlock {
        let block1: ResnetBlock, attention: AttentionBlock, block2: ResnetBlock

        init(_ w: WeightScope, _ channels: Int) {
            block1 = ResnetBlock(w["block_1"], channels, channels)
            attention = AttentionBlock(w["attn_1"], channels)
            block2 = ResnetBlock(w["block_2"], channels, channels)
        }

        func callAsFunction(_ t: Tape, _ x: Var) -> Var { block2(t, attention(t, block1(t, x))) }
    }

    /// LDM `Encoder` (double_z): conv_in, per level `resBlocks` blocks then (but at the last level) a
    /// stride-2 downsample, mid, norm_out, SiLU, conv_out to 2z channels (mean and logvar).
    struct Encoder {
        let convIn: Conv2dLayer
        let levels: [(blocks: [ResnetBlock], downsample: Conv2dLayer?)]
        let mid: MidBlock
        let normOut: GroupNormLayer
        let convOut: Conv2dLayer

        init(_ w: WeightScope, _ config: VAEConfig) {
            let widths = config.channelMult.map { config.baseChannels * $0 }
            convIn = Conv2dLayer(w["conv_in"], 3, config.baseChannels, kernel: 3)
            var levels: [(blocks: [ResnetBlock], downsample: Conv2dLayer?)] = []
            var channels = config.baseChannels
            for (i, width) in widths.enumerated() {
                let level = w["down"][i]
                var blocks: [ResnetBlock] = []
                for j in 0..<config.resBlocks {
                    blocks.append(ResnetBlock(level["block"][j], channels, width))
                    channels = width
                }
                // LDM Downsample(with_conv): pad (0, 1, 0, 1) then 3×3 stride 2 without padding.
                let down = i == widths.count - 1 ? nil
                    : Conv2dLayer(level["downsample"]["conv"], width, width, kernel: 3, stride: 2, padding: 0)
                levels.append((blocks, down))
            }
            self.levels = levels
            mid = MidBlock(w["mid"], channels)
            normOut = GroupNormLayer(w["norm_out"], channels: channels, eps: VAE.groupNormEps)
            convOut = Conv2dLayer(w["conv_out"], channels, 2 * config.zChannels, kernel: 3)
        }

        func callAsFunction(_ t: Tape, _ image: Var) -> Var {
            var h = convIn(t, image)
            for level in levels {
                for block in level.blocks { h = block(t, h) }
                if let down = level.downsample { h = down(t, VAE.padRightBottom(t, h)) }
            }
            h = mid(t, h)
            return convOut(t, t.silu(normOut(t, h)))          // [B, 2z, H/f, W/f]
        }
    }

    /// LDM `Decoder`: conv_in, mid, then the levels from the deepest up (`up.{L-1}` first: LDM numbers
    /// `up` by resolution, so `up.{L-1-i}` is diffusers' `up_blocks.{i}`), each `resBlocks + 1` blocks
    /// then (but at level 0) nearest 2× and a 3×3 conv; norm_out, SiLU, conv_out to RGB.
    struct Decoder {
        let convIn: Conv2dLayer
        let mid: MidBlock
        let levels: [(blocks: [ResnetBlock], upsample: Conv2dLayer?)]   // deepest first (execution order)
        let normOut: GroupNormLayer
        let convOut: Conv2dLayer

        init(_ w: WeightScope, _ config: VAEConfig) {
            let widths = config.channelMult.map { config.baseChannels * $0 }
            var channels = widths.last!
            convIn = Conv2dLayer(w["conv_in"], config.zChannels, channels, kernel: 3)
            mid = MidBlock(w["mid"], channels)
            var levels: [(blocks: [ResnetBlock], upsample: Conv2dLayer?)] = []
            for i in widths.indices.reversed() {
                let level = w["up"][i]
                var blocks: [ResnetBlock] = []
                for j in 0..<(config.resBlocks + 1) {
                    blocks.append(ResnetBlock(level["block"][j], channels, widths[i]))
                    channels = widths[i]
                }
                let up = i == 0 ? nil : Conv2dLayer(level["upsample"]["conv"], channels, channels, kernel: 3)
                levels.append((blocks, up))
            }
            self.levels = levels
            normOut = GroupNormLayer(w["norm_out"], channels: channels, eps: VAE.groupNormEps)
            convOut = Conv2dLayer(w["conv_out"], channels, 3, kernel: 3)
        }

        func callAsFunction(_ t: Tape, _ z: Var) -> Var {
            var h = mid(t, convIn(t, z))
            for level in levels {
                for block in level.blocks { h = block(t, h) }
                if let up = level.upsample { h = up(t, t.upsampleNearest2x(h)) }
            }
            return convOut(t, t.silu(normOut(t, h)))          // [B, 3, H, W]
        }
    }

    /// F.pad(x, (0, 1, 0, 1)) on [B, C, H, W]: one zero column on the right, one zero row at the bottom
    /// (LDM `Downsample`, diffusers `Downsample2D(padding=0)`), built from concats so gradients flow.
    static func padRightBottom(_ t: Tape, _ x: Var) -> Var {
        let b = x.shape[0], c = x.shape[1], h = x.shape[2], w = x.shape[3]
        let wider = t.concat([x, Var(Tensor(zeros: [b, c, h, 1]))], axis: 3)          // [B, C, H, W+1]
        return t.concat([wider, Var(Tensor(zeros: [b, c, 1, w + 1]))], axis: 2)      // [B, C, H+1, W+1]
    }
}
