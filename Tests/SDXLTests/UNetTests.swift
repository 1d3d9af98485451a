import Foundation
import SafeTensors
import SDXL
import Tensor
import XCTest

/// The SDXL UNet against diffusers. Fixtures: Tests/Fixtures/sdxl/make_unet.py —
///   unet_tiny.safetensors   a random diffusers UNet2DConditionModel of SDXL topology (`UNetConfig.tiny`),
///                           converted to LDM keys (the script checks the mapping with diffusers'
///                           convert_ldm_unet_checkpoint);
///   unet_io.safetensors     its inputs, output and the gradients of L = (output · g).sum();
///   unet_sdxl_shapes.json   key → shape of the real SDXL base UNet (diffusers, meta device).
///
/// Error measure (`relativeError`): max|actual − expected| / max|expected| over the whole tensor.
final class UNetTests: XCTestCase {
    static let folder = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Fixtures/sdxl")
    static let prefix = "model.diffusion_model"

    func fixture(_ name: String) throws -> SafeTensorsFile {
        try SafeTensorsFile(path: Self.folder.appendingPathComponent(name).path)
    }

    func loadTiny(from source: WeightSource) throws -> UNet {
        let binder = WeightBinder(source)
        let unet = UNet(binder.scope(Self.prefix), config: .tiny)
        try binder.finish(checkingUnusedUnder: [Self.prefix + "."])
        return unet
    }

    /// Runs the fixture's inputs through `unet`, backpropagates g; returns output and d/dx, d/dcontext, d/dy.
    /// Also returns how many ops the tape recorded (checkpointed blocks record one node each).
    func run(_ unet: UNet, _ io: SafeTensorsFile, checkpointing: Bool)
        throws -> (out: Tensor, grads: [String: Tensor], recorded: Int) {
        let tape = Tape()
        let x = Var(try io.tensor("x"), requiresGrad: true)
        let context = Var(try io.tensor("context"), requiresGrad: true)
        let y = Var(try io.tensor("y"), requiresGrad: true)
        let out = unet(tape, x: x, timesteps: Var(try io.tensor("timesteps")), context: context, y: y,
                       checkpointing: checkpointing)
        let recorded = tape.recordedCount
        let grads = tape.backward(from: out, seed: try io.tensor("g"))
        var result: [String: Tensor] = [:]
        for (name, v) in [("x", x), ("context", context), ("y", y)] { result[name] = grads[v] }
        return (out.value, result, recorded)
    }

    func relativeError(_ a: Tensor, _ e: Tensor) -> Float {
        XCTAssertEqual(a.shape, e.shape)
        let av = a.scalars, ev = e.scalars
        var diff: Float = 0, scale: Float = 0
        for i in 0..<min(av.count, ev.count) {
            diff = max(diff, abs(av[i] - ev[i]).isNaN ? .infinity : abs(av[i] - ev[i]))
            scale = max(scale, abs(ev[i]))
        }
        return diff / scale
    }

    // make_unet.py: model(x, timesteps, encoder_hidden_states=context, added_cond_kwargs=…).sample and
    // torch autograd of (out * g).sum(); y's gradient from the same model fed add_embedding(y).
    func testForwardAndGradientsMatchDiffusers() throws {
        let unet = try loadTiny(from: try fixture("unet_tiny.safetensors"))
        let io = try fixture("unet_io.safetensors")
        let (out, grads, _) = try run(unet, io, checkpointing: false)
        let outErr = relativeError(out, try io.tensor("output"))
        XCTAssertLessThan(outErr, 1e-4, "output")
        for name in ["x", "context", "y"] {
            let g = try XCTUnwrap(grads[name], "no gradient for \(name)")
            let err = relativeError(g, try io.tensor("grad.\(name)"))
            XCTAssertLessThan(err, 1e-3, "d\(name)")
        }
    }

    // Same fixture: checkpointed blocks recompute their activations in backward; the gradients must be
    // the ones without checkpointing (and diffusers').
    func testCheckpointingGivesTheSameGradients() throws {
        let unet = try loadTiny(from: try fixture("unet_tiny.safetensors"))
        let io = try fixture("unet_io.safetensors")
        let plain = try run(unet, io, checkpointing: false)
        let checkpointed = try run(unet, io, checkpointing: true)
        // The tiny UNet's 17 ResBlocks and 11 SpatialTransformers record one node each instead of dozens.
        XCTAssertLessThan(checkpointed.recorded * 5, plain.recorded, "checkpointing did not shrink the tape")
        XCTAssertLessThan(relativeError(checkpointed.out, plain.out), 1e-6, "output")
        for name in ["x", "context", "y"] {
            let g = try XCTUnwrap(checkpointed.grads[name], "no gradient for \(name) under checkpointing")
            XCTAssertLessThan(relativeError(g, plain.grads[name]!), 1e-6, "d\(name) vs. no checkpointing")
            XCTAssertLessThan(relativeError(g, try io.tensor("grad.\(name)")), 1e-3, "d\(name) vs. diffusers")
        }
    }

