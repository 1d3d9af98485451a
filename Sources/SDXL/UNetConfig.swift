/// The shape of an SDXL-style UNet (sgm's `UNetModel` with `use_linear_in_transformer`, `adm_in_channels`
/// and `num_head_channels`): what `UNet` builds and what a checkpoint's shapes must agree with.
public struct UNetConfig: Equatable, CustomStringConvertible {
    public var inChannels: Int
    public var outChannels: Int
    /// Width of level 0 and of the sinusoidal timestep embedding (320 for SDXL).
    public var modelChannels: Int
    /// Width of level i = modelChannels · channelMult[i].
    public var channelMult: [Int]
    /// ResBlocks per level on the way down; the way up has one more (it also takes the downsample's skip).
    public var resBlocksPerLevel: Int
    /// SpatialTransformer depth after each ResBlock of level i (0: no attention at that level).
    public var transformerDepth: [Int]
    public var middleTransformerDepth: Int
    /// Width of the cross-attention context (the text encoders' concatenated hidden states).
    public var contextDim: Int
    /// Width of the `y` vector label_emb embeds (pooled text embedding ⊕ six size/crop embeddings).
    public var admInChannels: Int
    /// Attention head size; heads = channels / headDim (sgm's `num_head_channels`).
    public var headDim: Int
    /// Groups of every GroupNorm (sgm's GroupNorm32 / `normalization`: 32). Not visible in a checkpoint.
    public var normGroups: Int

    public init(inChannels: Int = 4, outChannels: Int = 4, modelChannels: Int, channelMult: [Int],
                resBlocksPerLevel: Int, transformerDepth: [Int], middleTransformerDepth: Int, contextDim: Int,
                admInChannels: Int, headDim: Int, normGroups: Int = 32) {
        self.inChannels = inChannels
        self.outChannels = outChannels
        self.modelChannels = modelChannels
        self.channelMult = channelMult
        self.resBlocksPerLevel = resBlocksPerLevel
        self.transformerDepth = transformerDepth
        self.middleTransformerDepth = middleTransformerDepth
        self.contextDim = contextDim
        self.admInChannels = admInChannels
        self.headDim = headDim
        self.normGroups = normGroups
    }

    /// Width of the timestep/label embedding every ResBlock receives (sgm: time_embed_dim = 4·model_channels).
    public var timeEmbedDim: Int { 4 * modelChannels }

    /// SDXL base 1.0 (sgm configs/inference/sd_xl_base.yaml): 2816 = 1280 pooled + 6·256 size/crop embeddings.
    public static let sdxl = UNetConfig(
        modelChannels: 320, channelMult: [1, 2, 4], resBlocksPerLevel: 2, transformerDepth: [0, 2, 10],
        middleTransformerDepth: 10, contextDim: 2048, admInChannels: 2816, headDim: 64)

    /// SDXL's topology at toy widths (8/16/32, 4 norm groups, 2 heads of 8 at level 1 and 4 at level 2), for
    /// tests and fast end-to-end runs. adm 64 = 16 pooled + 6·8 size/crop embeddings; context 24.
    /// Tests/Fixtures/sdxl/make_unet.py builds the matching diffusers model.
    public static let tiny = UNetConfig(
        modelChannels: 8, channelMult: [1, 2, 4], resBlocksPerLevel: 2, transformerDepth: [0, 1, 1],
        middleTransformerDepth: 1, contextDim: 24, admInChannels: 64, headDim: 8, normGroups: 4)

    public var description: String {
        "UNet(in \(inChannels), out \(outChannels), channels \(modelChannels)×\(channelMult), \(resBlocksPerLevel) res/level, "
            + "transformer depth \(transformerDepth) middle \(middleTransformerDepth), context \(contextDim), "
            + "adm \(admInChannels), head \(headDim), groups \(normGroups))"
    }

