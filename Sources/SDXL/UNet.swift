import Tensor

/// The SDXL denoiser: sgm's `UNetModel` (sgm/modules/diffusionmodules/openaimodel.py) in the single-file
/// key space (`model.diffusion_model.…`), numerically diffusers' `UNet2DConditionModel` with
/// addition_embed_type "text_time" and linear transformer projections.
///
/// Layout (built exactly as `UNetModel.__init__` builds it, so block indices are the checkpoint's):
///   input_blocks.0.0            conv_in 3×3, in → C
///   input_blocks.1…             per level: `resBlocksPerLevel` × [ResBlock, SpatialTransformer if depth > 0],
///                               then [Downsample `op`] except after the last level
///   middle_block.0/.1/.2        ResBlock, SpatialTransformer, ResBlock
///   output_blocks.0…            per level, deepest first: (resBlocksPerLevel + 1) × [ResBlock on
///                               concat(h, skip), SpatialTransformer?], the last with [Upsample `conv`]
///                               except at level 0
///   out.0 / out.2               GroupNorm + SiLU, conv 3×3 C → out
public final class UNet {
    public let config: UNetConfig
    public let timeEmbed1: LinearLayer, timeEmbed2: LinearLayer     // time_embed.0 / .2
    public let labelEmbed1: LinearLayer, labelEmbed2: LinearLayer   // label_emb.0.0 / .0.2
    public let convIn: Conv2dLayer                                  // input_blocks.0.0
    /// input_blocks.1… (index i here is input_blocks.(i + 1)).
    public let inputBlocks: [[UNetLayer]]
    public let middleBlock: [UNetLayer]
    public let outputBlocks: [[UNetLayer]]
    public let outNorm: GroupNormLayer                              // out.0
    public let outConv: Conv2dLayer                                 // out.2
    /// Every Linear and Conv2d, in module order, as recorded while binding (LoRA networks are generated from it).
    public let adaptableLayers: [AdaptableLayer]

    /// Binds every weight under `w` (normally `binder.scope("model.diffusion_model")`).
    public init(_ w: WeightScope, config: UNetConfig) {
        let c = config
        precondition(c.transformerDepth.count == c.channelMult.count,
                     "UNetConfig: \(c.channelMult.count) levels but \(c.transformerDepth.count) transformer depths")
        self.config = c
        let mc = c.modelChannels, emb = c.timeEmbedDim, groups = c.normGroups
        timeEmbed1 = LinearLayer(w["time_embed"][0], mc, emb)
        timeEmbed2 = LinearLayer(w["time_embed"][2], emb, emb)
        labelEmbed1 = LinearLayer(w["label_emb"][0][0], c.admInChannels, emb)
        labelEmbed2 = LinearLayer(w["label_emb"][0][2], emb, emb)
        convIn = Conv2dLayer(w["input_blocks"][0][0], c.inChannels, mc, kernel: 3)

        func transformer(_ w: WeightScope, _ channels: Int, _ depth: Int) -> UNetLayer {
            .transformer(SpatialTransformer(w, channels: channels, depth: depth, contextDim: c.contextDim,
                                            headDim: c.headDim, groups: groups))
        }
        func res(_ w: WeightScope, _ cin: Int, _ cout: Int) -> UNetLayer {
            .res(ResBlock(w, inChannels: cin, outChannels: cout, embDim: emb, groups: groups))
        }

        var ch = mc
        var skipChannels = [mc]   // sgm's input_block_chans: the width of every input block's output
        var inputs: [[UNetLayer]] = []
        for (level, mult) in c.channelMult.enumerated() {
            for _ in 0..<c.resBlocksPerLevel {
                let scope = w["input_blocks"][inputs.count + 1]
                var layers = [res(scope[0], ch, mult * mc)]
                ch = mult * mc
                if c.transformerDepth[level] > 0 { layers.append(transformer(scope[1], ch, c.transformerDepth[level])) }
                inputs.append(layers)
                skipChannels.append(ch)
            }
            if level != c.channelMult.count - 1 {
                let scope = w["input_blocks"][inputs.count + 1]
                inputs.append([.downsample(Conv2dLayer(scope[0].container(.downsample)["op"], ch, ch, kernel: 3, stride: 2, padding: 1))])
                skipChannels.append(ch)
            }
        }
        inputBlocks = inputs

        var middle = [res(w["middle_block"][0], ch, ch)]
        if c.middleTransformerDepth > 0 { middle.append(transformer(w["middle_block"][1], ch, c.middleTransformerDepth)) }
        middle.append(res(w["middle_block"][middle.count], ch, ch))
        middleBlock = middle

        var outputs: [[UNetLayer]] = []
        for (level, mult) in c.channelMult.enumerated().reversed() {
            for i in 0...c.resBlocksPerLevel {
                let scope = w["output_blocks"][outputs.count]
                let skip = skipChannels.removeLast()
                var layers = [res(scope[0], ch + skip, mult * mc)]
                ch = mult * mc
                if c.transformerDepth[level] > 0 { layers.append(transformer(scope[1], ch, c.transformerDepth[level])) }
                if level > 0 && i == c.resBlocksPerLevel {
                    layers.append(.upsample(Conv2dLayer(scope[layers.count].container(.upsample)["conv"], ch, ch, kernel: 3)))
                }
                outputs.append(layers)
            }
        }
        outputBlocks = outputs

        outNorm = GroupNormLayer(w["out"][0], channels: ch, groups: groups, eps: 1e-5)
        outConv = Conv2dLayer(w["out"][2], ch, c.outChannels, kernel: 3)
        adaptableLayers = w.layers
    }

