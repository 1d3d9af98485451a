import Crypto
import Foundation
import SDXL
import SafeTensors
import Tensor

/// kohya's LoRA file: `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha` (a 0-d tensor) per module, in
/// the save precision, with string metadata (`ss_*`, `sshs_*`, `modelspec.*`). What ComfyUI, A1111 and diffusers load.
public enum LoRAFile {
    /// The tensors of `network` as kohya's `save_weights` writes them (every tensor, alpha included, in `dtype`).
    public static func tensors(_ network: LoRANetwork, dtype: DType) -> [String: Tensor] {
        Layout(network, metadata: [:]).tensors(network.parameters, dtype: dtype)
    }

    /// Where each tensor of the file lives in the network's flat parameter buffer, with each module's alpha and the
    /// file's metadata: saved in every state, so `lora-dist export` writes the LoRA file from a state alone.
    public struct Layout: Codable, Sendable {
        public struct Module: Codable, Sendable {
            public let name: String
            public let downShape: [Int], upShape: [Int]
            public let downOffset: Int, upOffset: Int
            public let alpha: Float
        }
        public let modules: [Module]
        public let metadata: [String: String]
        /// The run's save_precision ("fp16", "bf16", else fp32), the default precision of an export.
        public var savePrecision: String?

        public init(_ network: LoRANetwork, metadata: [String: String], savePrecision: String? = nil) {
            self.savePrecision = savePrecision
            modules = network.modules.map {
                Module(name: $0.name, downShape: $0.downShape, upShape: $0.upShape, downOffset: $0.downOffset,
                       upOffset: $0.upOffset, alpha: $0.alpha)
            }
            self.metadata = metadata
        }

        public var parameterCount: Int { modules.map { $0.upOffset + $0.upShape.reduce(1, *) }.max() ?? 0 }

        public func tensors(_ parameters: [Float], dtype: DType) -> [String: Tensor] {
            var out: [String: Tensor] = [:]
            for m in modules {
                out[m.name + ".lora_down.weight"] = Tensor(shape: m.downShape, Array(parameters[m.downOffset..<m.upOffset]), dtype: dtype)
                out[m.name + ".lora_up.weight"] = Tensor(shape: m.upShape,
                                                          Array(parameters[m.upOffset..<m.upOffset + m.upShape.reduce(1, *)]), dtype: dtype)
                out[m.name + ".alpha"] = Tensor(shape: [], [m.alpha], dtype: dtype)
            }
            return out
        }
    }

    /// Writes `network` to `path` (tmp + fsync + rename), adding kohya's `sshs_model_hash` / `sshs_legacy_hash`
    /// (computed, as kohya's precalculate_safetensors_hashes does, over the file that holds only the `ss_*` metadata).
    @discardableResult
    public static func save(_ network: LoRANetwork, to path: String, dtype: DType, metadata: [String: String]) throws -> [String: String] {
        try save(tensors(network, dtype: dtype), to: path, metadata: metadata)
    }

    /// Writes `tensors` (a LoRA's, from `tensors(_:dtype:)` or `Layout.tensors`) with kohya's hashes added.
    @discardableResult
    public static func save(_ tensors: [String: Tensor], to path: String, metadata: [String: String]) throws -> [String: String] {
        var metadata = metadata
        let (model, legacy) = hashes(tensors: tensors, metadata: metadata.filter { $0.key.hasPrefix("ss_") })
        metadata["sshs_model_hash"] = model
        metadata["sshs_legacy_hash"] = legacy
        try writeSafeTensors(tensors, metadata: metadata, to: path)
        return metadata
    }

