import Base
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

/// The models a LoRA network adapts, each with kohya's module-name prefix (networks/lora.py: LORA_PREFIX_UNET,
/// LORA_PREFIX_TEXT_ENCODER1/2 for SDXL's two text encoders) and its learning-rate group.
public enum LoRAModel: Int, CaseIterable, Sendable, Comparable {
    case unet, textEncoder1, textEncoder2

    public var prefix: String { ["lora_unet_", "lora_te1_", "lora_te2_"][rawValue] }
    /// The parameter group's name (metrics, optimizer groups).
    public var groupName: String { ["unet", "te1", "te2"][rawValue] }

    public static func < (a: LoRAModel, b: LoRAModel) -> Bool { a.rawValue < b.rawValue }

    /// The model a kohya module name belongs to.
    public static func of(moduleName: String) -> LoRAModel? { allCases.first { moduleName.hasPrefix($0.prefix) } }
}

/// A layer a LoRA module can attach to, with its kohya name. `part`/`parts`: the module adapts rows
/// `part` of `parts` equal slices of the layer's output (kohya's q/k/v modules on OpenCLIP's fused in_proj).
public struct LoRATarget: Sendable {
    public let model: LoRAModel
    public let name: String
    public let layer: AdaptableLayer
    /// The module's own shape (the layer's, or one slice of it).
    public let kind: AdaptableLayer.Kind
    public let part: Int
    public let parts: Int
}

/// One LoRA module: `out = org(x) + up(down(x)) · multiplier · alpha / rank` on the layer at `path`.
public struct LoRAModule: Equatable, Sendable {
    /// kohya's name: the model's prefix + the module path with `.` → `_`.
    public let name: String
    public let model: LoRAModel
    /// The adapted layer's weight key prefix (`model.diffusion_model.input_blocks.4.1.proj_in`).
    public let path: String
    public let kind: AdaptableLayer.Kind
    /// Which of `parts` equal output slices of the layer this module adds to (1 part: the whole output).
    public let part: Int
    public let parts: Int
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
    public var parameterCount: Int { upOffset - downOffset + upShape.reduce(1, *) }
}

public struct LoRANetworkError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// kohya's `LoRANetwork` for SDXL, generated from the models' recorded layers (`adaptableLayers`).
///
/// Targets (kohya networks/lora.py `create_modules`): UNet — every Linear inside a SpatialTransformer
/// (Transformer2DModel); with a conv rank, every Conv2d and Linear inside ResBlocks, Downsample and Upsample —
/// 3×3 convs at the conv rank, 1×1 convs and Linears (skip_connection, emb_layers.1) at the linear rank. Text
/// encoders — every Linear of CLIPAttention and CLIPMLP (q/k/v/out_proj, fc1, fc2), named as kohya names them in
/// transformers' layout (the single-file layout's fused OpenCLIP in_proj is adapted as kohya's three modules).
///
/// All trainable values live in one flat fp32 buffer (`parameters`: each module's down then up, in module
/// order: UNet, then text encoder 1, then 2), which is what the optimizer updates and what is all-reduced. A
/// forward pass runs through `bind()`: Vars over the current values that the layers find by path (`LayerAdapters`).
public final class LoRANetwork: LayerAdapters {
    public static let unetPrefix = LoRAModel.unet.prefix
    /// The UNet's weight key prefix, stripped from layer paths to form kohya names.
    public static let unetKeyPrefix = SDXLCheckpoint.unetPrefix + "."

    public let spec: LoRASpec
    public let modules: [LoRAModule]
    /// Layer path → its modules, ordered by part.
    private let modulesByPath: [String: [Int]]
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
    /// Per module, the tape position (`Tape.position`) of its first use in the current forward pass (Int.max: unused),
    /// recorded while `recordingUses` (set for one forward, off before backward: a checkpointed block's replay during
    /// backward uses the modules again, on another tape). GradientBuckets reads it to know when a gradient is final.
    public private(set) var firstUse: [Int] = []
    public var recordingUses = false {
        didSet { if recordingUses { firstUse = Array(repeating: .max, count: modules.count) } }
    }

    private func noteUse(_ t: Tape, _ i: Int) {
        if recordingUses { firstUse[i] = min(firstUse[i], t.position) }
    }

    /// Module i's parameters (lora_down then lora_up) in the flat buffer.
    public func range(ofModule i: Int) -> Range<Int> { modules[i].downOffset..<(modules[i].downOffset + modules[i].parameterCount) }

    public var parameterCount: Int { parameters.count }
    /// The models this network has modules for.
    public var models: [LoRAModel] { Array(Set(modules.map(\.model))).sorted() }

