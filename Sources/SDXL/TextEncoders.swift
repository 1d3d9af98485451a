import Tensor

/// Shape of a CLIP text tower: SDXL's CLIP ViT-L/14 (transformers layout) or OpenCLIP ViT-bigG/14 (OpenCLIP layout).
/// Heads cannot be read from a checkpoint's shapes; every released CLIP text tower uses 64-wide heads.
public struct CLIPTextConfig: Equatable {
    public var vocab: Int
    public var width: Int
    public var layers: Int
    public var heads: Int
    /// Token positions (the learned position table's rows): 77.
    public var positions: Int
    /// Hidden width of each block's MLP (4 × width in every CLIP).
    public var mlpWidth: Int
    /// Output width of `text_projection` (bigG: 1280); nil for a tower without one (ViT-L in SDXL).
    public var projection: Int?
    /// <|endoftext|>: the pooled vector is read at its first occurrence in each row (transformers'
    /// CLIPTextTransformer for configs whose eos_token_id != 2; kohya's pool_workaround).
    public var eosTokenID: Int

    /// nn.LayerNorm's eps in both towers (transformers' layer_norm_eps, OpenCLIP's LayerNorm default).
    public static let layerNormEps: Float = 1e-5

    public init(vocab: Int, width: Int, layers: Int, heads: Int, positions: Int = 77, mlpWidth: Int? = nil,
                projection: Int? = nil, eosTokenID: Int? = nil) {
        precondition(heads > 0 && width % heads == 0, "CLIP text width \(width) does not split into \(heads) heads")
        self.vocab = vocab
        self.width = width
        self.layers = layers
        self.heads = heads
        self.positions = positions
        self.mlpWidth = mlpWidth ?? 4 * width
        self.projection = projection
        // CLIP's vocabulary ends with <|startoftext|>, <|endoftext|> (49406, 49407 of 49408).
        self.eosTokenID = eosTokenID ?? vocab - 1
    }

    /// SDXL's first text encoder: openai/clip-vit-large-patch14's text tower.
    public static let clipL = CLIPTextConfig(vocab: 49408, width: 768, layers: 12, heads: 12, projection: nil)
    /// SDXL's second text encoder: laion/CLIP-ViT-bigG-14's text tower.
    public static let bigG = CLIPTextConfig(vocab: 49408, width: 1280, layers: 32, heads: 20, projection: 1280)
    /// The towers of Tests/Fixtures/sdxl/make_text.py (vocabulary 512: BOS 510, EOS 511).
    public static let tinyL = CLIPTextConfig(vocab: 512, width: 32, layers: 3, heads: 2, projection: nil)
    public static let tinyG = CLIPTextConfig(vocab: 512, width: 48, layers: 3, heads: 3, projection: 48)

    /// Heads for a width read from a checkpoint: 64-wide heads (every released CLIP text tower), or 16-wide
    /// for widths below 64 (only the tiny test towers are that narrow).
    static func inferredHeads(width: Int) -> Int { width >= 64 && width % 64 == 0 ? width / 64 : max(1, width / 16) }

    /// The ViT-L tower's shape from a checkpoint's `conditioner.embedders.0.transformer.text_model.*` shapes.
    public static func inferL(shapes: [String: [Int]]) throws -> CLIPTextConfig {
        let p = CLIPTextEncoderL.keyPrefix
        let token = try matrix(shapes, "\(p).embeddings.token_embedding.weight")
        let position = try matrix(shapes, "\(p).embeddings.position_embedding.weight")
        let layers = blockCount(shapes, under: "\(p).encoder.layers.")
        guard layers > 0 else { throw TextEncoderConfigError("no \(p).encoder.layers.* in the checkpoint") }
        let fc1 = try matrix(shapes, "\(p).encoder.layers.0.mlp.fc1.weight")
        guard position[1] == token[1], fc1[1] == token[1] else {
            throw TextEncoderConfigError("ViT-L widths disagree: token \(token), position \(position), fc1 \(fc1)")
        }
        return CLIPTextConfig(vocab: token[0], width: token[1], layers: layers, heads: inferredHeads(width: token[1]),
                              positions: position[0], mlpWidth: fc1[0], projection: nil)
    }

