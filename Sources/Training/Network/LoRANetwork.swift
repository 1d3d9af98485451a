import Foundation
import SDXL
import Tensor

/// What kind of LoRA network to build: kohya `networks.lora` with its `network_dim` / `network_alpha` /
/// `network_dropout` and the `conv_dim`, `conv_alpha`, `rank_dropout`, `module_dropout` network args.
public struct LoRASpec: Equatable, Sendable {
    public var linearRank: Int
    public var linearAlpha: Float
    /// LoCon: rank/alpha of the 3×3 convs of ResBlocks, Downsample and Upsample (nil: not trained).
    public var convRank: Int?
    public var convAlpha: Float?
    /// kohya network_dropout: dropout on the down projection's output (neurons).
    public var dropout: Float?
    /// kohya rank_dropout: drops whole ranks per sample, rescaling the rest.
    public var rankDropout: Float?
    /// kohya module_dropout: skips a whole module for a step.
    public var moduleDropout: Float?

    public init(linearRank: Int = 4, linearAlpha: Float = 1, convRank: Int? = nil, convAlpha: Float? = nil,
                dropout: Float? = nil, rankDropout: Float? = nil, moduleDropout: Float? = nil) {
        self.linearRank = linearRank
        self.linearAlpha = linearAlpha
        self.convRank = convRank
        self.convAlpha = convAlpha
        self.dropout = dropout
        self.rankDropout = rankDropout
        self.moduleDropout = moduleDropout
    }
}

/// One LoRA module: `out = org(x) + up(down(x)) · multiplier · alpha / rank` on the layer at `path`.
public struct LoRAModule: Equatable, Sendable {
    /// kohya's name: `lora_unet_` + the module path with `.` → `_`.
    public let name: String
    /// The adapted layer's weight key prefix (`model.diffusion_model.input_blocks.4.1.proj_in`).
    public let path: String
    public let kind: AdaptableLayer.Kind
    public let rank: Int
    public let alpha: Float
    /// lora_down [r, in] (linear) or [r, in, k, k] (conv, the layer's kernel, stride and padding).
    public let downShape: [Int]
    /// lora_up [out, r] (linear) or [out, r, 1, 1] (conv).
    public let upShape: [Int]
    /// Offsets of lora_down and lora_up in the network's flat parameter buffer (down first, then up).
    public let downOffset: Int
    public let upOffset: Int

    public var scale: Float { alpha / Float(rank) }
    public var downName: String { name + ".lora_down.weight" }
    public var upName: String { name + ".lora_up.weight" }
    public var alphaName: String { name + ".alpha" }
    public var fanIn: Int { downShape.dropFirst().reduce(1, *) }
}

public struct LoRANetworkError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// kohya's `LoRANetwork` for the SDXL UNet, generated from the model's module tree (`UNet.adaptableLayers`).
///
/// Targets (kohya networks/lora.py `create_modules`): every Linear inside a SpatialTransformer
/// (Transformer2DModel); with a conv rank, every Conv2d and Linear inside ResBlocks, Downsample and Upsample —
/// 3×3 convs at the conv rank, 1×1 convs and Linears (skip_connection, emb_layers.1) at the linear rank.
///
/// All trainable values live in one flat fp32 buffer (`parameters`: each module's down then up, in module
/// order), which is what the optimizer updates and what is all-reduced. A forward pass runs through `bind()`:
/// Vars over the current values that the layers find by path (`LayerAdapters`).
public final class LoRANetwork: LayerAdapters {
    public static let unetPrefix = "lora_unet_"
    /// The UNet's weight key prefix, stripped from layer paths to form kohya names.
    public static let unetKeyPrefix = SDXLCheckpoint.unetPrefix + "."

    public let spec: LoRASpec
    public let modules: [LoRAModule]
    private let indexByPath: [String: Int]
    /// The trainable values, flat: [down₀, up₀, down₁, up₁, …].
    public var parameters: [Float]
    /// kohya's multiplier (1 while training; `eval --lora` can scale a LoRA).
    public var multiplier: Float = 1
    /// Training mode: dropouts apply. Off for evaluation.
    public var training = false
    /// Seeds this forward pass's dropout masks. Masks are a pure function of (seed, module), so a
    /// checkpointed block recomputed in backward draws the same masks as its first forward.
    public var dropoutSeed: UInt64 = 0
    /// Linear modules run as one fused op (off: as separate ops, kohya's composition; tests compare the two).
    public var fused = true

