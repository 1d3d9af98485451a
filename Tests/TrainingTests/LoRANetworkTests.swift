import Dataset
import Base
import Foundation
import SafeTensors
import SDXL
import Tensor
@testable import Training
import XCTest

/// Fixtures of this test target.
enum TrainingFixtures {
    static let folder = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../Fixtures/training").standardized
    static let sdxlFolder = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../Fixtures/sdxl").standardized
    static func path(_ name: String) -> String { folder.appendingPathComponent(name).path }
    /// The tiny diffusers-derived UNet of Tests/Fixtures/sdxl (make_unet.py), LDM keys.
    static func tinyUNet() throws -> UNet {
        let file = try SafeTensorsFile(path: sdxlFolder.appendingPathComponent("unet_tiny.safetensors").path)
        let binder = WeightBinder(file)
        let unet = UNet(binder.scope(SDXLCheckpoint.unetPrefix), config: .tiny)
        try binder.finish(checkingUnusedUnder: [SDXLCheckpoint.unetPrefix + "."])
        return unet
    }
    /// `count` drawn 128×128 images (the square shapes of builtin:shapes at 1/8 scale: one bucket) with captions, in `dir`.
    static func squareImages(_ count: Int, in dir: URL) throws -> URL {
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        for k in 0..<count {
            let d = SyntheticShapes.render(index: 5 * k, scale: 0.125)
            let name = String(format: "sq_%02d", k)
            try ImageIO.writePNG(d.image.rgb, width: d.image.width, height: d.image.height, to: dir.appendingPathComponent(name + ".png").path)
            try Data(d.caption.utf8).write(to: dir.appendingPathComponent(name + ".txt"))
        }
        return dir
    }

    static func unetIO() throws -> SafeTensorsFile {
        try SafeTensorsFile(path: sdxlFolder.appendingPathComponent("unet_io.safetensors").path)
    }
}

final class LoRANetworkTests: XCTestCase {
    /// The real SDXL UNet (key space of Tests/Fixtures/sdxl/unet_sdxl_shapes.json, made by make_unet.py from diffusers'
    /// SDXL config), bound to shared zero pages: the module list at full size costs no memory.
    func sdxlUNet() -> UNet {
        let binder = WeightBinder(SharedZeroWeights(byteCount: 256 << 20))
        return UNet(binder.scope(SDXLCheckpoint.unetPrefix), config: .sdxl)
    }