    /// The bigG tower's shape from a checkpoint's `conditioner.embedders.1.model.*` shapes.
    public static func inferG(shapes: [String: [Int]]) throws -> CLIPTextConfig {
        let p = OpenCLIPTextEncoderG.keyPrefix
        let token = try matrix(shapes, "\(p).token_embedding.weight")
        let position = try matrix(shapes, "\(p).positional_embedding")
        let layers = blockCount(shapes, under: "\(p).transformer.resblocks.")
        guard layers > 0 else { throw TextEncoderConfigError("no \(p).transformer.resblocks.* in the checkpoint") }
        let cFC = try matrix(shapes, "\(p).transformer.resblocks.0.mlp.c_fc.weight")
        let projection = try matrix(shapes, "\(p).text_projection")   // [width, projection]
        guard position[1] == token[1], cFC[1] == token[1], projection[0] == token[1] else {
            throw TextEncoderConfigError(
                "bigG widths disagree: token \(token), position \(position), c_fc \(cFC), text_projection \(projection)")
        }
        return CLIPTextConfig(vocab: token[0], width: token[1], layers: layers, heads: inferredHeads(width: token[1]),
                              positions: position[0], mlpWidth: cFC[0], projection: projection[1])
    }

    private static func matrix(_ shapes: [String: [Int]], _ key: String) throws -> [Int] {
        guard let s = shapes[key] else { throw TextEncoderConfigError("\(key) is missing") }
        guard s.count == 2 else { throw TextEncoderConfigError("\(key) has shape \(s), expected a matrix") }
        return s
    }

    /// 1 + the largest i of keys `<prefix><i>.…`.
    private static func blockCount(_ shapes: [String: [Int]], under prefix: String) -> Int {
        shapes.keys.reduce(0) { n, key in
            guard key.hasPrefix(prefix), let i = Int(key.dropFirst(prefix.count).prefix { $0 != "." }) else { return n }
            return max(n, i + 1)
        }
    }
}

public struct TextEncoderConfigError: Error, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = "cannot infer the text encoder's shape: \(description)" }
}

/// SDXL's first text encoder, CLIP ViT-L/14's text tower in transformers' layout (CLIPTextTransformer), bound at
/// `conditioner.embedders.0.transformer.text_model`. Returns the penultimate hidden state — hidden_states[-2], the
/// output of layer 11 of 12, which SDXL (sgm's FrozenCLIPEmbedder layer="hidden", layer_idx=11; diffusers'
/// encode_prompt; kohya's get_hidden_states_sdxl) feeds to the UNet without final_layer_norm. The last layer never
/// runs.
///
/// `final_layer_norm` is bound anyway, unused: it is part of every complete SDXL checkpoint, the bound key list is
/// what make-model writes, and a file without it would not load strictly in transformers/kohya/ComfyUI. The last
/// layer's weights are bound for the same reason. Only `embeddings.position_ids` (an int buffer older transformers
/// saved) is ignorable.
public final class CLIPTextEncoderL {
    public static let keyPrefix = "conditioner.embedders.0.transformer.text_model"

    /// Keys under `keyPrefix` that a checkpoint may carry and this module never binds.
    public static func isIgnorable(_ key: String) -> Bool { key == "\(keyPrefix).embeddings.position_ids" }

    public let config: CLIPTextConfig
    public let tokenEmbedding: Var              // [vocab, width]
    /// [positions, width]; a `var` so a test (or textual-inversion-like training) can make it trainable.
    public var positionEmbedding: Var
    let layers: [CLIPEncoderLayer]
    /// Bound for strict loading, not applied (see the type's comment).
    public let finalLayerNorm: LayerNormLayer
    /// Every Linear, in module order, as recorded while binding.
    public let adaptableLayers: [AdaptableLayer]