    /// x [B, in, h, w] (h, w divisible by 2^(levels−1)), timesteps [B], context [B, T, contextDim],
    /// y [B, admIn] → [B, out, h, w]. `checkpointing`: every ResBlock and SpatialTransformer runs under
    /// `tape.checkpoint` (activations recomputed in backward).
    public func callAsFunction(_ t: Tape, x: Var, timesteps: Var, context: Var, y: Var,
                               checkpointing: Bool = false) -> Var {
        let c = config
        let batch = x.shape[0]
        precondition(x.shape.count == 4 && x.shape[1] == c.inChannels, "UNet: x \(x.shape) is not [B, \(c.inChannels), h, w]")
        precondition(timesteps.shape == [batch], "UNet: timesteps \(timesteps.shape) is not [\(batch)]")
        precondition(context.shape.count == 3 && context.shape[0] == batch && context.shape[2] == c.contextDim,
                     "UNet: context \(context.shape) is not [\(batch), T, \(c.contextDim)]")
        precondition(y.shape == [batch, c.admInChannels], "UNet: y \(y.shape) is not [\(batch), \(c.admInChannels)]")

        // emb = time_embed(timestep_embedding(t, C)) + label_emb(y)   [B, 4C]
        let tEmb = t.timestepEmbedding(timesteps, dim: c.modelChannels)
        let timeEmb = timeEmbed2(t, t.silu(timeEmbed1(t, tEmb)))
        let labelEmb = labelEmbed2(t, t.silu(labelEmbed1(t, y)))
        // Every ResBlock's emb_layers begins with SiLU(emb): computed once here.
        let activatedEmb = t.silu(t.add(timeEmb, labelEmb))

        func run(_ layers: [UNetLayer], _ h: Var) -> Var {
            layers.reduce(h) { h, layer in
                layer(t, h, activatedEmb: activatedEmb, context: context, checkpointing: checkpointing)
            }
        }
        var h = convIn(t, x)
        var skips = [h]
        for block in inputBlocks {
            h = run(block, h)
            skips.append(h)
        }
        h = run(middleBlock, h)
        for block in outputBlocks {
            h = run(block, t.concat([h, skips.removeLast()], axis: 1))   // torch.cat([h, hs.pop()], dim=1)
        }
        return outConv(t, t.silu(outNorm(t, h)))
    }
}
