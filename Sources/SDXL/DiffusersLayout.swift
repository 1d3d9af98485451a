import Foundation
import SafeTensors
import Tensor

// A diffusers SDXL pipeline folder read as a single-file checkpoint: every network binds its CANONICAL
// (single-file LDM/SGM) keys, and `DiffusersFolder` answers them from the folder's files through the one
// mapping table below (`DiffusersLayout.rules`). Nothing else in lora-dist knows diffusers names.

/// The four weight-bearing subfolders of a diffusers `StableDiffusionXLPipeline` folder.
public enum DiffusersComponent: String, CaseIterable, Sendable {
    case unet
    case vae
    case textEncoder = "text_encoder"       // transformers CLIPTextModel (CLIP ViT-L)
    case textEncoder2 = "text_encoder_2"    // transformers CLIPTextModelWithProjection (OpenCLIP ViT-bigG)

    /// The weights file's stem: `<stem>.safetensors`, `<stem>.fp16.safetensors` or sharded `<stem>….index.json`.
    public var weightsStem: String { self == .unet || self == .vae ? "diffusion_pytorch_model" : "model" }

    /// The canonical prefix this component's keys map under (with its trailing dot).
    public var canonicalPrefix: String {
        switch self {
        case .unet: return SDXLCheckpoint.unetPrefix + "."
        case .vae: return SDXLCheckpoint.vaePrefix + "."
        case .textEncoder: return CLIPTextEncoderL.keyPrefix + "."
        case .textEncoder2: return OpenCLIPTextEncoderG.keyPrefix + "."
        }
    }

    /// The component whose canonical prefix `key` is under.
    static func owning(_ canonicalKey: String) -> DiffusersComponent? {
        allCases.first { canonicalKey.hasPrefix($0.canonicalPrefix) }
    }
}

/// How a diffusers tensor becomes the canonical one.
public enum DiffusersTransform: Equatable, Sendable {
    /// The same tensor under another name.
    case rename
    /// diffusers' Linear [C, C] → LDM's 1×1 conv [C, C, 1, 1] (VAE mid-block attention; a reshape, no copy).
    /// A weight already [C, C, 1, 1] passes unchanged.
    case linearToConv1x1
    /// nn.Linear's [P, C] → OpenCLIP's [C, P] parameter used as `x @ text_projection` (a transposed copy).
    case transpose
    /// Rows `part` of `of` of a tensor fused along dim 0 (OpenCLIP's `in_proj_weight` = q ⊕ k ⊕ v; a new tensor).
    case concatRows(part: Int, of: Int)
}

/// The mapping table: diffusers module paths → canonical module paths, with the block-index arithmetic
/// of diffusers' single-file converters (single_file_utils.py `convert_ldm_unet_checkpoint`,
/// `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`; also
/// scripts/convert_diffusers_to_original_sdxl.py), read in the diffusers → canonical direction.
public enum DiffusersLayout {
    /// What the arithmetic needs to know about a folder, read from its key names.
    public struct Shape: Equatable {
        /// ResBlocks per UNet down level (`layers_per_block`); up levels hold one more.
        public var unetResBlocks: Int
        /// UNet up levels (diffusers numbering) that have attentions: their upsampler sits in slot 2, not 1.
        public var unetUpLevelsWithAttention: Set<Int>
        /// VAE levels: decoder `up_blocks.i` is LDM's `up.{levels − 1 − i}`.
        public var vaeLevels: Int

        public init(unetResBlocks: Int, unetUpLevelsWithAttention: Set<Int>, vaeLevels: Int) {
            self.unetResBlocks = unetResBlocks
            self.unetUpLevelsWithAttention = unetUpLevelsWithAttention
            self.vaeLevels = vaeLevels
        }

        /// Read from the diffusers key names of each component.
        public init(keys: [DiffusersComponent: [String]]) {
            func indices(_ keys: [String], _ pattern: [String], at slot: Int) -> [Int] {
                keys.compactMap { key in
                    let parts = key.split(separator: ".").map(String.init)
                    guard parts.count > pattern.count else { return nil }
                    var captured: [Int] = []
                    for (p, s) in zip(pattern, parts) {
                        if p == "#" { guard let i = Int(s) else { return nil }; captured.append(i) } else if p != s { return nil }
                    }
                    return captured[slot]
                }
            }
            let unet = keys[.unet] ?? []
            unetResBlocks = (indices(unet, ["down_blocks", "#", "resnets", "#"], at: 1).max() ?? 1) + 1
            unetUpLevelsWithAttention = Set(indices(unet, ["up_blocks", "#", "attentions", "#"], at: 0))
            vaeLevels = (indices(keys[.vae] ?? [], ["decoder", "up_blocks", "#"], at: 0).max() ?? 0) + 1
        }
    }