    /// kohya train_util.precalculate_safetensors_hashes: `addnet_hash_safetensors` = SHA-256 of everything after the
    /// header; `addnet_hash_legacy` = the first 8 hex digits of SHA-256 of the 64 KiB at offset 1 MiB of the file that
    /// safetensors.torch.save(tensors, metadata) produces. That file's header is compact JSON padded with spaces to a
    /// multiple of 8 (its key order does not change its length, and so not the legacy hash); tensors are laid out by
    /// name within a dtype.
    public static func hashes(tensors: [String: Tensor], metadata: [String: String]) -> (model: String, legacy: String) {
        let names = tensors.keys.sorted()
        var header = "{"
        var parts: [String] = []
        // kohya always passes a metadata dict, so the header always has __metadata__ (possibly {}).
        let meta = metadata.keys.sorted().map { "\(jsonString($0)):\(jsonString(metadata[$0]!))" }.joined(separator: ",")
        parts.append("\"__metadata__\":{\(meta)}")
        var offset = 0
        for name in names {
            let t = tensors[name]!
            let bytes = t.count * t.dtype.byteSize
            let dt = t.dtype == .f32 ? "F32" : t.dtype == .f16 ? "F16" : "BF16"
            let shape = t.shape.map(String.init).joined(separator: ",")
            parts.append("\(jsonString(name)):{\"dtype\":\"\(dt)\",\"shape\":[\(shape)],\"data_offsets\":[\(offset),\(offset + bytes)]}")
            offset += bytes
        }
        header += parts.joined(separator: ",") + "}"
        var headerBytes = Array(header.utf8)
        while headerBytes.count % 8 != 0 { headerBytes.append(0x20) }
        var file = [UInt8]()
        file.reserveCapacity(8 + headerBytes.count + offset)
        withUnsafeBytes(of: UInt64(headerBytes.count).littleEndian) { file.append(contentsOf: $0) }
        file += headerBytes
        let dataStart = file.count
        for name in names { tensors[name]!.withUnsafeBytes { file.append(contentsOf: $0) } }

        let model = SHA256.hash(data: file[dataStart...]).map { String(format: "%02x", $0) }.joined()
        let lo = min(0x100000, file.count), hi = min(0x110000, file.count)
        let legacy = SHA256.hash(data: file[lo..<hi]).map { String(format: "%02x", $0) }.joined()
        return (model, String(legacy.prefix(8)))
    }

    /// serde_json's string escaping (what safetensors writes): `"` `\` and control characters escaped, `/` and
    /// non-ASCII left as they are.
    static func jsonString(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case "\u{08}": out += "\\b"
            case "\u{0C}": out += "\\f"
            case _ where u.value < 0x20: out += String(format: "\\u%04x", u.value)
            default: out.unicodeScalars.append(u)
            }
        }
        return out + "\""
    }

    // MARK: reading

    /// A kohya-format LoRA file, split into modules: the UNet's (`lora_unet_`) and SDXL's two text encoders'
    /// (`lora_te1_`, `lora_te2_`).
    public struct Contents {
        public let path: String
        public let metadata: [String: String]
        /// kohya module name → (down, up, alpha?).
        public let modules: [String: (down: Tensor, up: Tensor, alpha: Float?)]
        /// The modules of `model`.
        public func modules(of model: LoRAModel) -> [String] {
            modules.keys.filter { LoRAModel.of(moduleName: $0) == model }.sorted()
        }
    }

    public static func read(_ path: String) throws -> Contents {
        let file = try SafeTensorsFile(path: path)
        var down: [String: Tensor] = [:], up: [String: Tensor] = [:], alpha: [String: Float] = [:]
        var unknown: [String] = []
        for key in file.names {
            let parts = key.split(separator: ".", maxSplits: 1).map(String.init)
            let module = parts[0], rest = parts.count > 1 ? parts[1] : ""
            guard LoRAModel.of(moduleName: module) != nil else { unknown.append(key); continue }
            switch rest {
            case "lora_down.weight": down[module] = try file.tensor(key).fp32()
            case "lora_up.weight": up[module] = try file.tensor(key).fp32()
            case "alpha": alpha[module] = try file.tensor(key).fp32().scalars.first
            default: unknown.append(key)
            }
        }
        if !unknown.isEmpty {
            throw LoRANetworkError("\(path): not a kohya-format LoRA (networks.lora): \(unknown.count) tensors such as "
                + unknown.prefix(3).map { "'\($0)'" }.joined(separator: ", ")
                + " are not lora_unet_/lora_te1_/lora_te2_ lora_down/lora_up/alpha tensors (SD 1.x/2.x `lora_te_` files, LyCORIS/LoHa and diffusers-format files are not supported)")
        }
        var modules: [String: (down: Tensor, up: Tensor, alpha: Float?)] = [:]
        for (name, d) in down {
            guard let u = up[name] else { throw LoRANetworkError("\(path): module \(name) has lora_down but no lora_up.weight") }
            modules[name] = (d, u, alpha[name])
        }
        if let orphan = up.keys.first(where: { down[$0] == nil }) {
            throw LoRANetworkError("\(path): module \(orphan) has lora_up but no lora_down.weight")
        }
        return Contents(path: path, metadata: file.metadata, modules: modules)
    }
}