    // unet_tiny.safetensors' shapes (and the config make_unet.py records in its metadata) give `.tiny`.
    func testConfigInferredFromFixtureShapesIsTiny() throws {
        let file = try fixture("unet_tiny.safetensors")
        let inferred = try UNetConfig.infer(shapes: file.entries.mapValues(\.shape), headDim: 8, normGroups: 4)
        XCTAssertEqual(inferred, .tiny)

        let meta = try XCTUnwrap(file.metadata["config"])
        let j = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(meta.utf8)) as? [String: Any])
        func int(_ k: String) -> Int { (j[k] as! NSNumber).intValue }
        func ints(_ k: String) -> [Int] { (j[k] as! [NSNumber]).map(\.intValue) }
        let recorded = UNetConfig(
            inChannels: int("inChannels"), outChannels: int("outChannels"), modelChannels: int("modelChannels"),
            channelMult: ints("channelMult"), resBlocksPerLevel: int("resBlocksPerLevel"),
            transformerDepth: ints("transformerDepth"), middleTransformerDepth: int("middleTransformerDepth"),
            contextDim: int("contextDim"), admInChannels: int("admInChannels"), headDim: int("headDim"),
            normGroups: int("normGroups"))
        XCTAssertEqual(recorded, .tiny)
    }

    // unet_sdxl_shapes.json (make_unet.py: the diffusers SDXL base UNet on the meta device, in LDM keys).
    // Building `.sdxl` binds exactly those 1680 keys and shapes; inferring from them gives `.sdxl`.
    // The weights are views of one shared, never-touched zero mapping (`SharedZeroWeights`): binding all
    // 2.6 G parameters costs no memory and no time.
    func testSDXLKeySpaceMatchesDiffusersAndInfersSDXL() throws {
        let data = try Data(contentsOf: Self.folder.appendingPathComponent("unet_sdxl_shapes.json"))
        let json = try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: [NSNumber]])
        let expected = json.mapValues { $0.map(\.intValue) }

        let binder = WeightBinder(SharedZeroWeights(byteCount: 256 << 20))
        let unet = UNet(binder.scope(Self.prefix), config: .sdxl)
        try binder.finish(checkingUnusedUnder: [Self.prefix + "."])
        let built = Dictionary(uniqueKeysWithValues: binder.bound.map { ($0.key, $0.tensor.shape) })
        XCTAssertEqual(Set(built.keys).subtracting(expected.keys).sorted(), [], "keys diffusers' SDXL UNet does not have")
        XCTAssertEqual(Set(expected.keys).subtracting(built.keys).sorted(), [], "SDXL keys the UNet did not bind")
        for (key, shape) in expected where built[key] != nil && built[key] != shape {
            XCTFail("\(key): built \(built[key]!), diffusers \(shape)")
        }
        XCTAssertEqual(unet.inputBlocks.count, 8)
        XCTAssertEqual(unet.outputBlocks.count, 9)

        XCTAssertEqual(try UNetConfig.infer(shapes: expected), .sdxl)
        XCTAssertEqual(try UNetConfig.infer(shapes: built), .sdxl)
        // Keys without the model.diffusion_model. prefix are accepted as well.
        let bare = Dictionary(uniqueKeysWithValues: expected.map { (String($0.key.dropFirst(Self.prefix.count + 1)), $0.value) })
        XCTAssertEqual(try UNetConfig.infer(shapes: bare), .sdxl)
        var noUNet = expected
        noUNet["\(Self.prefix).input_blocks.0.0.weight"] = nil
        XCTAssertThrowsError(try UNetConfig.infer(shapes: noUNet)) { error in
            XCTAssertTrue("\(error)".contains("input_blocks.0.0.weight"), "\(error)")
        }
    }

    // unet_tiny.safetensors with one key deleted, one shape changed and one key added.
    func testWrongFileIsANamedWeightLoadError() throws {
        let file = try fixture("unet_tiny.safetensors")
        var tensors: [String: Tensor] = [:]
        for name in file.names { tensors[name] = try file.tensor(name) }
        let deleted = "\(Self.prefix).input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
        // Level 2 has attention: its upsample is output_blocks.2.2.conv; the .1.conv slot (levels without
        // attention) must not be taken.
        let reshaped = "\(Self.prefix).output_blocks.2.2.conv.weight"
        let extra = "\(Self.prefix).output_blocks.2.1.conv.weight"
        XCTAssertNotNil(tensors.removeValue(forKey: deleted))
        XCTAssertNotNil(tensors[reshaped])
        tensors[reshaped] = Tensor(zeros: [32, 32, 1, 1])
        tensors[extra] = Tensor(zeros: [32, 32, 3, 3])
        XCTAssertThrowsError(try loadTiny(from: TensorDictionary(tensors, name: "broken.safetensors"))) { error in
            guard let e = error as? WeightLoadError else { return XCTFail("not a WeightLoadError: \(error)") }
            XCTAssertEqual(e.missing, [deleted])
            XCTAssertEqual(e.unexpected, [extra])
            XCTAssertEqual(e.mismatched.map(\.key), [reshaped])
            XCTAssertEqual(e.mismatched.first?.expected, [32, 32, 3, 3])
            XCTAssertTrue("\(e)".contains("broken.safetensors") && "\(e)".contains(deleted), "\(e)")
        }
    }
}

