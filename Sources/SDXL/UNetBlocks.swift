import Tensor

/// sgm's `ResBlock` (diffusers `ResnetBlock2D`, eps 1e-5, no up/down, scale-shift off):
/// h = conv(SiLU(GN(x))) + emb_layers(SiLU(emb))[:, :, None, None]; h = conv(SiLU(GN(h)));
/// out = skip(x) + h, skip a 1×1 conv when the width changes.
public final class ResBlock {
    public let inNorm: GroupNormLayer       // in_layers.0
    public let inConv: Conv2dLayer          // in_layers.2 (3×3)
    public let embProjection: LinearLayer   // emb_layers.1
    public let outNorm: GroupNormLayer      // out_layers.0
    public let outConv: Conv2dLayer         // out_layers.3 (3×3; out_layers.2 is Dropout)
    public let skip: Conv2dLayer?           // skip_connection (1×1)

    public init(_ w: WeightScope, inChannels: Int, outChannels: Int, embDim: Int, groups: Int) {
        let w = w.container(.resBlock)
        inNorm = GroupNormLayer(w["in_layers"][0], channels: inChannels, groups: groups, eps: 1e-5)
        inConv = Conv2dLayer(w["in_layers"][2], inChannels, outChannels, kernel: 3)
        embProjection = LinearLayer(w["emb_layers"][1], embDim, outChannels)
        outNorm = GroupNormLayer(w["out_layers"][0], channels: outChannels, groups: groups, eps: 1e-5)
        outConv = Conv2dLayer(w["out_layers"][3], outChannels, outChannels, kernel: 3)
        skip = inChannels == outChannels ? nil : Conv2dLayer(w["skip_connection"], inChannels, outChannels, kernel: 1)
    }

    /// x [B, Cin, H, W], activatedEmb = SiLU(emb) [B, E] (shared by every block: emb_layers.0 is the
    /// SiLU, computed once in `UNet`) → [B, Cout, H, W].
    public func callAsFunction(_ t: Tape, _ x: Var, activatedEmb: Var) -> Var {
        var h = inConv(t, t.silu(inNorm(t, x)))
        let e = embProjection(t, activatedEmb)                              // [B, Cout]
        h = t.add(h, t.reshape(e, [e.shape[0], e.shape[1], 1, 1]))
        h = outConv(t, t.silu(outNorm(t, h)))
        return t.add(skip.map { $0(t, x) } ?? x, h)
    }
}

/// sgm's `CrossAttention` (diffusers `Attention`): q from x, k/v from the context (x itself for
/// self-attention); projections without bias, `to_out.0` with bias.
public final class CrossAttention {
    public let toQ: LinearLayer, toK: LinearLayer, toV: LinearLayer, toOut: LinearLayer
    public let heads: Int

    public init(_ w: WeightScope, queryDim: Int, contextDim: Int, heads: Int, headDim: Int) {
        let inner = heads * headDim
        toQ = LinearLayer(w["to_q"], queryDim, inner, bias: false)
        toK = LinearLayer(w["to_k"], contextDim, inner, bias: false)
        toV = LinearLayer(w["to_v"], contextDim, inner, bias: false)
        toOut = LinearLayer(w["to_out"][0], inner, queryDim)
        self.heads = heads
    }

    /// x [B, N, C], context [B, T, Cctx] (nil: self-attention) → [B, N, C]. Scale 1/√headDim.
    public func callAsFunction(_ t: Tape, _ x: Var, context: Var? = nil) -> Var {
        let source = context ?? x
        let out = t.attention(toQ(t, x), toK(t, source), toV(t, source), heads: heads)
        return toOut(t, out)
    }
}

/// sgm's `FeedForward(glu=True)` (diffusers `FeedForward(activation_fn="geglu")`): net.0.proj C → 8C,
/// GEGLU (first half · gelu(second half)) → 4C, net.2 4C → C.
public final class FeedForward {
    public let projection: LinearLayer   // net.0.proj
    public let output: LinearLayer       // net.2 (net.1 is Dropout)

    public init(_ w: WeightScope, channels: Int, mult: Int = 4) {
        projection = LinearLayer(w["net"][0]["proj"], channels, 2 * mult * channels)
        output = LinearLayer(w["net"][2], mult * channels, channels)
    }

    public func callAsFunction(_ t: Tape, _ x: Var) -> Var { output(t, t.geglu(projection(t, x))) }
}

/// sgm's `BasicTransformerBlock` (diffusers `BasicTransformerBlock`, pre-LayerNorm, eps 1e-5):
/// x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x)).
public final class BasicTransformerBlock {
    public let norm1: LayerNormLayer, attn1: CrossAttention
    public let norm2: LayerNormLayer, attn2: CrossAttention
    public let norm3: LayerNormLayer, ff: FeedForward