extension LoRANetwork {
    /// The network a LoRA file describes, on `unet` and (when given) the text encoders, for evaluation: each module's
    /// rank from its shapes, its alpha from `.alpha` (the rank when absent, as kohya's create_network_from_weights).
    /// Every module of an adapted model must name a layer of it with matching shapes; a file's text-encoder modules
    /// are left out when no text encoders are given (`contents.modules(of:)` lists them).
    public convenience init(unet: UNet?, textEncoders: (CLIPTextEncoderL, OpenCLIPTextEncoderG)? = nil,
                            contents: LoRAFile.Contents, multiplier: Float = 1) throws {
        var used = Set<String>()
        try self.init(targets: Self.targets(unet: unet, textEncoders: textEncoders), spec: LoRASpec()) { target in
            guard let m = contents.modules[target.name] else { return nil }
            used.insert(target.name)
            let rank = m.down.shape[0]
            return (rank, m.alpha ?? Float(rank))
        }
        var adapted: Set<LoRAModel> = unet == nil ? [] : [.unet]
        if textEncoders != nil { adapted.formUnion([.textEncoder1, .textEncoder2]) }
        let unused = contents.modules.keys.filter { !used.contains($0) && adapted.contains(LoRAModel.of(moduleName: $0)!) }.sorted()
        if !unused.isEmpty {
            throw LoRANetworkError("\(contents.path): \(unused.count) LoRA modules name no adaptable layer of this model: "
                + unused.prefix(4).joined(separator: ", ") + (unused.count > 4 ? ", …" : "")
                + " (a LoRA for another model family or layout?)")
        }
        try load(contents, only: adapted)
        self.multiplier = multiplier
    }

    /// Copies the file's values into this network (strict both ways: same modules, shapes, ranks and alphas).
    /// `only`: the models whose modules are compared (nil: all of the file's).
    public func load(_ contents: LoRAFile.Contents, only: Set<LoRAModel>? = nil) throws {
        let path = contents.path
        let mine = Set(modules.map(\.name))
        let theirs = Set(contents.modules.keys.filter { only?.contains(LoRAModel.of(moduleName: $0)!) ?? true })
        let missing = mine.subtracting(theirs).sorted(), extra = theirs.subtracting(mine).sorted()
        if !missing.isEmpty || !extra.isEmpty {
            var parts: [String] = []
            if !missing.isEmpty { parts.append("\(missing.count) modules of this network are missing from it (\(missing.prefix(3).joined(separator: ", "))\(missing.count > 3 ? ", …" : ""))") }
            if !extra.isEmpty { parts.append("\(extra.count) modules in it are not in this network (\(extra.prefix(3).joined(separator: ", "))\(extra.count > 3 ? ", …" : ""))") }
            throw LoRANetworkError("\(path): does not match the configured network: " + parts.joined(separator: "; ")
                + ". Use the network_dim/conv_dim the file was trained with.")
        }
        for m in modules {
            let f = contents.modules[m.name]!
            guard f.down.shape == m.downShape, f.up.shape == m.upShape else {
                throw LoRANetworkError("\(path): \(m.name) has lora_down \(f.down.shape) / lora_up \(f.up.shape); this network expects \(m.downShape) / \(m.upShape) (rank \(m.rank))")
            }
            let alpha = f.alpha ?? Float(m.rank)
            guard alpha == m.alpha else {
                throw LoRANetworkError("\(path): \(m.name) has alpha \(alpha); this network's is \(m.alpha) (set network_alpha/conv_alpha to the file's)")
            }
            parameters.replaceSubrange(m.downOffset..<m.upOffset, with: f.down.scalars)
            parameters.replaceSubrange(m.upOffset..<m.upOffset + f.up.count, with: f.up.scalars)
        }
    }
}