    func sdxlShapes() throws -> [String: [Int]] {
        let data = try Data(contentsOf: TrainingFixtures.sdxlFolder.appendingPathComponent("unet_sdxl_shapes.json"))
        let json = try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: [NSNumber]])
        return json.mapValues { $0.map(\.intValue) }
    }

    // LyCORIS's full-rank convention (network_dim = 100000) under networks.lora is refused by name before the buffer is
    // allocated (it used to trap in an MPI broadcast after the latent cache).
    func testRankTooLargeForMemoryIsRefused() {
        XCTAssertThrowsError(try LoRANetwork(unet: sdxlUNet(), spec: LoRASpec(linearRank: 100_000, linearAlpha: 1), seed: 1)) { error in
            XCTAssertTrue("\(error)".contains("network_dim 100000") && "\(error)".contains("more than this machine's memory"), "\(error)")
        }
    }

    // kohya's count for SDXL (networks/lora.py, Transformer2DModel Linears): 722 UNet modules.
    func testSDXLLinearTargetsAre722KohyaModules() throws {
        let net = try LoRANetwork(unet: sdxlUNet(), spec: LoRASpec(linearRank: 16, linearAlpha: 8), seed: 1)
        XCTAssertEqual(net.modules.count, 722)
        let names = Set(net.modules.map(\.name))
        XCTAssertTrue(names.contains("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"))
        XCTAssertTrue(names.contains("lora_unet_middle_block_1_proj_in"))
        XCTAssertTrue(names.contains("lora_unet_output_blocks_0_1_transformer_blocks_9_ff_net_0_proj"))
        XCTAssertTrue(names.contains("lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_out_0"))
        // Independent of the module tree: the same set from the checkpoint's key list — every 2-D weight under an
        // `.N.1.` SpatialTransformer slot (proj_in/out, to_q/k/v, to_out.0, ff.net.0.proj, ff.net.2).
        let prefix = "model.diffusion_model."
        let fromKeys = Set(try sdxlShapes().compactMap { key, shape -> String? in
            guard shape.count == 2, key.hasSuffix(".weight"), key.contains("transformer_blocks") || key.contains("proj_") else { return nil }
            guard !key.contains(".norm") else { return nil }
            return "lora_unet_" + key.dropFirst(prefix.count).dropLast(".weight".count).replacingOccurrences(of: ".", with: "_")
        })
        XCTAssertEqual(names, fromKeys)
        let q = try XCTUnwrap(net.module(named: "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"))
        XCTAssertEqual(q.downShape, [16, 2048])   // cross-attention keys read the 2048-wide context
        XCTAssertEqual(q.upShape, [640, 16])
        XCTAssertEqual(q.scale, 0.5)
    }

    // LoCon (conv_dim): ResBlock 3×3 convs, Downsample op, Upsample conv at the conv rank; skip_connection (1×1) and
    // emb_layers.1 at the linear rank. Expected list derived from the key list, not the module tree.
    func testSDXLConvTargetsFollowKohyaRules() throws {
        let spec = LoRASpec(linearRank: 16, linearAlpha: 8, convRank: 8, convAlpha: 4)
        let net = try LoRANetwork(unet: sdxlUNet(), spec: spec, seed: 1)
        let conv = net.modules.filter { !$0.name.contains("transformer_blocks") && !$0.name.hasSuffix("proj_in") && !$0.name.hasSuffix("proj_out") }
        let shapes = try sdxlShapes()
        var expected: [String: Int] = [:]   // name → rank
        for (key, shape) in shapes where key.hasSuffix(".weight") {
            let path = String(key.dropFirst("model.diffusion_model.".count).dropLast(".weight".count))
            let name = "lora_unet_" + path.replacingOccurrences(of: ".", with: "_")
            if path.hasSuffix("in_layers.2") || path.hasSuffix("out_layers.3") || path.hasSuffix(".op") || path.hasSuffix(".conv") {
                XCTAssertEqual(shape.count, 4); expected[name] = 8
            } else if path.hasSuffix("skip_connection") || path.hasSuffix("emb_layers.1") {
                expected[name] = 16
            }
        }
        XCTAssertEqual(Dictionary(uniqueKeysWithValues: conv.map { ($0.name, $0.rank) }), expected)
        XCTAssertEqual(net.modules.count, 722 + expected.count)
        let op = try XCTUnwrap(net.module(named: "lora_unet_input_blocks_3_0_op"))
        XCTAssertEqual(op.downShape, [8, 320, 3, 3])
        XCTAssertEqual(op.upShape, [320, 8, 1, 1])
        XCTAssertEqual(op.alpha, 4)
        let skip = try XCTUnwrap(net.module(named: "lora_unet_output_blocks_0_0_skip_connection"))
        XCTAssertEqual(skip.downShape, [16, 2560, 1, 1])
    }

    // kohya init: lora_up zero, lora_down ~ U(±1/√fan_in) (kaiming_uniform_, a = √5).
    func testInitIsKohyas() throws {
        let net = try LoRANetwork(unet: TrainingFixtures.tinyUNet(), spec: LoRASpec(linearRank: 4, linearAlpha: 1, convRank: 2), seed: 7)
        for m in net.modules {
            let down = net.parameters[m.downOffset..<m.upOffset]
            let up = net.parameters[m.upOffset..<m.upOffset + m.upShape.reduce(1, *)]
            XCTAssertTrue(up.allSatisfy { $0 == 0 }, m.name)
            let bound = 1 / Float(m.fanIn).squareRoot()
            XCTAssertTrue(down.allSatisfy { abs($0) <= bound }, m.name)
            XCTAssertGreaterThan(down.map { abs($0) }.max()!, bound * 0.8, m.name)
        }
        let again = try LoRANetwork(unet: TrainingFixtures.tinyUNet(), spec: LoRASpec(linearRank: 4, linearAlpha: 1, convRank: 2), seed: 7)
        XCTAssertEqual(net.parameters, again.parameters)
    }

    /// Runs the tiny UNet on unet_io's inputs, with `adapters` on the tape.
    func runTiny(_ unet: UNet, adapters: LayerAdapters?) throws -> Tensor {
        let io = try TrainingFixtures.unetIO()
        let t = Tape(recording: false, adapters: adapters)
        return unet(t, x: Var(try io.tensor("x")), timesteps: Var(try io.tensor("timesteps")),
                    context: Var(try io.tensor("context")), y: Var(try io.tensor("y"))).value
    }

    // A LoRA on linear layers is a low-rank weight delta: running it must equal running the UNet whose weights are
    // W + scale·up·down (merged here by plain loops, independent of the adapter code path).
    func testLinearLoRAEqualsMergedWeights() throws {
        let unet = try TrainingFixtures.tinyUNet()
        let net = try LoRANetwork(unet: unet, spec: LoRASpec(linearRank: 3, linearAlpha: 2), seed: 3)
        var rng = SplitMix64(seed: 11)
        for i in net.parameters.indices { net.parameters[i] = Float(rng.normal()) * 0.1 }
        net.bind(trainable: false)
        let adapted = try runTiny(unet, adapters: net)

        let file = try SafeTensorsFile(path: TrainingFixtures.sdxlFolder.appendingPathComponent("unet_tiny.safetensors").path)
        var merged: [String: Tensor] = [:]
        for name in file.names { merged[name] = try file.tensor(name).fp32() }
        for m in net.modules {
            guard case .linear(let inF, let outF) = m.kind else { continue }
            let key = m.path + ".weight"
            var w = merged[key]!.scalars
            let r = m.rank
            for o in 0..<outF {
                for i in 0..<inF {
                    var s: Float = 0
                    for k in 0..<r { s += net.parameters[m.upOffset + o * r + k] * net.parameters[m.downOffset + k * inF + i] }
                    w[o * inF + i] += m.scale * s
                }
            }
            merged[key] = Tensor(shape: [outF, inF], w)
        }
        let binder = WeightBinder(TensorDictionary(merged))
        let mergedUNet = UNet(binder.scope(SDXLCheckpoint.unetPrefix), config: .tiny)
        let expected = try runTiny(mergedUNet, adapters: nil)
        let base = try runTiny(unet, adapters: nil)
        let a = adapted.scalars, e = expected.scalars, b = base.scalars
        let diff = zip(a, e).map { abs($0 - $1) }.max()!
        let effect = zip(a, b).map { abs($0 - $1) }.max()!
        XCTAssertLessThan(diff, 1e-4 * max(1, e.map(abs).max()!))
        XCTAssertGreaterThan(effect, 100 * diff, "the LoRA must change the output for this test to mean anything")
    }

    // The fused linear LoRA op (Tape.lowRankLinear) equals kohya's composition org(x) + up(down(x))·scale run as separate
    // ops: output and every LoRA gradient, with and without gradient checkpointing.
    func testFusedLinearEqualsSeparateOps() throws {
        let unet = try TrainingFixtures.tinyUNet()
        let net = try LoRANetwork(unet: unet, spec: LoRASpec(linearRank: 4, linearAlpha: 2, convRank: 2), seed: 5)
        var rng = SplitMix64(seed: 8)
        for i in net.parameters.indices { net.parameters[i] = Float(rng.normal()) * 0.1 }
        let io = try TrainingFixtures.unetIO()
        func run(fused: Bool, checkpointing: Bool) throws -> ([Float], [Float]) {
            net.fused = fused
            net.bind(trainable: true)
            let t = Tape(adapters: net)
            let out = unet(t, x: Var(try io.tensor("x")), timesteps: Var(try io.tensor("timesteps")),
                           context: Var(try io.tensor("context")), y: Var(try io.tensor("y")), checkpointing: checkpointing)
            var buffer = [Float](repeating: 0, count: net.parameterCount)
            let g = try io.tensor("g")
            net.accumulateGradients(t.backward(from: out, seed: g), into: &buffer)
            return (out.value.scalars, buffer)
        }
        let (o1, g1) = try run(fused: false, checkpointing: false)
        for ckpt in [false, true] {
            let (o2, g2) = try run(fused: true, checkpointing: ckpt)
            XCTAssertLessThan(zip(o1, o2).map { abs($0 - $1) }.max()!, 1e-5 * o1.map(abs).max()!)
            XCTAssertLessThan(zip(g1, g2).map { abs($0 - $1) }.max()!, 1e-5 * g1.map(abs).max()!)
        }
    }

    // Zero lora_up (kohya's init) leaves the model unchanged; multiplier 0 too.
    func testZeroUpIsIdentity() throws {
        let unet = try TrainingFixtures.tinyUNet()
        let net = try LoRANetwork(unet: unet, spec: LoRASpec(linearRank: 4, linearAlpha: 4, convRank: 2), seed: 5)
        net.bind(trainable: false)
        XCTAssertEqual(try runTiny(unet, adapters: net).scalars, try runTiny(unet, adapters: nil).scalars)
    }

    // Dropout masks are a function of (seed, module): a checkpointed forward recomputed in backward sees the same
    // masks, so gradients with and without gradient checkpointing agree.
    func testDropoutIsReproducibleUnderCheckpointing() throws {
        let unet = try TrainingFixtures.tinyUNet()
        let spec = LoRASpec(linearRank: 4, linearAlpha: 4, convRank: 2, dropout: 0.2, rankDropout: 0.3, moduleDropout: 0.1)
        let net = try LoRANetwork(unet: unet, spec: spec, seed: 5)
        var rng = SplitMix64(seed: 2)
        for i in net.parameters.indices { net.parameters[i] = Float(rng.normal()) * 0.1 }
        net.training = true
        net.dropoutSeed = 99
        let io = try TrainingFixtures.unetIO()
        func grads(checkpointing: Bool) throws -> [Float] {
            net.bind(trainable: true)
            let t = Tape(adapters: net)
            let out = unet(t, x: Var(try io.tensor("x")), timesteps: Var(try io.tensor("timesteps")),
                           context: Var(try io.tensor("context")), y: Var(try io.tensor("y")), checkpointing: checkpointing)
            var buffer = [Float](repeating: 0, count: net.parameterCount)
            net.accumulateGradients(t.backward(from: out, seed: Tensor(shape: out.shape, [Float](repeating: 1, count: out.value.count))), into: &buffer)
            return buffer
        }
        let plain = try grads(checkpointing: false), ckpt = try grads(checkpointing: true)
        let scale = plain.map(abs).max()!
        XCTAssertGreaterThan(scale, 0)
        XCTAssertLessThan(zip(plain, ckpt).map { abs($0 - $1) }.max()!, 1e-4 * scale)
        net.dropoutSeed = 100
        XCTAssertNotEqual(try grads(checkpointing: false), plain, "another seed draws other masks")
    }
}