    /// One row: a diffusers module path (`#` matches a block index) → the canonical module path, and how
    /// the key's tail below that module is renamed.
    struct Rule {
        let component: DiffusersComponent
        let module: [String]
        let canonical: (_ index: [Int], _ shape: Shape) -> String
        let tails: [Tail]
    }

    /// A tail rename: `diffusers` is a whole tail ("to_q.weight") or, ending in ".", a prefix of it
    /// ("norm1."); "" matches any tail unchanged. The first matching tail wins.
    struct Tail {
        let diffusers: String
        let canonical: String
        let transform: DiffusersTransform
        init(_ diffusers: String, _ canonical: String, _ transform: DiffusersTransform = .rename) {
            self.diffusers = diffusers; self.canonical = canonical; self.transform = transform
        }
    }

    static let same = [Tail("", "")]

    /// diffusers ResnetBlock2D → sgm ResBlock (`update_unet_resnet_ldm_to_diffusers`).
    static let unetResnet = [Tail("norm1.", "in_layers.0."), Tail("conv1.", "in_layers.2."), Tail("time_emb_proj.", "emb_layers.1."),
                             Tail("norm2.", "out_layers.0."), Tail("conv2.", "out_layers.3."), Tail("conv_shortcut.", "skip_connection.")]
    /// diffusers ResnetBlock2D → LDM ResnetBlock (`update_vae_resnet_ldm_to_diffusers`).
    static let vaeResnet = [Tail("conv_shortcut.", "nin_shortcut."), Tail("", "")]
    /// diffusers Attention → LDM AttnBlock (`update_vae_attentions_ldm_to_diffusers`, `conv_attn_to_linear`),
    /// with the pre-0.14 diffusers names (query/key/value/proj_attn) older folders still carry.
    static let vaeAttention: [Tail] = {
        var tails = [Tail("group_norm.", "norm.")]
        for (new, old, ldm) in [("to_q", "query", "q"), ("to_k", "key", "k"), ("to_v", "value", "v"), ("to_out.0", "proj_attn", "proj_out")] {
            for name in [new, old] {
                tails.append(Tail("\(name).weight", "\(ldm).weight", .linearToConv1x1))
                tails.append(Tail("\(name).bias", "\(ldm).bias"))
            }
        }
        return tails
    }()
    /// transformers CLIPEncoderLayer → OpenCLIP ResidualAttentionBlock (`convert_open_clip_checkpoint`).
    static let openCLIPBlock: [Tail] = {
        var tails = [Tail("layer_norm1.", "ln_1."), Tail("layer_norm2.", "ln_2."), Tail("mlp.fc1.", "mlp.c_fc."),
                     Tail("mlp.fc2.", "mlp.c_proj."), Tail("self_attn.out_proj.", "attn.out_proj.")]
        for (part, name) in ["q_proj", "k_proj", "v_proj"].enumerated() {
            for leaf in ["weight", "bias"] {
                tails.append(Tail("self_attn.\(name).\(leaf)", "attn.in_proj_\(leaf)", .concatRows(part: part, of: 3)))
            }
        }
        return tails
    }()