    /// The config a checkpoint's UNet tensors describe, from key → shape (keys under
    /// `model.diffusion_model.`, or already without that prefix), as ComfyUI's
    /// model_detection.detect_unet_config reads them: widths from the conv and ResBlock output shapes,
    /// levels from where `input_blocks.N.0.op` (a downsample) sits, depths by counting
    /// `transformer_blocks.K`. Head size and group count leave no trace in the shapes: they are given.
    public static func infer(shapes: [String: [Int]], headDim: Int = 64, normGroups: Int = 32) throws -> UNetConfig {
        let prefix = "model.diffusion_model."
        var unet: [String: [Int]] = [:]
        for (k, v) in shapes where k.hasPrefix(prefix) { unet[String(k.dropFirst(prefix.count))] = v }
        if unet.isEmpty { unet = shapes }

        func shape(_ key: String, rank: Int) throws -> [Int] {
            guard let s = unet[key] else { throw UNetConfigError("no \(prefix)\(key): not an SGM/LDM UNet") }
            guard s.count == rank else { throw UNetConfigError("\(prefix)\(key) has shape \(s), expected rank \(rank)") }
            return s
        }
        // Blocks by index, and how many transformer blocks each SpatialTransformer holds.
        var inputBlocks = Set<Int>()
        var depths: [String: Int] = [:]   // "input_blocks.4.1" → number of transformer_blocks
        for key in unet.keys {
            let parts = key.split(separator: ".")
            if parts.count > 1, parts[0] == "input_blocks", let i = Int(parts[1]) { inputBlocks.insert(i) }
            if let t = parts.firstIndex(of: "transformer_blocks"), t + 1 < parts.count, let k = Int(parts[t + 1]) {
                let owner = parts[..<t].joined(separator: ".")
                depths[owner] = max(depths[owner] ?? 0, k + 1)
            }
        }

        let convIn = try shape("input_blocks.0.0.weight", rank: 4)     // [C, in, 3, 3]
        let convOut = try shape("out.2.weight", rank: 4)               // [out, C, 3, 3]
        let label = try shape("label_emb.0.0.weight", rank: 2)         // [4C, adm]
        let modelChannels = convIn[0]
        guard let context = unet.first(where: { $0.key.hasSuffix(".attn2.to_k.weight") })?.value, context.count == 2 else {
            throw UNetConfigError("no cross-attention (attn2.to_k) weights: not an SDXL-style UNet")
        }

        // Walk input_blocks 1… : ResBlocks of a level, then a downsample closes it (none after the last).
        var mult: [Int] = [], resCounts: [Int] = [], levelDepths: [Int] = []
        var res = 0, width = 0, depth: Int?
        func closeLevel() throws {
            guard res > 0 else { throw UNetConfigError("a level of input_blocks without ResBlocks") }
            guard width % modelChannels == 0 else {
                throw UNetConfigError("level width \(width) is not a multiple of model channels \(modelChannels)")
            }
            mult.append(width / modelChannels); resCounts.append(res); levelDepths.append(depth ?? 0)
            res = 0; depth = nil
        }
        var i = 1
        while inputBlocks.contains(i) {
            if unet["input_blocks.\(i).0.op.weight"] != nil {
                try closeLevel()
            } else {
                width = try shape("input_blocks.\(i).0.out_layers.3.weight", rank: 4)[0]
                let d = depths["input_blocks.\(i).1"] ?? 0
                if let depth, depth != d {
                    throw UNetConfigError("input_blocks.\(i) has transformer depth \(d), its level \(depth): unsupported")
                }
                depth = d
                res += 1
            }
            i += 1
        }
        try closeLevel()
        guard Set(resCounts).count == 1 else { throw UNetConfigError("levels have different ResBlock counts \(resCounts)") }
        // Head size and norm groups are not in the shapes: a wrong guess must be an error, not a crash in the build.
        for (level, m) in mult.enumerated() where levelDepths[level] > 0 && (m * modelChannels) % headDim != 0 {
            throw UNetConfigError("attention width \(m * modelChannels) does not split into heads of \(headDim): the file has no "
                + "lora_dist head-size metadata; give the head size (--head-dim)")
        }
        for m in [1] + mult where (m * modelChannels) % normGroups != 0 {
            throw UNetConfigError("width \(m * modelChannels) does not split into \(normGroups) norm groups: give the group count")
        }

        return UNetConfig(
            inChannels: convIn[1], outChannels: convOut[0], modelChannels: modelChannels, channelMult: mult,
            resBlocksPerLevel: resCounts[0], transformerDepth: levelDepths,
            middleTransformerDepth: depths["middle_block.1"] ?? 0, contextDim: context[1], admInChannels: label[1],
            headDim: headDim, normGroups: normGroups)
    }
}

/// A checkpoint whose UNet shapes do not describe a UNet `UNetConfig` can express.
public struct UNetConfigError: Error, CustomStringConvertible {
    public let description: String
    init(_ message: String) { description = "UNet config: \(message)" }
}