    public init(_ w: WeightScope, channels: Int, contextDim: Int, heads: Int, headDim: Int) {
        norm1 = LayerNormLayer(w["norm1"], channels, eps: 1e-5)
        attn1 = CrossAttention(w["attn1"], queryDim: channels, contextDim: channels, heads: heads, headDim: headDim)
        norm2 = LayerNormLayer(w["norm2"], channels, eps: 1e-5)
        attn2 = CrossAttention(w["attn2"], queryDim: channels, contextDim: contextDim, heads: heads, headDim: headDim)
        norm3 = LayerNormLayer(w["norm3"], channels, eps: 1e-5)
        ff = FeedForward(w["ff"], channels: channels)
    }

    /// x [B, N, C], context [B, T, Cctx] → [B, N, C].
    public func callAsFunction(_ t: Tape, _ x: Var, context: Var) -> Var {
        var h = t.add(attn1(t, norm1(t, x)), x)
        h = t.add(attn2(t, norm2(t, h), context: context), h)
        return t.add(ff(t, norm3(t, h)), h)
    }
}

/// sgm's `SpatialTransformer` with use_linear=True (diffusers `Transformer2DModel`,
/// use_linear_projection): GroupNorm (eps 1e-6) → [B, HW, C] → proj_in → transformer blocks →
/// proj_out → [B, C, H, W] + x. Inner width = heads · headDim = C.
public final class SpatialTransformer {
    public let norm: GroupNormLayer
    public let projIn: LinearLayer
    public let blocks: [BasicTransformerBlock]
    public let projOut: LinearLayer

    public init(_ w: WeightScope, channels: Int, depth: Int, contextDim: Int, headDim: Int, groups: Int) {
        let w = w.container(.transformer)
        precondition(channels % headDim == 0, "SpatialTransformer: \(channels) channels do not split into heads of \(headDim)")
        norm = GroupNormLayer(w["norm"], channels: channels, groups: groups, eps: 1e-6)
        projIn = LinearLayer(w["proj_in"], channels, channels)
        blocks = (0..<depth).map {
            BasicTransformerBlock(w["transformer_blocks"][$0], channels: channels, contextDim: contextDim,
                                  heads: channels / headDim, headDim: headDim)
        }
        projOut = LinearLayer(w["proj_out"], channels, channels)
    }

    /// x [B, C, H, W], context [B, T, Cctx] → [B, C, H, W].
    public func callAsFunction(_ t: Tape, _ x: Var, context: Var) -> Var {
        let b = x.shape[0], c = x.shape[1], hgt = x.shape[2], wid = x.shape[3]
        var h = t.reshape(t.permute(norm(t, x), [0, 2, 3, 1]), [b, hgt * wid, c])   // [B, HW, C]
        h = projIn(t, h)
        for block in blocks { h = block(t, h, context: context) }
        h = projOut(t, h)
        h = t.permute(t.reshape(h, [b, hgt, wid, c]), [0, 3, 1, 2])                 // [B, C, H, W]
        return t.add(h, x)
    }
}

/// One module of an sgm `TimestepEmbedSequential` (an input/middle/output block is a list of them).
public enum UNetLayer {
    case res(ResBlock)
    case transformer(SpatialTransformer)
    /// sgm `Downsample` (`op`): conv 3×3, stride 2, padding 1.
    case downsample(Conv2dLayer)
    /// sgm `Upsample` (`conv`): nearest 2× (F.interpolate), then conv 3×3.
    case upsample(Conv2dLayer)

    /// checkpointing: ResBlocks and SpatialTransformers run under `tape.checkpoint` (their activations
    /// are recomputed in backward), as sgm's `checkpoint(self._forward, …)` and kohya's
    /// gradient_checkpointing do; the cheap resampling convs are recorded normally.
    func callAsFunction(_ t: Tape, _ x: Var, activatedEmb: Var, context: Var, checkpointing: Bool) -> Var {
        switch self {
        case .res(let block):
            guard checkpointing else { return block(t, x, activatedEmb: activatedEmb) }
            return t.checkpoint([x, activatedEmb]) { t, v in block(t, v[0], activatedEmb: v[1]) }
        case .transformer(let block):
            guard checkpointing else { return block(t, x, context: context) }
            return t.checkpoint([x, context]) { t, v in block(t, v[0], context: v[1]) }
        case .downsample(let conv):
            return conv(t, x)
        case .upsample(let conv):
            return conv(t, t.upsampleNearest2x(x))
        }
    }
}