final class LoRAFileTests: XCTestCase {
    struct HashCase: Decodable {
        let name: String
        let dtype: String
        let tensors: [String: [Int]]
        let metadata: [String: String]
        let sshs_model_hash: String
        let sshs_legacy_hash: String
    }

    // Tests/Fixtures/training/lora_hashes.json: kohya's precalculate_safetensors_hashes (copied verbatim into
    // make_lora_hashes.py) over safetensors.torch.save of tensors given by a formula both sides compute.
    func testHashesEqualKohyas() throws {
        struct File: Decodable { let cases: [HashCase] }
        let data = try Data(contentsOf: TrainingFixtures.folder.appendingPathComponent("lora_hashes.json"))
        let cases = try JSONDecoder().decode(File.self, from: data).cases
        XCTAssertEqual(cases.count, 4)
        for c in cases {
            let dtype: DType = c.dtype == "f16" ? .f16 : c.dtype == "bf16" ? .bf16 : .f32
            var tensors: [String: Tensor] = [:]
            for (name, shape) in c.tensors {
                if name.hasSuffix(".alpha") {
                    let rank = c.tensors[name.replacingOccurrences(of: ".alpha", with: ".lora_down.weight")]![0]
                    tensors[name] = Tensor(shape: [], [Float(rank) / 2], dtype: dtype)
                } else {
                    let n = shape.reduce(1, *)
                    tensors[name] = Tensor(shape: shape, (0..<n).map { Float(($0 * 7919) % 1000 - 500) / 1024 }, dtype: dtype)
                }
            }
            let (model, legacy) = LoRAFile.hashes(tensors: tensors, metadata: c.metadata.filter { $0.key.hasPrefix("ss_") })
            XCTAssertEqual(model, c.sshs_model_hash, c.name)
            XCTAssertEqual(legacy, c.sshs_legacy_hash, c.name)
        }
    }