    /// `w` is the scope of the `text_model` module (`binder.scope(CLIPTextEncoderL.keyPrefix)`).
    public init(_ w: WeightScope, config: CLIPTextConfig) {
        self.config = config
        let embeddings = w["embeddings"]
        tokenEmbedding = Var(embeddings["token_embedding"].tensor("weight", [config.vocab, config.width]))
        positionEmbedding = Var(embeddings["position_embedding"].tensor("weight", [config.positions, config.width]))
        layers = (0..<config.layers).map { CLIPEncoderLayer(w["encoder"]["layers"][$0], config: config) }
        finalLayerNorm = LayerNormLayer(w["final_layer_norm"], config.width, eps: CLIPTextConfig.layerNormEps)
        adaptableLayers = w.layers
    }

    /// ids: B rows of N ≤ positions token ids → the penultimate hidden state [B, N, width]. `checkpointing`: each
    /// layer runs under `Tape.checkpoint` (its activations recomputed in backward), for a trained encoder.
    public func callAsFunction(_ t: Tape, ids: [[Int]], checkpointing: Bool = false) -> Var {
        var x = clipTextEmbeddings(t, ids: ids, tokens: tokenEmbedding, positions: positionEmbedding)
        for layer in layers.dropLast() {
            x = checkpointing ? t.checkpoint([x]) { t, v in layer(t, v[0]) } : layer(t, x)
        }
        return x
    }
}

/// transformers' CLIPEncoderLayer (pre-norm): x + out_proj(attn(layer_norm1(x))), then x + fc2(act(fc1(layer_norm2(x)))).
/// The activation is quick-GELU (x·σ(1.702x), hidden_act "quick_gelu" of openai/clip-vit-large-patch14).
struct CLIPEncoderLayer {
    let layerNorm1: LayerNormLayer, layerNorm2: LayerNormLayer
    let q: LinearLayer, k: LinearLayer, v: LinearLayer, out: LinearLayer
    let fc1: LinearLayer, fc2: LinearLayer
    let heads: Int

    init(_ w: WeightScope, config c: CLIPTextConfig) {
        layerNorm1 = LayerNormLayer(w["layer_norm1"], c.width, eps: CLIPTextConfig.layerNormEps)
        layerNorm2 = LayerNormLayer(w["layer_norm2"], c.width, eps: CLIPTextConfig.layerNormEps)
        let attn = w["self_attn"].container(.attention)
        q = LinearLayer(attn["q_proj"], c.width, c.width)
        k = LinearLayer(attn["k_proj"], c.width, c.width)
        v = LinearLayer(attn["v_proj"], c.width, c.width)
        out = LinearLayer(attn["out_proj"], c.width, c.width)
        let mlp = w["mlp"].container(.mlp)
        fc1 = LinearLayer(mlp["fc1"], c.width, c.mlpWidth)
        fc2 = LinearLayer(mlp["fc2"], c.mlpWidth, c.width)
        heads = c.heads
    }

    func callAsFunction(_ t: Tape, _ x: Var) -> Var {      // x [B, N, C]
        let h = layerNorm1(t, x)
        // CLIPAttention: scale head_dim^-0.5 (the engine's default), causal mask (create_causal_mask).
        let a = t.attention(q(t, h), k(t, h), v(t, h), heads: heads, causal: true)
        let x = t.add(x, out(t, a))
        return t.add(x, fc2(t, t.quickGELU(fc1(t, layerNorm2(t, x)))))
    }
}