    /// THE table. Index arithmetic (R = ResBlocks per level, sgm numbering): `input_blocks.0` is conv_in;
    /// down level b holds `input_blocks.{1 + b(R+1) + j}` for its ResBlocks j (attention in slot 1) and its
    /// downsampler at `{(b+1)(R+1)}`; up level b holds `output_blocks.{b(R+1) + j}`, j ≤ R, its upsampler
    /// after the last module: slot 2 behind an attention, else 1. The VAE decoder counts levels the other way.
    static let rules: [Rule] = {
        func r(_ c: DiffusersComponent, _ module: String, _ tails: [Tail] = same,
               _ canonical: @escaping ([Int], Shape) -> String) -> Rule {
            Rule(component: c, module: module.split(separator: ".").map(String.init), canonical: canonical, tails: tails)
        }
        func fixed(_ c: DiffusersComponent, _ module: String, _ canonical: String, _ tails: [Tail] = same) -> Rule {
            r(c, module, tails) { _, _ in canonical }
        }
        var rules: [Rule] = [
            fixed(.unet, "time_embedding.linear_1", "time_embed.0"),
            fixed(.unet, "time_embedding.linear_2", "time_embed.2"),
            fixed(.unet, "add_embedding.linear_1", "label_emb.0.0"),
            fixed(.unet, "add_embedding.linear_2", "label_emb.0.2"),
            fixed(.unet, "conv_in", "input_blocks.0.0"),
            fixed(.unet, "conv_norm_out", "out.0"),
            fixed(.unet, "conv_out", "out.2"),
            r(.unet, "down_blocks.#.resnets.#", unetResnet) { i, s in "input_blocks.\(1 + i[0] * (s.unetResBlocks + 1) + i[1]).0" },
            r(.unet, "down_blocks.#.attentions.#") { i, s in "input_blocks.\(1 + i[0] * (s.unetResBlocks + 1) + i[1]).1" },
            r(.unet, "down_blocks.#.downsamplers.0", [Tail("conv.", "op.")]) { i, s in "input_blocks.\((i[0] + 1) * (s.unetResBlocks + 1)).0" },
            r(.unet, "mid_block.resnets.#", unetResnet) { i, _ in "middle_block.\(2 * i[0])" },
            fixed(.unet, "mid_block.attentions.0", "middle_block.1"),
            r(.unet, "up_blocks.#.resnets.#", unetResnet) { i, s in "output_blocks.\(i[0] * (s.unetResBlocks + 1) + i[1]).0" },
            r(.unet, "up_blocks.#.attentions.#") { i, s in "output_blocks.\(i[0] * (s.unetResBlocks + 1) + i[1]).1" },
            r(.unet, "up_blocks.#.upsamplers.0") { i, s in
                "output_blocks.\(i[0] * (s.unetResBlocks + 1) + s.unetResBlocks).\(s.unetUpLevelsWithAttention.contains(i[0]) ? 2 : 1)"
            },

            fixed(.vae, "quant_conv", "quant_conv"),
            fixed(.vae, "post_quant_conv", "post_quant_conv"),
            r(.vae, "encoder.down_blocks.#.resnets.#", vaeResnet) { i, _ in "encoder.down.\(i[0]).block.\(i[1])" },
            r(.vae, "encoder.down_blocks.#.downsamplers.0") { i, _ in "encoder.down.\(i[0]).downsample" },
            r(.vae, "decoder.up_blocks.#.resnets.#", vaeResnet) { i, s in "decoder.up.\(s.vaeLevels - 1 - i[0]).block.\(i[1])" },
            r(.vae, "decoder.up_blocks.#.upsamplers.0") { i, s in "decoder.up.\(s.vaeLevels - 1 - i[0]).upsample" },

            // CLIP ViT-L: sgm keeps transformers' `text_model` as is (`convert_ldm_clip_checkpoint` only strips the prefix).
            fixed(.textEncoder, "text_model", ""),

            fixed(.textEncoder2, "text_model.embeddings.token_embedding", "token_embedding"),
            fixed(.textEncoder2, "text_model.embeddings.position_embedding", "", [Tail("weight", "positional_embedding")]),
            fixed(.textEncoder2, "text_model.final_layer_norm", "ln_final"),
            fixed(.textEncoder2, "text_projection", "", [Tail("weight", "text_projection", .transpose)]),
            r(.textEncoder2, "text_model.encoder.layers.#", openCLIPBlock) { i, _ in "transformer.resblocks.\(i[0])" },
        ]
        for coder in ["encoder", "decoder"] {
            rules += [
                fixed(.vae, "\(coder).conv_in", "\(coder).conv_in"),
                fixed(.vae, "\(coder).conv_out", "\(coder).conv_out"),
                fixed(.vae, "\(coder).conv_norm_out", "\(coder).norm_out"),
                r(.vae, "\(coder).mid_block.resnets.#", vaeResnet) { i, _ in "\(coder).mid.block_\(i[0] + 1)" },
                fixed(.vae, "\(coder).mid_block.attentions.0", "\(coder).mid.attn_1", vaeAttention),
            ]
        }
        return rules
    }()