    private var downVars: [Var] = []
    private var upVars: [Var] = []

    public var parameterCount: Int { parameters.count }

    /// Builds the network for `unet`, lora_down kaiming-uniform(a=√5) from `seed`, lora_up zero (kohya).
    public convenience init(unet: UNet, spec: LoRASpec, seed: UInt64) throws {
        guard spec.linearRank > 0 else { throw LoRANetworkError("network_dim \(spec.linearRank): the LoRA rank must be at least 1") }
        if let c = spec.convRank, c < 0 { throw LoRANetworkError("conv_dim \(c): must be at least 1 (or leave it out)") }
        for (name, p) in [("network_dropout", spec.dropout), ("rank_dropout", spec.rankDropout), ("module_dropout", spec.moduleDropout)] {
            if let p, !(0..<1).contains(p) { throw LoRANetworkError("\(name) \(p): a probability in [0, 1) is expected") }
        }
        self.init(unet: unet, spec: spec) { layer, _ in
            switch (layer.container, layer.kind) {
            case (.transformer, .linear):
                return (spec.linearRank, spec.linearAlpha)
            case (.resBlock, .linear), (.downsample, .linear), (.upsample, .linear):
                return spec.convRank == nil ? nil : (spec.linearRank, spec.linearAlpha)
            case (.resBlock, .conv(_, _, let k, _, _)), (.downsample, .conv(_, _, let k, _, _)), (.upsample, .conv(_, _, let k, _, _)):
                guard let convRank = spec.convRank, convRank > 0 else { return nil }
                // kohya: 1×1 convs take the linear rank/alpha, 3×3 the conv rank/alpha.
                return k == 1 ? (spec.linearRank, spec.linearAlpha) : (convRank, spec.convAlpha ?? 1)
            default:
                return nil
            }
        }
        // kaiming_uniform_(a=√5): bound = gain·√(3/fan_in) with gain = √(2/(1+5)) → 1/√fan_in.
        var rng = SeededRandom(seed: seed)
        for m in modules {
            let bound = 1 / Float(m.fanIn).squareRoot()
            for i in m.downOffset..<m.upOffset { parameters[i] = (Float(rng.uniform()) * 2 - 1) * bound }
        }
    }

    /// The modules `choose` gives a (rank, alpha) for, in module order, all parameters zero.
    init(unet: UNet, spec: LoRASpec, choose: (AdaptableLayer, String) throws -> (rank: Int, alpha: Float)?) rethrows {
        self.spec = spec
        var modules: [LoRAModule] = []
        var offset = 0
        for layer in unet.adaptableLayers where layer.path.hasPrefix(Self.unetKeyPrefix) {
            let name = Self.kohyaName(path: layer.path)
            guard let (rank, alpha) = try choose(layer, name) else { continue }
            let downShape: [Int], upShape: [Int]
            switch layer.kind {
            case .linear(let i, let o): (downShape, upShape) = ([rank, i], [o, rank])
            case .conv(let i, let o, let k, _, _): (downShape, upShape) = ([rank, i, k, k], [o, rank, 1, 1])
            }
            let down = downShape.reduce(1, *)
            modules.append(LoRAModule(name: name, path: layer.path, kind: layer.kind, rank: rank, alpha: alpha,
                                      downShape: downShape, upShape: upShape, downOffset: offset, upOffset: offset + down))
            offset += down + upShape.reduce(1, *)
        }
        self.modules = modules
        indexByPath = Dictionary(uniqueKeysWithValues: modules.enumerated().map { ($1.path, $0) })
        parameters = [Float](repeating: 0, count: offset)
    }

    /// kohya's module name for a UNet layer path: `lora_unet_` + the path below `model.diffusion_model.`, `.` → `_`.
    public static func kohyaName(path: String) -> String {
        unetPrefix + path.dropFirst(unetKeyPrefix.count).replacingOccurrences(of: ".", with: "_")
    }

    /// Module by kohya name.
    public func module(named name: String) -> LoRAModule? { modules.first { $0.name == name } }