/// SDXL's second text encoder, OpenCLIP ViT-bigG/14's text tower in OpenCLIP's layout (sgm's FrozenOpenCLIPEmbedder2),
/// bound at `conditioner.embedders.1.model`. Returns
///   penultimate: the output of all blocks but the last, without ln_final (sgm layer="penultimate"; transformers'
///                hidden_states[-2]) [B, N, width];
///   pooled:      ln_final(output of the last block) at each row's end-of-text position, projected
///                [B, projection] (sgm: `x[arange, text.argmax(-1)] @ text_projection`; transformers'
///                CLIPTextModelWithProjection.text_embeds; kohya's pool_workaround).
/// The end-of-text position is the first `eosTokenID` in the row (transformers and kohya); sgm's argmax of the
/// ids finds the same position because <|endoftext|> is the largest id and bigG pads with 0. A row without EOS
/// pools position 0, as both argmax formulations do.
public final class OpenCLIPTextEncoderG {
    public static let keyPrefix = "conditioner.embedders.1.model"

    /// Keys under `keyPrefix` that this module never binds: CLIP's contrastive temperature, unused by SDXL.
    public static func isIgnorable(_ key: String) -> Bool { key == "\(keyPrefix).logit_scale" }

    /// How `text_projection` [width, projection] is applied to the pooled row x.
    public enum PooledProjection {
        /// x @ text_projection: OpenCLIP, sgm, diffusers (which stores its transpose as nn.Linear's weight),
        /// ComfyUI — what SDXL was trained with.
        case openCLIP
        /// x @ text_projectionᵀ: kohya sd-scripts when it loads a single-file checkpoint
        /// (sdxl_model_util.convert_sdxl_text_encoder_2_checkpoint copies `text_projection` into nn.Linear's weight
        /// without transposing it). Exists only for a square projection (bigG: 1280 × 1280). kohya loading a
        /// diffusers folder computes `.openCLIP`.
        case kohyaSingleFile
    }

    public let config: CLIPTextConfig
    public let tokenEmbedding: Var              // [vocab, width]
    public var positionalEmbedding: Var         // [positions, width]
    let blocks: [OpenCLIPResidualBlock]
    public let lnFinal: LayerNormLayer
    public let textProjection: Var              // [width, projection]
    public var pooledProjection: PooledProjection
    /// Every Linear, in module order, as recorded while binding (in_proj as one fused layer).
    public let adaptableLayers: [AdaptableLayer]

    /// `w` is the scope of the `model` module (`binder.scope(OpenCLIPTextEncoderG.keyPrefix)`).
    public init(_ w: WeightScope, config: CLIPTextConfig, pooledProjection: PooledProjection = .openCLIP) {
        precondition(config.projection != nil, "the bigG tower needs a projection width")
        precondition(pooledProjection == .openCLIP || config.projection == config.width,
                     "kohya's untransposed projection needs a square text_projection, got \(config.width)×\(config.projection!)")
        self.config = config
        self.pooledProjection = pooledProjection
        tokenEmbedding = Var(w["token_embedding"].tensor("weight", [config.vocab, config.width]))
        positionalEmbedding = Var(w.tensor("positional_embedding", [config.positions, config.width]))
        blocks = (0..<config.layers).map { OpenCLIPResidualBlock(w["transformer"]["resblocks"][$0], config: config) }
        lnFinal = LayerNormLayer(w["ln_final"], config.width, eps: CLIPTextConfig.layerNormEps)
        textProjection = Var(w.tensor("text_projection", [config.width, config.projection!]))
        adaptableLayers = w.layers
    }