    /// transformers ≥ 5 saves CLIPTextModel without its `text_model.` wrapper (diffusers' loader strips it
    /// too: `create_diffusers_clip_model_from_ldm`, has_text_model_wrapper); keys are read as if it were there.
    static let textModelWrapper = "text_model."

    /// Buffers a folder may carry that no network loads: transformers' CLIP `position_ids` (older saves).
    static let ignorable: Set<String> = ["text_model.embeddings.position_ids"]

    /// The canonical key for one diffusers key of `component` and how its tensor is transformed, or nil
    /// when the table has no row for it.
    public static func canonicalKey(for diffusersKey: String, in component: DiffusersComponent, shape: Shape)
        -> (key: String, transform: DiffusersTransform)? {
        var key = diffusersKey
        if component == .textEncoder || component == .textEncoder2,
           !key.hasPrefix(textModelWrapper), key != "text_projection.weight" {
            key = textModelWrapper + key
        }
        let parts = key.split(separator: ".", omittingEmptySubsequences: false).map(String.init)
        for rule in rules where rule.component == component && parts.count > rule.module.count {
            var index: [Int] = []
            var matches = true
            for (pattern, part) in zip(rule.module, parts) {
                if pattern == "#" {
                    guard let i = Int(part), i >= 0 else { matches = false; break }
                    index.append(i)
                } else if pattern != part {
                    matches = false; break
                }
            }
            guard matches else { continue }
            let tail = parts[rule.module.count...].joined(separator: ".")
            guard let t = rule.tails.first(where: { $0.diffusers.hasSuffix(".") || $0.diffusers.isEmpty
                                                    ? tail.hasPrefix($0.diffusers) : tail == $0.diffusers }) else { return nil }
            let canonicalTail = t.canonical + tail.dropFirst(t.diffusers.count)
            let module = rule.canonical(index, shape)
            return (component.canonicalPrefix + (module.isEmpty ? canonicalTail : module + "." + canonicalTail), t.transform)
        }
        return nil
    }
}

/// A problem with a diffusers folder's layout (not with a single key's shape: those are load errors).
public struct DiffusersFolderError: Error, CustomStringConvertible {
    public let description: String
}

/// A diffusers SDXL folder (unet/, vae/, text_encoder/, text_encoder_2/) answering canonical single-file
/// keys. Frozen weights stay memory-mapped in their file's dtype (renamed and reshaped tensors are views of
/// the mapped files); the bigG text projection (transposed) and fused attention projections (concatenated)
/// are new tensors in the same dtype, made when asked for.
public final class DiffusersFolder: WeightSource {
    /// Where one canonical tensor comes from: one diffusers tensor, or the parts of a fused one.
    struct Origin {
        let component: DiffusersComponent
        var parts: [String?]                // diffusers keys (one, or `of` parts in row order)
        let transform: DiffusersTransform
    }

    public let path: String
    /// The weights files read, per component (relative to the folder; several when sharded).
    public let files: [DiffusersComponent: [String]]
    /// Every canonical key the folder answers → its shape (in the canonical layout).
    public let shapes: [String: [Int]]
    /// Diffusers tensors that map to no canonical key, as "<subfolder>/<file>: <key>" (an error on load).
    public let unmappedKeys: [String]
    /// From unet/config.json: the attention head size (block width / heads) and GroupNorm group count.
    public let unetHeadDim: Int?
    public let unetNormGroups: Int?
    /// From vae/config.json `scaling_factor`.
    public let vaeScalingFactor: Float?
    public let layoutShape: DiffusersLayout.Shape

    private let origins: [String: Origin]
    private let tensorFiles: [DiffusersComponent: [String: SafeTensorsFile]]   // diffusers key → its file
    /// Pseudo canonical keys standing for unmapped diffusers keys, under their component's prefix so the
    /// strict unused-key check of that network reports them.
    private let unmappedByPseudoKey: [String: String]

    public var sourceName: String { path }
    public var keys: [String] { (Array(shapes.keys) + Array(unmappedByPseudoKey.keys)).sorted() }