    func testSaveReadRoundTripAndStrictLoading() throws {
        let unet = try TrainingFixtures.tinyUNet()
        let spec = LoRASpec(linearRank: 4, linearAlpha: 2, convRank: 2, convAlpha: 1)
        let net = try LoRANetwork(unet: unet, spec: spec, seed: 3)
        var rng = SplitMix64(seed: 4)
        for i in net.parameters.indices { net.parameters[i] = Float(rng.normal()) }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("lora-file-\(getpid())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let path = dir.appendingPathComponent("a.safetensors").path
        let written = try LoRAFile.save(net, to: path, dtype: .f32, metadata: ["ss_network_dim": "4", "modelspec.title": "t"])
        XCTAssertEqual(written["sshs_model_hash"]?.count, 64)
        let file = try SafeTensorsFile(path: path)
        XCTAssertEqual(file.metadata["ss_network_dim"], "4")
        XCTAssertEqual(file.metadata["sshs_legacy_hash"]?.count, 8)
        XCTAssertEqual(file.names.count, net.modules.count * 3)
        XCTAssertEqual(file.shapes["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha"], [])

        let contents = try LoRAFile.read(path)
        let back = try LoRANetwork(unet: unet, spec: spec, seed: 99)
        try back.load(contents)
        XCTAssertEqual(back.parameters, net.parameters)
        let fromFile = try LoRANetwork(unet: unet, contents: contents)
        XCTAssertEqual(fromFile.parameters, net.parameters)
        XCTAssertEqual(fromFile.modules.map(\.alpha), net.modules.map(\.alpha))

        // fp16: values round to half precision.
        let half = dir.appendingPathComponent("h.safetensors").path
        try LoRAFile.save(net, to: half, dtype: .f16, metadata: [:])
        XCTAssertEqual(try SafeTensorsFile(path: half).entries.values.map(\.dtype).allSatisfy { $0 == "F16" }, true)

        // Another rank → a named error; a LoRA without conv modules into a LoCon network → missing modules named.
        let other = try LoRANetwork(unet: unet, spec: LoRASpec(linearRank: 8, linearAlpha: 2, convRank: 2, convAlpha: 1), seed: 1)
        XCTAssertThrowsError(try other.load(contents)) { XCTAssertTrue("\($0)".contains("rank 8"), "\($0)") }
        let linearOnly = try LoRANetwork(unet: unet, spec: LoRASpec(linearRank: 4, linearAlpha: 2), seed: 1)
        XCTAssertThrowsError(try linearOnly.load(contents)) { XCTAssertTrue("\($0)".contains("not in this network"), "\($0)") }
        let alpha = try LoRANetwork(unet: unet, spec: LoRASpec(linearRank: 4, linearAlpha: 3, convRank: 2, convAlpha: 1), seed: 1)
        XCTAssertThrowsError(try alpha.load(contents)) { XCTAssertTrue("\($0)".contains("alpha"), "\($0)") }

        // A file that is not a kohya LoRA.
        let bad = dir.appendingPathComponent("bad.safetensors").path
        try writeSafeTensors(["lora_unet_x.lora_A.weight": Tensor(shape: [1], [0])], to: bad)
        XCTAssertThrowsError(try LoRAFile.read(bad)) { XCTAssertTrue("\($0)".contains("not a kohya-format LoRA"), "\($0)") }
    }
}