    /// Builds kohya's network for `unet` (nil: text encoders only) and, when given, the text encoders; lora_down
    /// kaiming-uniform(a=√5) from `seed`, lora_up zero (kohya).
    public convenience init(unet: UNet?, textEncoders: (CLIPTextEncoderL, OpenCLIPTextEncoderG)? = nil, spec: LoRASpec,
                            seed: UInt64) throws {
        guard spec.linearRank > 0 else { throw LoRANetworkError("network_dim \(spec.linearRank): the LoRA rank must be at least 1") }
        if let c = spec.convRank, c < 0 { throw LoRANetworkError("conv_dim \(c): must be at least 1 (or leave it out)") }
        for (name, p) in [("network_dropout", spec.dropout), ("rank_dropout", spec.rankDropout), ("module_dropout", spec.moduleDropout)] {
            if let p, !(0..<1).contains(p) { throw LoRANetworkError("\(name) \(p): a probability in [0, 1) is expected") }
        }
        try self.init(targets: Self.targets(unet: unet, textEncoders: textEncoders), spec: spec) { target in
            let layer = target.layer
            guard target.model == .unet else { return (spec.linearRank, spec.linearAlpha) }
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
        var rng = SplitMix64(seed: seed)
        for m in modules {
            let bound = 1 / Float(m.fanIn).squareRoot()
            for i in m.downOffset..<m.upOffset { parameters[i] = (Float(rng.uniform()) * 2 - 1) * bound }
        }
    }

    /// The modules `choose` gives a (rank, alpha) for, in target order, all parameters zero.
    init(targets: [LoRATarget], spec: LoRASpec, choose: (LoRATarget) throws -> (rank: Int, alpha: Float)?) throws {
        self.spec = spec
        var modules: [LoRAModule] = []
        var offset = 0
        for target in targets {
            guard let (rank, alpha) = try choose(target) else { continue }
            let downShape: [Int], upShape: [Int]
            switch target.kind {
            case .linear(let i, let o): (downShape, upShape) = ([rank, i], [o, rank])
            case .conv(let i, let o, let k, _, _): (downShape, upShape) = ([rank, i, k, k], [o, rank, 1, 1])
            }
            let down = downShape.reduce(1, *)
            modules.append(LoRAModule(name: target.name, model: target.model, path: target.layer.path, kind: target.kind,
                                      part: target.part, parts: target.parts, rank: rank, alpha: alpha,
                                      downShape: downShape, upShape: upShape, downOffset: offset, upOffset: offset + down))
            offset += down + upShape.reduce(1, *)
        }
        // The flat buffer, its gradient and (at most) two optimizer moments live in memory: refuse a network that cannot,
        // before allocating it (LyCORIS's full-rank convention network_dim = 100000 under networks.lora, for one).
        let bytes = Double(offset) * 4 * 4
        guard bytes < Double(ProcessInfo.processInfo.physicalMemory) else {
            throw LoRANetworkError("network_dim \(spec.linearRank)\(spec.convRank.map { " / conv_dim \($0)" } ?? ""): the LoRA would have "
                + "\(offset) parameters (\(String(format: "%.0f", bytes / 1e9)) GB with its gradient and optimizer state), more than this "
                + "machine's memory. Ranks of 4–128 are usual for networks.lora (network_dim = 100000 is LyCORIS's full-rank LoKr convention)")
        }
        self.modules = modules
        var byPath: [String: [Int]] = [:]
        for (i, m) in modules.enumerated() { byPath[m.path, default: []].append(i) }
        modulesByPath = byPath.mapValues { $0.sorted { modules[$0].part < modules[$1].part } }
        parameters = [Float](repeating: 0, count: offset)
    }

    // MARK: targets

    /// Every layer kohya could attach a module to, in module order: the UNet's (kohya picks among them by container),
    /// then each text encoder's CLIPAttention/CLIPMLP Linears.
    public static func targets(unet: UNet?, textEncoders: (CLIPTextEncoderL, OpenCLIPTextEncoderG)?) throws -> [LoRATarget] {
        var out: [LoRATarget] = []
        for layer in unet?.adaptableLayers ?? [] where layer.path.hasPrefix(unetKeyPrefix) {
            out.append(LoRATarget(model: .unet, name: kohyaName(path: layer.path), layer: layer, kind: layer.kind, part: 0, parts: 1))
        }
        if let (l, g) = textEncoders {
            out += try textEncoderTargets(.textEncoder1, layers: l.adaptableLayers, blocks: l.config.layers, component: .textEncoder)
            out += try textEncoderTargets(.textEncoder2, layers: g.adaptableLayers, blocks: g.config.layers, component: .textEncoder2)
        }
        return out
    }

    /// kohya's text-encoder modules are named in transformers' CLIPTextModel tree (`text_model.encoder.layers.N.
    /// self_attn.q_proj` → `lora_te1_text_model_encoder_layers_N_self_attn_q_proj`). Each name is mapped into the
    /// single-file key space by the diffusers conversion table (OpenCLIP's q/k/v rows of `in_proj_weight` for bigG),
    /// and must land on a recorded attention/MLP layer; every such layer must be named.
    static func textEncoderTargets(_ model: LoRAModel, layers: [AdaptableLayer], blocks: Int,
                                   component: DiffusersComponent) throws -> [LoRATarget] {
        let byWeight = Dictionary(layers.map { ($0.weightKey, $0) }, uniquingKeysWith: { a, _ in a })
        let shape = DiffusersLayout.Shape(unetResBlocks: 0, unetUpLevelsWithAttention: [], vaeLevels: 0)
        var out: [LoRATarget] = []
        var named = Set<String>()
        for i in 0..<blocks {
            for child in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"] {
                let module = "text_model.encoder.layers.\(i).\(child)"
                guard let (key, transform) = DiffusersLayout.canonicalKey(for: module + ".weight", in: component, shape: shape),
                      let layer = byWeight[key], case .linear(let inF, let outF) = layer.kind else {
                    throw LoRANetworkError("\(model.prefix)\(module): no layer of the text encoder takes this module's weight (a text encoder of another layout?)")
                }
                var part = 0, parts = 1
                if case .concatRows(let p, let n) = transform { (part, parts) = (p, n) }
                named.insert(layer.path)
                out.append(LoRATarget(model: model, name: model.prefix + module.replacingOccurrences(of: ".", with: "_"),
                                      layer: layer, kind: .linear(inFeatures: inF, outFeatures: outF / parts), part: part, parts: parts))
            }
        }
        let unnamed = layers.filter { ($0.container == .attention || $0.container == .mlp) && !named.contains($0.path) }
        precondition(unnamed.isEmpty, "text encoder layers without a kohya module name: \(unnamed.map(\.path))")
        return out
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

    /// The flat buffer as the optimizer sees it: one parameter group per adapted model, in `models` order (kohya's
    /// groups: the UNet at unet_lr, each text encoder at its text_encoder_lr).
    public var parameterLayout: ParameterLayout {
        let models = self.models
        let entries = modules.flatMap { m in
            [(m.downName, m.downShape, m.downOffset), (m.upName, m.upShape, m.upOffset)].map {
                ParameterLayout.Entry(name: $0.0, shape: $0.1, offset: $0.2, group: models.firstIndex(of: m.model)!)
            }
        }
        return ParameterLayout(entries: entries, groupNames: models.map(\.groupName))
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
        accumulateGradients(grads, modules: modules.indices, into: &buffer)
    }

    /// The same for the given modules only (the overlapped reduction adds each module's once it is final).
    public func accumulateGradients(_ grads: GradStore, modules indices: some Sequence<Int>, into buffer: inout [Float]) {
        precondition(buffer.count == parameters.count, "gradient buffer has \(buffer.count) values, the network \(parameters.count)")
        for i in indices {
            let m = modules[i]
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
        guard fused, let index = modulesByPath[path], index.count == 1, modules[index[0]].parts == 1,
              case .linear = modules[index[0]].kind else { return nil }
        if training && ((spec.dropout ?? 0) > 0 || (spec.rankDropout ?? 0) > 0 || (spec.moduleDropout ?? 0) > 0) { return nil }
        if downVars.isEmpty { bind(trainable: false) }
        let i = index[0]
        noteUse(t, i)
        return t.lowRankLinear(x, weight, bias, down: downVars[i], up: upVars[i], scale: modules[i].scale * multiplier)
    }

    public func adapt(_ t: Tape, path: String, input x: Var, output: Var) -> Var {
        guard let index = modulesByPath[path] else { return output }
        // Evaluation without an explicit bind(): frozen Vars over the current values.
        if downVars.isEmpty { bind(trainable: false) }
        let first = modules[index[0]]
        if first.parts == 1 { return branch(t, index[0], x).map { t.add(output, $0) } ?? output }
        // A fused layer (OpenCLIP in_proj = q ⊕ k ⊕ v on the last axis): each module adds to its slice; a slice
        // without a module (or dropped this step) adds zeros.
        let width = output.shape[output.rank - 1] / first.parts
        var sliceShape = output.shape
        sliceShape[sliceShape.count - 1] = width
        let pieces = (0..<first.parts).map { part -> Var in
            index.first { modules[$0].part == part }.flatMap { branch(t, $0, x) } ?? Var(Tensor(zeros: sliceShape))
        }
        return t.add(output, t.concat(pieces, axis: output.rank - 1))
    }

    /// Module i's branch up(down(x))·scale (kohya LoRAModule.forward without org), nil when module dropout skips it.
    private func branch(_ t: Tape, _ i: Int, _ x: Var) -> Var? {
        let m = modules[i]
        noteUse(t, i)
        var rng = SplitMix64(seed: dropoutSeed ^ FNV1a64.hash(m.name))
        if training, let p = spec.moduleDropout, p > 0, Float(rng.uniform()) < p { return nil }
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
        return t.scale(up, scale)
    }
}
