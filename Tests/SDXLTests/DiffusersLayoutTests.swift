import Foundation
import SafeTensors
import SDXL
import Tensor
import XCTest

/// Reading a diffusers SDXL folder in the single-file key space (Sources/SDXL/DiffusersLayout.swift).
///
/// The reference is Tests/Fixtures/sdxl/diffusers_keys_sdxl.json, written by make_diffusers_keys.py from
/// diffusers' own single-file converters (single_file_utils.py: convert_ldm_unet_checkpoint,
/// convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint) run on id-valued
/// tensors: canonical key → diffusers key(s) and transform, for the real SDXL layout and for the tiny fixtures.
/// The tiny diffusers folder here is built from those pairs by an inverse written in this file, never from
/// the table under test.
final class DiffusersLayoutTests: XCTestCase {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/sdxl")
    var dir: URL!

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("diffusers-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws { try? FileManager.default.removeItem(at: dir) }

    // MARK: reference pairs

    struct Pair { let canonical: String; let transform: String; let diffusers: [String] }
    struct Reference { var pairs: [DiffusersComponent: [Pair]] = [:]; var dropped: [DiffusersComponent: [String]] = [:] }

    /// Decodes one layout of diffusers_keys_sdxl.json ("n:suffix" = n characters of the previous key in the column).
    static func reference(_ layout: String) throws -> Reference {
        let data = try Data(contentsOf: fixtures.appendingPathComponent("diffusers_keys_sdxl.json"))
        let root = try JSONSerialization.jsonObject(with: data) as! [String: Any]
        let layouts = root["layouts"] as! [String: Any]
        let components = layouts[layout] as! [String: [String: Any]]
        var ref = Reference()
        for (name, body) in components {
            let component = DiffusersComponent(rawValue: name)!
            var previousC = "", previousD = ""
            func decode(_ coded: String, _ previous: inout String) -> String {
                let colon = coded.firstIndex(of: ":")!
                let shared = Int(coded[..<colon])!
                previous = String(previous.prefix(shared)) + coded[coded.index(after: colon)...]
                return previous
            }
            for entry in body["entries"] as! [[Any]] {
                let canonical = decode(entry[0] as! String, &previousC)
                let diffusers = (entry[2] as! [String]).map { decode($0, &previousD) }
                ref.pairs[component, default: []].append(Pair(canonical: canonical, transform: entry[1] as! String, diffusers: diffusers))
            }
            ref.dropped[component] = (body["dropped"] as! [String]).map { decode($0, &previousC) }
        }
        return ref
    }

    static func expectedTransform(_ pair: Pair, part: Int) -> DiffusersTransform {
        switch pair.transform {
        case "=": return .rename
        case "1x1": return .linearToConv1x1
        case "T": return .transpose
        case "cat": return .concatRows(part: part, of: pair.diffusers.count)
        default: fatalError("unknown transform \(pair.transform)")
        }
    }

    /// The table maps every diffusers key diffusers' converters produce (real SDXL layout and tiny fixtures)
    /// back to the single-file key and transform they came from — CLIP-L also without its `text_model.` wrapper
    /// (transformers ≥ 5). Canonical keys the converters drop (bigG logit_scale) are the only ones without a source.
    func testTableMatchesDiffusersConverters() throws {
        for layout in ["sdxl", "tiny"] {
            let ref = try Self.reference(layout)
            XCTAssertEqual(Set(ref.pairs.keys), Set(DiffusersComponent.allCases))
            let shape = DiffusersLayout.Shape(keys: ref.pairs.mapValues { $0.flatMap(\.diffusers) })
            var mapped = 0
            for (component, pairs) in ref.pairs {
                for pair in pairs {
                    for (part, dkey) in pair.diffusers.enumerated() {
                        var names = [dkey]
                        if component == .textEncoder { names.append(String(dkey.dropFirst("text_model.".count))) }
                        for name in names {
                            let got = DiffusersLayout.canonicalKey(for: name, in: component, shape: shape)
                            XCTAssertEqual(got?.key, pair.canonical, "\(layout) \(component.rawValue): \(name)")
                            XCTAssertEqual(got?.transform, Self.expectedTransform(pair, part: part), "\(layout): \(name)")
                            mapped += 1
                        }
                    }
                }
            }
            XCTAssertEqual(ref.dropped.values.flatMap { $0 }, ["conditioner.embedders.1.model.logit_scale"], layout)
            if layout == "sdxl" {
                XCTAssertEqual(shape, DiffusersLayout.Shape(unetResBlocks: 2, unetUpLevelsWithAttention: [0, 1], vaeLevels: 4))
                XCTAssertEqual(ref.pairs[.unet]?.count, 1680)
                XCTAssertGreaterThan(mapped, 2500)
            }
        }
        // A name in no row maps to nothing.
        let shape = DiffusersLayout.Shape(unetResBlocks: 2, unetUpLevelsWithAttention: [0, 1], vaeLevels: 4)
        XCTAssertNil(DiffusersLayout.canonicalKey(for: "class_embedding.linear_1.weight", in: .unet, shape: shape))
        XCTAssertNil(DiffusersLayout.canonicalKey(for: "down_blocks.0.resnets.0.extra.weight", in: .unet, shape: shape))
    }

    // MARK: a tiny diffusers folder, built by the inverse of the reference pairs

    /// The tiny fixtures' canonical tensors (unet_tiny: make_unet.py; vae_tiny: make_vae.py; text_tiny: make_text.py),
    /// the text towers rounded to `textDType`.
    static func canonicalTensors(textDType: DType) throws -> [String: Tensor] {
        var all: [String: Tensor] = [:]
        for name in ["unet_tiny", "vae_tiny", "text_tiny"] {
            let file = try SafeTensorsFile(path: fixtures.appendingPathComponent("\(name).safetensors").path)
            for key in file.names where file.entries[key]!.dtype.hasPrefix("F") || file.entries[key]!.dtype == "BF16" {
                let t = try file.tensor(key)
                all[key] = name == "text_tiny" ? t.converted(to: textDType) : t
            }
        }
        return all
    }

    /// canonical → diffusers tensors per component, from the reference pairs: the inverse of each transform.
    static func diffusersTensors(_ canonical: [String: Tensor], _ ref: Reference) -> [DiffusersComponent: [String: Tensor]] {
        var out: [DiffusersComponent: [String: Tensor]] = [:]
        for (component, pairs) in ref.pairs {
            for pair in pairs {
                let t = canonical[pair.canonical]!
                switch pair.transform {
                case "=": out[component, default: [:]][pair.diffusers[0]] = t
                case "1x1": out[component, default: [:]][pair.diffusers[0]] = t.reshaped([t.shape[0], t.shape[1]])
                case "T": out[component, default: [:]][pair.diffusers[0]] = ShapeOps.permute(t, [1, 0]).converted(to: t.dtype)
                case "cat":
                    let rows = t.shape[0] / pair.diffusers.count
                    for (i, dkey) in pair.diffusers.enumerated() {
                        out[component, default: [:]][dkey] = ShapeOps.slice(t, axis: 0, start: i * rows, length: rows).converted(to: t.dtype)
                    }
                default: fatalError(pair.transform)
                }
            }
        }
        return out
    }

    /// Writes the folder: unet plain + config.json (head size 8 = widths 8/16/32 over 1/2/4 heads, 4 groups),
    /// vae as the fp16 variant name, text_encoder in transformers-5 names (no `text_model.`), text_encoder_2
    /// sharded in two with an index.
    func writeFolder(_ tensors: [DiffusersComponent: [String: Tensor]], at root: URL) throws {
        func folder(_ c: DiffusersComponent) throws -> URL {
            let url = root.appendingPathComponent(c.rawValue)
            try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
            return url
        }
        let unet = try folder(.unet)
        try writeSafeTensors(tensors[.unet]!, to: unet.appendingPathComponent("diffusion_pytorch_model.safetensors").path)
        let config: [String: Any] = ["_class_name": "UNet2DConditionModel", "block_out_channels": [8, 16, 32], "attention_head_dim": [1, 2, 4],
                                     "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                                     "norm_num_groups": 4, "num_attention_heads": NSNull(), "layers_per_block": 2]
        try JSONSerialization.data(withJSONObject: config).write(to: unet.appendingPathComponent("config.json"))
        try writeSafeTensors(tensors[.vae]!, to: try folder(.vae).appendingPathComponent("diffusion_pytorch_model.fp16.safetensors").path)
        let l = Dictionary(uniqueKeysWithValues: tensors[.textEncoder]!.map { (String($0.key.dropFirst("text_model.".count)), $0.value) })
        try writeSafeTensors(l, to: try folder(.textEncoder).appendingPathComponent("model.safetensors").path)
        let g = try folder(.textEncoder2)
        var shards: [String: [String: Tensor]] = [:], weightMap: [String: String] = [:]
        for (i, (key, t)) in tensors[.textEncoder2]!.sorted(by: { $0.key < $1.key }).enumerated() {
            let shard = "model-0000\(i % 2 + 1)-of-00002.safetensors"
            shards[shard, default: [:]][key] = t
            weightMap[key] = shard
        }
        for (name, part) in shards { try writeSafeTensors(part, to: g.appendingPathComponent(name).path) }
        try JSONSerialization.data(withJSONObject: ["metadata": [:], "weight_map": weightMap])
            .write(to: g.appendingPathComponent("model.safetensors.index.json"))
    }

    static func bytes(_ t: Tensor) -> [UInt8] { t.withUnsafeBytes { Array($0) } }

    /// Every canonical tensor comes back from the folder bit-identical and in its dtype (fp32 UNet, fp16 VAE,
    /// fp32 or bf16 text: the transposed projection and the concatenated q/k/v are byte copies); the folder
    /// answers exactly the fixture keys; configs come from the shapes and unet/config.json; and `eval unet` on
    /// the folder reproduces diffusers' output (unet_io.safetensors, make_unet.py: UNet2DConditionModel(...).sample).
    func testTinyFolderRoundTripIsBitIdentical() throws {
        let ref = try Self.reference("tiny")
        for textDType in [DType.f32, .bf16] {
            let canonical = try Self.canonicalTensors(textDType: textDType)
            let root = dir.appendingPathComponent("folder-\(textDType)")
            try writeFolder(Self.diffusersTensors(canonical, ref), at: root)

            let ckpt = try SDXLCheckpoint(path: root.path)
            let folder = try XCTUnwrap(ckpt.diffusersFolder)
            XCTAssertNil(ckpt.file)
            XCTAssertEqual(ckpt.family, .sdxl(vPrediction: false))
            XCTAssertEqual(folder.files[.vae], ["vae/diffusion_pytorch_model.fp16.safetensors"])
            XCTAssertEqual(folder.files[.textEncoder2]?.count, 2)
            let dropped = Set(ref.dropped.values.flatMap { $0 })
            XCTAssertEqual(Set(folder.keys), Set(canonical.keys).subtracting(dropped))
            XCTAssertEqual(folder.unmappedKeys, [])
            for (key, expected) in canonical where !dropped.contains(key) {
                let got = try XCTUnwrap(try folder.tensor(key, expectedShape: expected.shape), key)
                XCTAssertEqual(got.shape, expected.shape, key)
                XCTAssertEqual(folder.shapes[key], expected.shape, key)
                XCTAssertEqual(got.dtype, expected.dtype, key)
                XCTAssertTrue(Self.bytes(got) == Self.bytes(expected), "\(key) differs")
            }

            XCTAssertEqual(ckpt.unetConfig, UNetConfig.tiny)   // head 8 and 4 groups from unet/config.json
            XCTAssertEqual(ckpt.vaeConfig, VAEConfig.tiny)
            XCTAssertEqual(ckpt.textLConfig?.width, 32)
            XCTAssertEqual(ckpt.textGConfig?.projection, 48)
            _ = try ckpt.vae()
            _ = try ckpt.textEncoders()
        }
        let ckpt = try SDXLCheckpoint(path: dir.appendingPathComponent("folder-f32").path)
        let io = try SafeTensorsFile(path: Self.fixtures.appendingPathComponent("unet_io.safetensors").path)
        let out = try Evaluate.unet(ckpt, inputs: io)["out"]!
        let expected = try io.tensor("output")
        let err = zip(out.scalars, expected.scalars).map { abs($0 - $1) }.max()! / expected.scalars.map(abs).max()!
        XCTAssertLessThan(err, 1e-4, "max |out − diffusers| / max |diffusers|")
    }

    // MARK: strictness

    func folderTensors() throws -> [DiffusersComponent: [String: Tensor]] {
        Self.diffusersTensors(try Self.canonicalTensors(textDType: .f32), try Self.reference("tiny"))
    }

    /// A diffusers key in no row, or one whose canonical name no network binds, fails the strict load, named
    /// both ways; so does a mis-shaped tensor.
    // kohya's --vae file in the layouts it comes in — single-file with and without `first_stage_model.`, diffusers'
    // AutoencoderKL names (the reference pairs' inverse, as diffusers' converter writes them), a diffusers vae/ folder
    // with its config's scaling_factor — reads back the fixture's tensors bit for bit and binds strictly.
    func testVAEFileLayouts() throws {
        let all = try Self.canonicalTensors(textDType: .f32)
        let canonical = all.filter { $0.key.hasPrefix("first_stage_model.") }
        let diffusers = Self.diffusersTensors(all, try Self.reference("tiny"))[.vae]!
        let plain = Dictionary(uniqueKeysWithValues: canonical.map { (String($0.key.dropFirst("first_stage_model.".count)), $0.value) })
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let folder = dir.appendingPathComponent("vae")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        try writeSafeTensors(diffusers, metadata: [:], to: folder.appendingPathComponent("diffusion_pytorch_model.safetensors").path)
        try Data("{\"scaling_factor\": 0.5}".utf8).write(to: folder.appendingPathComponent("config.json"))
        var paths: [String] = []
        for (name, tensors) in [("prefixed", canonical), ("ldm", plain), ("diffusers", diffusers)] {
            let path = dir.appendingPathComponent("\(name).safetensors").path
            try writeSafeTensors(tensors, metadata: [:], to: path)
            paths.append(path)
        }
        for path in paths + [folder.path] {
            let file = try VAEFile(path: path)
            XCTAssertEqual(Set(file.keys), Set(canonical.keys), path)
            for (key, expected) in canonical {
                let got = try XCTUnwrap(try file.tensor(key, expectedShape: expected.shape), key)
                XCTAssertEqual(got.shape, expected.shape, key)
                XCTAssertTrue(Self.bytes(got) == Self.bytes(expected), "\(path): \(key) differs")
            }
            let vae = try file.vae()
            XCTAssertEqual(vae.config.scalingFactor, path == folder.path ? 0.5 : VAEConfig.sdxl.scalingFactor, path)
        }
        // Not a VAE: named.
        let unet = dir.appendingPathComponent("not-vae.safetensors").path
        try writeSafeTensors(["encoder.down_blocks.0.bogus.weight": Tensor(zeros: [2])], metadata: [:], to: unet)
        XCTAssertThrowsError(try VAEFile(path: unet)) { XCTAssertTrue("\($0)".contains("AutoencoderKL"), "\($0)") }
    }

    func testExtraAndMisshapedKeysAreNamedErrors() throws {
        var tensors = try folderTensors()
        tensors[.unet]!["down_blocks.0.resnets.0.extra_norm.weight"] = Tensor(zeros: [8])
        tensors[.unet]!["down_blocks.1.attentions.0.bogus.weight"] = Tensor(zeros: [16])
        tensors[.vae]!["decoder.mid_block.attentions.0.to_q.weight"] = Tensor(zeros: [64, 63], dtype: .f16)
        let root = dir.appendingPathComponent("extra")
        try writeFolder(tensors, at: root)
        let ckpt = try SDXLCheckpoint(path: root.path)
        XCTAssertEqual(ckpt.diffusersFolder?.unmappedKeys, ["unet/diffusion_pytorch_model.safetensors: down_blocks.0.resnets.0.extra_norm.weight"])
        XCTAssertThrowsError(try ckpt.unet()) {
            let text = "\($0)"
            XCTAssertTrue(text.contains("2 unexpected key(s)"), text)
            XCTAssertTrue(text.contains("unet/diffusion_pytorch_model.safetensors: down_blocks.0.resnets.0.extra_norm.weight"), text)
            XCTAssertTrue(text.contains("model.diffusion_model.input_blocks.4.1.bogus.weight ← unet/diffusion_pytorch_model.safetensors: down_blocks.1.attentions.0.bogus.weight"), text)
        }
        XCTAssertThrowsError(try ckpt.vae()) {
            let text = "\($0)"
            XCTAssertTrue(text.contains("first_stage_model.decoder.mid.attn_1.q.weight ← vae/diffusion_pytorch_model.fp16.safetensors: decoder.mid_block.attentions.0.to_q.weight: model wants [64, 64, 1, 1], file has [64, 63, 1, 1]"), text)
        }
        _ = try ckpt.textEncoders()
    }

    /// A folder without unet weights is refused at open; a missing text encoder or VAE is an error naming its
    /// file when that network is loaded; a fused q/k/v with a part missing names the parts found.
    func testMissingFilesAndPartsAreNamedErrors() throws {
        var tensors = try folderTensors()
        tensors[.textEncoder2]!["text_model.encoder.layers.1.self_attn.k_proj.weight"] = nil
        let root = dir.appendingPathComponent("missing")
        try writeFolder(tensors, at: root)
        let fm = FileManager.default
        try fm.removeItem(at: root.appendingPathComponent("vae"))
        var ckpt = try SDXLCheckpoint(path: root.path)
        XCTAssertThrowsError(try ckpt.vae()) {
            XCTAssertTrue("\($0)".contains("no vae/diffusion_pytorch_model.safetensors"), "\($0)")
        }
        XCTAssertThrowsError(try ckpt.textEncoders()) {
            let text = "\($0)"
            XCTAssertTrue(text.contains("conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"), text)
            XCTAssertTrue(text.contains("text_model.encoder.layers.1.self_attn.q_proj.weight, text_model.encoder.layers.1.self_attn.v_proj.weight"), text)
        }
        for shard in try fm.contentsOfDirectory(atPath: root.appendingPathComponent("text_encoder_2").path) {
            try fm.removeItem(at: root.appendingPathComponent("text_encoder_2/\(shard)"))
        }
        ckpt = try SDXLCheckpoint(path: root.path)
        XCTAssertThrowsError(try ckpt.textEncoders()) {
            XCTAssertTrue("\($0)".contains("no text_encoder_2/model.safetensors"), "\($0)")
        }
        try fm.removeItem(at: root.appendingPathComponent("unet/diffusion_pytorch_model.safetensors"))
        XCTAssertThrowsError(try SDXLCheckpoint(path: root.path)) {
            XCTAssertTrue("\($0)".contains("no unet/diffusion_pytorch_model.safetensors"), "\($0)")
        }
        // Two names for one tensor (transformers 4 and 5 spellings side by side) are ambiguous.
        let dup = dir.appendingPathComponent("dup")
        try writeFolder(try folderTensors(), at: dup)
        let lPath = dup.appendingPathComponent("text_encoder/model.safetensors").path
        let l = try SafeTensorsFile(path: lPath)
        var lTensors = try Dictionary(uniqueKeysWithValues: l.names.map { ($0, try l.tensor($0)) })
        lTensors["text_model.final_layer_norm.bias"] = lTensors["final_layer_norm.bias"]
        try writeSafeTensors(lTensors, to: lPath)
        XCTAssertThrowsError(try SDXLCheckpoint(path: dup.path)) {
            XCTAssertTrue("\($0)".contains("final_layer_norm.bias and text_model.final_layer_norm.bias"), "\($0)")
        }
    }
}