    /// Whether `path` is a directory (checkpoints given as directories are read as diffusers folders).
    public static func isFolder(_ path: String) -> Bool {
        var isDirectory: ObjCBool = false
        return FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) && isDirectory.boolValue
    }

    public init(path: String) throws {
        self.path = path
        let root = URL(fileURLWithPath: path)
        var files: [DiffusersComponent: [String]] = [:]
        var tensorFiles: [DiffusersComponent: [String: SafeTensorsFile]] = [:]
        for component in DiffusersComponent.allCases {
            guard let found = try Self.weightsFiles(root, component) else { continue }
            files[component] = found.names
            tensorFiles[component] = found.byKey
        }
        guard tensorFiles[.unet] != nil else {
            throw DiffusersFolderError(description: "\(path) is not a diffusers SDXL folder: it has no unet/diffusion_pytorch_model.safetensors (nor .fp16.safetensors, nor a sharded .safetensors.index.json)")
        }
        self.files = files
        self.tensorFiles = tensorFiles

        let shape = DiffusersLayout.Shape(keys: tensorFiles.mapValues { Array($0.keys) })
        layoutShape = shape
        var origins: [String: Origin] = [:]
        var unmapped: [String: String] = [:]
        for component in DiffusersComponent.allCases {
            guard let byKey = tensorFiles[component] else { continue }
            let file = files[component]!.count == 1 ? files[component]![0] : "\(component.rawValue)/\(component.weightsStem)*"
            for dkey in byKey.keys.sorted() where !DiffusersLayout.ignorable.contains(dkey)
                && !DiffusersLayout.ignorable.contains(DiffusersLayout.textModelWrapper + dkey) {
                guard let (ckey, transform) = DiffusersLayout.canonicalKey(for: dkey, in: component, shape: shape) else {
                    unmapped[component.canonicalPrefix + "<unmapped>." + dkey] = "\(file): \(dkey)"
                    continue
                }
                if case .concatRows(let part, let of) = transform {
                    var origin = origins[ckey] ?? Origin(component: component, parts: Array(repeating: nil, count: of), transform: transform)
                    if let other = origin.parts[part] {
                        throw DiffusersFolderError(description: "\(path): \(file) holds both \(other) and \(dkey), which are the same tensor (\(ckey))")
                    }
                    origin.parts[part] = dkey
                    origins[ckey] = origin
                } else {
                    if let other = origins[ckey] {
                        throw DiffusersFolderError(description: "\(path): \(file) holds both \(other.parts.compactMap { $0 }.joined(separator: ", ")) and \(dkey), which map to the same tensor \(ckey)")
                    }
                    origins[ckey] = Origin(component: component, parts: [dkey], transform: transform)
                }
            }
        }
        self.origins = origins
        unmappedByPseudoKey = unmapped
        unmappedKeys = unmapped.values.sorted()

        var shapes: [String: [Int]] = [:]
        for (ckey, origin) in origins {
            let byKey = tensorFiles[origin.component]!
            let partShapes = origin.parts.compactMap { $0.flatMap { byKey[$0]?.entries[$0]?.shape } }
            guard let first = partShapes.first else { continue }
            switch origin.transform {
            case .rename: shapes[ckey] = first
            case .linearToConv1x1: shapes[ckey] = first.count == 2 ? first + [1, 1] : first
            case .transpose: shapes[ckey] = first.count == 2 ? [first[1], first[0]] : first
            case .concatRows: shapes[ckey] = [partShapes.map { $0.first ?? 0 }.reduce(0, +)] + first.dropFirst()
            }
        }
        self.shapes = shapes

        let unetConfig = Self.json(root.appendingPathComponent("unet/config.json"))
        (unetHeadDim, unetNormGroups) = Self.unetAttention(unetConfig)
        vaeScalingFactor = (Self.json(root.appendingPathComponent("vae/config.json"))?["scaling_factor"] as? NSNumber)?.floatValue
    }

    public func tensor(_ key: String, expectedShape: [Int]) throws -> Tensor? {
        guard let origin = origins[key] else { return nil }
        let byKey = tensorFiles[origin.component]!
        let missing = origin.parts.enumerated().filter { $0.element == nil }
        if !missing.isEmpty {
            let present = origin.parts.compactMap { $0 }
            let names = missing.map { origin.parts.count == 3 ? ["q", "k", "v"][$0.offset] : "part \($0.offset)" }
            throw DiffusersFolderError(description: "\(path): \(key) is fused from \(origin.parts.count) \(origin.component.rawValue) tensors; only \(present.joined(separator: ", ")) found (\(names.joined(separator: ", ")) missing)")
        }
        let parts = try origin.parts.map { try byKey[$0!]!.tensor($0!) }
        switch origin.transform {
        case .rename: return parts[0]
        case .linearToConv1x1: return parts[0].rank == 2 ? parts[0].reshaped(parts[0].shape + [1, 1]) : parts[0]
        case .transpose: return parts[0].rank == 2 ? Self.transposed(parts[0]) : parts[0]
        case .concatRows: return try Self.concatenatedRows(parts, key: key)
        }
    }

    /// The folder names of a canonical key: "<subfolder>/<file>: <diffusers key>[, …]" (for error messages).
    public func diffusersName(of canonicalKey: String) -> String? {
        if let unmapped = unmappedByPseudoKey[canonicalKey] { return unmapped + " (no SDXL tensor corresponds to it)" }
        guard let origin = origins[canonicalKey], let names = files[origin.component] else { return nil }
        let file = names.count == 1 ? names[0] : "\(origin.component.rawValue)/\(origin.component.weightsStem)*"
        return "\(file): " + origin.parts.map { $0 ?? "(missing)" }.joined(separator: " ⊕ ")
    }

    /// The same load error with each key followed by the folder tensor it came from (or, for a missing key,
    /// the file it was looked for in), so a problem can be found in the folder.
    func annotate(_ e: WeightLoadError) -> WeightLoadError {
        func described(_ key: String) -> String {
            if let name = diffusersName(of: key) { return "\(key) ← \(name)" }
            guard let component = DiffusersComponent.owning(key) else { return key }
            let looked = files[component]?.joined(separator: ", ") ?? "\(component.rawValue)/ (absent)"
            return "\(key) (looked for in \(looked))"
        }
        let unexpected = e.unexpected.map { key in
            unmappedByPseudoKey[key].map { "\($0) (no SDXL tensor corresponds to it)" } ?? described(key)
        }
        return WeightLoadError(source: e.source + " (diffusers folder)", missing: e.missing.map(described),
                               unexpected: unexpected, mismatched: e.mismatched.map { (described($0.key), $0.expected, $0.found) })
    }

    // MARK: files

    /// A component's weights: `<stem>.safetensors`, else its sharded index, else the fp16 variant (and its
    /// index). nil when the subfolder has none of them; an error when only PyTorch pickles are there.
    static func weightsFiles(_ root: URL, _ component: DiffusersComponent)
        throws -> (names: [String], byKey: [String: SafeTensorsFile])? {
        let folder = root.appendingPathComponent(component.rawValue)
        let stem = component.weightsStem
        let fm = FileManager.default
        for variant in ["", ".fp16"] {
            let single = "\(stem)\(variant).safetensors"
            if fm.fileExists(atPath: folder.appendingPathComponent(single).path) {
                let file = try SafeTensorsFile(path: folder.appendingPathComponent(single).path)
                return (["\(component.rawValue)/\(single)"], Dictionary(uniqueKeysWithValues: file.names.map { ($0, file) }))
            }
            let index = folder.appendingPathComponent("\(single).index.json")
            if fm.fileExists(atPath: index.path) {
                guard let map = json(index)?["weight_map"] as? [String: String] else {
                    throw DiffusersFolderError(description: "\(index.path) has no weight_map")
                }
                var shards: [String: SafeTensorsFile] = [:]
                var byKey: [String: SafeTensorsFile] = [:]
                for shard in Set(map.values).sorted() {
                    shards[shard] = try SafeTensorsFile(path: folder.appendingPathComponent(shard).path)
                }
                for (key, shard) in map {
                    guard shards[shard]!.entries[key] != nil else {
                        throw DiffusersFolderError(description: "\(index.path) places \(key) in \(shard), which does not hold it")
                    }
                    byKey[key] = shards[shard]
                }
                for (name, shard) in shards {
                    if let stray = shard.names.first(where: { byKey[$0] == nil }) {
                        throw DiffusersFolderError(description: "\(component.rawValue)/\(name) holds \(stray), which \(index.lastPathComponent) does not list")
                    }
                }
                return (shards.keys.sorted().map { "\(component.rawValue)/\($0)" }, byKey)
            }
        }
        for pickle in ["\(stem).bin", "\(stem).fp16.bin"] where fm.fileExists(atPath: folder.appendingPathComponent(pickle).path) {
            throw DiffusersFolderError(description: "\(folder.path) has only \(pickle) (a PyTorch pickle); lora-dist reads safetensors: re-save the folder with safe_serialization=True")
        }
        return nil
    }

    static func json(_ url: URL) -> [String: Any]? {
        guard let data = try? Data(contentsOf: url) else { return nil }
        return (try? JSONSerialization.jsonObject(with: data)) as? [String: Any]
    }

    /// Head size and group count from a UNet2DConditionModel config. diffusers' naming quirk:
    /// `attention_head_dim` is the number of heads per level unless `num_attention_heads` is given
    /// (UNet2DConditionModel.__init__: `num_attention_heads = num_attention_heads or attention_head_dim`);
    /// the head size is the level's width over its heads, taken over levels with cross-attention.
    static func unetAttention(_ config: [String: Any]?) -> (headDim: Int?, normGroups: Int?) {
        guard let config else { return (nil, nil) }
        let groups = (config["norm_num_groups"] as? NSNumber)?.intValue
        guard let widths = (config["block_out_channels"] as? [NSNumber])?.map(\.intValue),
              let types = config["down_block_types"] as? [String], types.count == widths.count else { return (nil, groups) }
        let headsValue = (config["num_attention_heads"] is NSNull ? nil : config["num_attention_heads"]) ?? config["attention_head_dim"]
        let heads: [Int]
        if let list = headsValue as? [NSNumber] { heads = list.map(\.intValue) }
        else if let one = headsValue as? NSNumber { heads = Array(repeating: one.intValue, count: widths.count) }
        else { return (nil, groups) }
        guard heads.count == widths.count else { return (nil, groups) }
        let sizes = Set(zip(zip(widths, heads), types).filter { $0.1.hasPrefix("CrossAttn") && $0.0.1 > 0 }.map { $0.0.0 / $0.0.1 })
        return (sizes.count == 1 ? sizes.first : nil, groups)
    }

    // MARK: dtype-preserving copies (bit-exact: bytes are moved, never widened)

    /// Bytes owned here, handed to a Tensor through `Storage(borrowing:owner:)`.
    private final class OwnedBytes {
        let pointer: UnsafeMutableRawPointer
        let count: Int
        init(count: Int) { self.count = count; pointer = .allocate(byteCount: max(count, 1), alignment: 64) }
        deinit { pointer.deallocate() }
        func tensor(_ shape: [Int], _ dtype: DType) -> Tensor {
            Tensor(shape: shape, dtype: dtype, storage: Storage(borrowing: UnsafeRawBufferPointer(start: pointer, count: count), owner: self),
                   byteOffset: 0)
        }
    }

    /// [R, C] → [C, R] in the same dtype.
    static func transposed(_ t: Tensor) -> Tensor {
        let (rows, cols) = (t.shape[0], t.shape[1])
        let out = OwnedBytes(count: t.count * t.dtype.byteSize)
        func move<E>(_: E.Type) {
            t.withUnsafeBytes { raw in
                let src = raw.bindMemory(to: E.self), dst = out.pointer.bindMemory(to: E.self, capacity: rows * cols)
                for r in 0..<rows { for c in 0..<cols { dst[c * rows + r] = src[r * cols + c] } }
            }
        }
        if t.dtype.byteSize == 2 { move(UInt16.self) } else { move(UInt32.self) }
        return out.tensor([cols, rows], t.dtype)
    }

    /// Parts stacked along dim 0 (trailing dims equal), in the first part's dtype.
    static func concatenatedRows(_ parts: [Tensor], key: String) throws -> Tensor {
        let tail = Array(parts[0].shape.dropFirst())
        guard parts.allSatisfy({ Array($0.shape.dropFirst()) == tail && $0.rank == parts[0].rank }) else {
            throw DiffusersFolderError(description: "\(key): the fused parts have shapes \(parts.map(\.shape)), which do not stack")
        }
        let dtype = parts[0].dtype
        let same = parts.map { $0.dtype == dtype ? $0 : $0.converted(to: dtype) }
        let out = OwnedBytes(count: same.reduce(0) { $0 + $1.count } * dtype.byteSize)
        var offset = 0
        for p in same {
            p.withUnsafeBytes { src in
                (out.pointer + offset).copyMemory(from: src.baseAddress!, byteCount: src.count)
                offset += src.count
            }
        }
        return out.tensor([same.reduce(0) { $0 + $1.shape[0] }] + tail, dtype)
    }
}