    /// The (name, shape, offset) of every trainable tensor in buffer order.
    public var tensorLayout: [(name: String, shape: [Int], offset: Int)] {
        modules.flatMap { [($0.downName, $0.downShape, $0.downOffset), ($0.upName, $0.upShape, $0.upOffset)] }
    }

    /// Makes fresh Vars over the current parameters for the next forward pass; `trainable` Vars record gradients.
    public func bind(trainable: Bool) {
        func make(_ offset: Int, _ shape: [Int]) -> Var {
            let n = shape.reduce(1, *)
            return Var(Tensor(shape: shape, Array(parameters[offset..<offset + n])), requiresGrad: trainable)
        }
        downVars = modules.map { make($0.downOffset, $0.downShape) }
        upVars = modules.map { make($0.upOffset, $0.upShape) }
    }

    /// Adds the gradients the last backward found for the bound Vars into `into` (the flat gradient buffer).
    public func accumulateGradients(_ grads: GradStore, into buffer: inout [Float]) {
        precondition(buffer.count == parameters.count, "gradient buffer has \(buffer.count) values, the network \(parameters.count)")
        for (i, m) in modules.enumerated() {
            for (v, offset) in [(downVars[i], m.downOffset), (upVars[i], m.upOffset)] {
                guard let g = grads[v] else { continue }
                let s = g.scalars
                for j in 0..<s.count { buffer[offset + j] += s[j] }
            }
        }
    }

    // MARK: forward (kohya LoRAModule.forward)

    /// Linear modules without dropout run fused with their layer (`Tape.lowRankLinear`): the same values as
    /// `adapt`'s org(x) + up(down(x))·scale, without materialising the branch.
    public func linear(_ t: Tape, path: String, input x: Var, weight: Var, bias: Var?) -> Var? {
        guard fused, let i = indexByPath[path], case .linear = modules[i].kind else { return nil }
        if training && ((spec.dropout ?? 0) > 0 || (spec.rankDropout ?? 0) > 0 || (spec.moduleDropout ?? 0) > 0) { return nil }
        if downVars.isEmpty { bind(trainable: false) }
        return t.lowRankLinear(x, weight, bias, down: downVars[i], up: upVars[i], scale: modules[i].scale * multiplier)
    }

    public func adapt(_ t: Tape, path: String, input x: Var, output: Var) -> Var {
        guard let i = indexByPath[path] else { return output }
        // Evaluation without an explicit bind(): frozen Vars over the current values.
        if downVars.isEmpty { bind(trainable: false) }
        let m = modules[i]
        var rng = SeededRandom(seed: dropoutSeed ^ RunRandom.fnv1a(m.name))
        if training, let p = spec.moduleDropout, p > 0, Float(rng.uniform()) < p { return output }
        var scale = m.scale * multiplier
        var lx: Var
        switch m.kind {
        case .linear:
            lx = t.linear(x, downVars[i])                                      // [..., r]
        case .conv(_, _, _, let stride, let padding):
            lx = t.conv2d(x, downVars[i], stride: stride, padding: padding)    // [B, r, h, w]
        }
        if training, let p = spec.dropout, p > 0 {
            // F.dropout: zero with probability p, survivors × 1/(1−p).
            let keep = 1 / (1 - p)
            let mask = (0..<lx.value.count).map { _ in Float(rng.uniform()) < p ? 0 : keep }
            lx = t.mul(lx, Var(Tensor(shape: lx.shape, mask)))
        }
        if training, let p = spec.rankDropout, p > 0 {
            // One keep/drop per (sample, rank), broadcast over tokens or pixels; the kept ranks are rescaled.
            let batch = lx.shape[0]
            let mask = (0..<batch * m.rank).map { _ in Float(rng.uniform()) > p ? Float(1) : 0 }
            let shape: [Int]
            switch m.kind {
            case .linear: shape = lx.shape.count == 3 ? [batch, 1, m.rank] : [batch, m.rank]
            case .conv: shape = [batch, m.rank, 1, 1]
            }
            lx = t.mul(lx, Var(Tensor(shape: shape, mask)))
            scale *= 1 / (1 - p)
        }
        let up: Var
        switch m.kind {
        case .linear: up = t.linear(lx, upVars[i])
        case .conv: up = t.conv2d(lx, upVars[i])
        }
        return t.add(output, t.scale(up, scale))
    }
}