    /// ids: B rows of N ≤ positions token ids.
    /// `checkpointing`: each block runs under `Tape.checkpoint`, for a trained encoder.
    public func callAsFunction(_ t: Tape, ids: [[Int]], checkpointing: Bool = false) -> (penultimate: Var, pooled: Var) {
        func run(_ block: OpenCLIPResidualBlock, _ x: Var) -> Var {
            checkpointing ? t.checkpoint([x]) { t, v in block(t, v[0]) } : block(t, x)
        }
        var x = clipTextEmbeddings(t, ids: ids, tokens: tokenEmbedding, positions: positionalEmbedding)
        for block in blocks.dropLast() { x = run(block, x) }
        let penultimate = x
        let last = blocks.last.map { run($0, x) } ?? x        // [B, N, C]
        // ln_final is per row, so pick the end-of-text rows first and normalise only those.
        let n = last.shape[1], c = config.width
        let rows = t.reshape(last, [ids.count * n, c])
        let picked = ids.enumerated().map { b, row in
            t.slice(rows, axis: 0, start: b * n + (row.firstIndex(of: config.eosTokenID) ?? 0), length: 1)
        }
        let eot = lnFinal(t, picked.count == 1 ? picked[0] : t.concat(picked, axis: 0))   // [B, C]
        let pooled = t.matmul(eot, textProjection, transB: pooledProjection == .kohyaSingleFile)
        return (penultimate, pooled)
    }
}

/// OpenCLIP's ResidualAttentionBlock: x + attn(ln_1(x)), then x + c_proj(GELU(c_fc(ln_2(x)))). attn is
/// nn.MultiheadAttention with one fused in_proj [3C, C] (q, k, v stacked in that order) and a causal mask.
/// GELU is the exact (erf) one.
struct OpenCLIPResidualBlock {
    let ln1: LayerNormLayer, ln2: LayerNormLayer
    /// The fused projection stays one [3C, C] weight in the file's dtype: its output is split, not the weight.
    let inProj: LinearLayer, outProj: LinearLayer
    let cFC: LinearLayer, cProj: LinearLayer
    let heads: Int, width: Int

    init(_ w: WeightScope, config c: CLIPTextConfig) {
        ln1 = LayerNormLayer(w["ln_1"], c.width, eps: CLIPTextConfig.layerNormEps)
        ln2 = LayerNormLayer(w["ln_2"], c.width, eps: CLIPTextConfig.layerNormEps)
        let attn = w["attn"].container(.attention)
        inProj = LinearLayer(attn, fused: "in_proj", c.width, 3 * c.width)
        outProj = LinearLayer(attn["out_proj"], c.width, c.width)
        let mlp = w["mlp"].container(.mlp)
        cFC = LinearLayer(mlp["c_fc"], c.width, c.mlpWidth)
        cProj = LinearLayer(mlp["c_proj"], c.mlpWidth, c.width)
        heads = c.heads
        width = c.width
    }

    func callAsFunction(_ t: Tape, _ x: Var) -> Var {      // x [B, N, C]
        let qkv = t.split(inProj(t, ln1(t, x)), axis: -1, sizes: [width, width, width])
        let a = t.attention(qkv[0], qkv[1], qkv[2], heads: heads, causal: true)
        let x = t.add(x, outProj(t, a))
        return t.add(x, cProj(t, t.gelu(cFC(t, ln2(t, x)))))
    }
}

/// token_embedding(ids) + position_embedding[0..<N] → [B, N, C] (transformers' CLIPTextEmbeddings; OpenCLIP's
/// `token_embedding(text) + positional_embedding`).
func clipTextEmbeddings(_ t: Tape, ids: [[Int]], tokens: Var, positions: Var) -> Var {
    let b = ids.count, n = ids.first?.count ?? 0, c = tokens.shape[1]
    precondition(b > 0 && n > 0, "text encoder: no token ids")
    precondition(ids.allSatisfy { $0.count == n }, "text encoder: every row needs the same number of ids")
    precondition(n <= positions.shape[0], "text encoder: \(n) ids exceed the \(positions.shape[0]) positions")
    let x = t.reshape(t.embedding(tokens, ids: ids.flatMap { $0 }), [b, n, c])
    let p = n == positions.shape[0] ? positions : t.slice(positions, axis: 0, start: 0, length: n)
    return t.add(x, p)
}
