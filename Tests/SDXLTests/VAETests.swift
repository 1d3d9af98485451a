import Foundation
import SafeTensors
import SDXL
import Tensor
import XCTest

/// The SDXL VAE against diffusers' AutoencoderKL. Every fixture here is written by
/// Tests/Fixtures/sdxl/make_vae.py (diffusers AutoencoderKL, float64 reference, LDM keys checked against
/// diffusers' convert_ldm_vae_checkpoint).
final class VAETests: XCTestCase {
    static let fixtures = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/sdxl")

    static func fixture(_ name: String) throws -> SafeTensorsFile {
        try SafeTensorsFile(path: fixtures.appendingPathComponent(name).path)
    }

    /// Relative error of a whole tensor: max|a − e| / max|e| (the worst element against the tensor's
    /// scale, so elements near zero do not dominate).
    static func relativeError(_ actual: Tensor, _ expected: Tensor) -> Float {
        let a = actual.scalars, e = expected.scalars
        var diff: Float = 0, scale: Float = 0
        for i in e.indices {
            let d = abs(a[i] - e[i])
            diff = d.isNaN ? .infinity : max(diff, d)
            scale = max(scale, abs(e[i]))
        }
        return diff / max(scale, .leastNormalMagnitude)
    }

    func assertRelativelyClose(_ actual: Tensor, _ expected: Tensor, _ tolerance: Float, _ what: String,
                               file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(actual.shape, expected.shape, "\(what): shape", file: file, line: line)
        guard actual.shape == expected.shape else { return }
        let error = Self.relativeError(actual, expected)
        XCTAssertLessThanOrEqual(error, tolerance, "\(what): max|Δ|/max|expected| = \(error)", file: file, line: line)
    }

    /// Strictly loads vae_tiny.safetensors (fp16 weights, widened per op) as VAEConfig.tiny.
    func loadTiny() throws -> VAE {
        let binder = WeightBinder(try Self.fixture("vae_tiny.safetensors"))
        let vae = VAE(binder.scope("first_stage_model"), config: .tiny)
        try binder.finish(checkingUnusedUnder: ["first_stage_model."])
        return vae
    }

    // make_vae.py: posterior = vae.encode(image).latent_dist → mean, logvar; grad_image = d sum(mean·g_mean)/d image.
    func testEncoderMatchesDiffusers() throws {
        let vae = try loadTiny()
        let io = try Self.fixture("vae_io.safetensors")
        let tape = Tape()
        let image = Var(try io.tensor("image"), requiresGrad: true)
        let (mean, logvar) = vae.encode(tape, image)
        assertRelativelyClose(mean.value, try io.tensor("mean"), 1e-4, "encoder mean")
        assertRelativelyClose(logvar.value, try io.tensor("logvar"), 1e-4, "encoder logvar")
        let grads = tape.backward(from: mean, seed: try io.tensor("g_mean"))
        let gradImage = try XCTUnwrap(grads[image], "no gradient reached the image")
        assertRelativelyClose(gradImage, try io.tensor("grad_image"), 1e-3, "d(mean·g)/d image")
    }

    // make_vae.py: decoded = vae.decode(latent).sample; grad_latent = d sum(decoded·g_decoded)/d latent.
    func testDecoderMatchesDiffusers() throws {
        let vae = try loadTiny()
        let io = try Self.fixture("vae_io.safetensors")
        let tape = Tape()
        let latent = Var(try io.tensor("latent"), requiresGrad: true)
        let decoded = vae.decode(tape, latent)
        assertRelativelyClose(decoded.value, try io.tensor("decoded"), 1e-4, "decoder output")
        let grads = tape.backward(from: decoded, seed: try io.tensor("g_decoded"))
        let gradLatent = try XCTUnwrap(grads[latent], "no gradient reached the latent")
        assertRelativelyClose(gradLatent, try io.tensor("grad_latent"), 1e-3, "d(decoded·g)/d latent")
    }

    // make_vae.py: with quant_conv.bias = clamp.quant_conv.bias (logvar channels 0-2 pushed out of
    // [-30, 20]), clamp.logvar = latent_dist.logvar and clamp.grad_image = d sum(logvar·g_mean)/d image:
    // clamped channels pass no gradient.
    func testLogvarIsClampedLikeDiagonalGaussianDistribution() throws {
        let file = try Self.fixture("vae_tiny.safetensors")
        let io = try Self.fixture("vae_io.safetensors")
        var tensors = Dictionary(uniqueKeysWithValues: try file.names.map { ($0, try file.tensor($0)) })
        tensors["first_stage_model.quant_conv.bias"] = try io.tensor("clamp.quant_conv.bias")
        let binder = WeightBinder(TensorDictionary(tensors))
        let vae = VAE(binder.scope("first_stage_model"), config: .tiny)
        try binder.finish(checkingUnusedUnder: ["first_stage_model."])
        let tape = Tape()
        let image = Var(try io.tensor("image"), requiresGrad: true)
        let logvar = vae.encode(tape, image).logvar
        assertRelativelyClose(logvar.value, try io.tensor("clamp.logvar"), 1e-4, "clamped logvar")
        let grads = tape.backward(from: logvar, seed: try io.tensor("g_mean"))
        assertRelativelyClose(try XCTUnwrap(grads[image]), try io.tensor("clamp.grad_image"), 1e-3, "d(clamped logvar·g)/d image")
    }

    // make_vae.py writes vae_tiny.safetensors from diffusers AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1).
    func testConfigInferredFromTinyFileShapes() throws {
        XCTAssertEqual(try VAEConfig.infer(shapes: try Self.fixture("vae_tiny.safetensors").shapes), .tiny)
        XCTAssertThrowsError(try VAEConfig.infer(shapes: ["first_stage_model.encoder.conv_in.weight": [32, 3, 3, 3]])) { error in
            XCTAssertTrue("\(error)".contains("first_stage_model.encoder.down.0.block.0.conv1.weight"), "\(error)")
        }
    }

    // make_vae.py write_sdxl_shapes(): the LDM keys and shapes of diffusers' SDXL VAE config (built on
    // the meta device, checked with convert_ldm_vae_checkpoint). VAEConfig.sdxl must bind exactly these
    // (strictly, both ways), and inference from them must give .sdxl.
    func testSDXLConfigBindsExactlyTheSDXLKeySpace() throws {
        let data = try Data(contentsOf: Self.fixtures.appendingPathComponent("vae_sdxl_shapes.json"))
        let json = try XCTUnwrap(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let raw = try XCTUnwrap(json["shapes"] as? [String: [NSNumber]])
        let shapes = raw.mapValues { $0.map(\.intValue) }
        XCTAssertEqual((json["scaling_factor"] as? NSNumber)?.floatValue, VAEConfig.sdxl.scalingFactor)
        XCTAssertEqual(try VAEConfig.infer(shapes: shapes), .sdxl)

        let binder = WeightBinder(ShapesOnly(shapes))
        _ = VAE(binder.scope("first_stage_model"), config: .sdxl)
        XCTAssertNoThrow(try binder.finish(checkingUnusedUnder: ["first_stage_model."]))
        XCTAssertEqual(binder.bound.count, shapes.count)
    }

    // vae_tiny.safetensors (make_vae.py) with one key removed and one given diffusers' Linear shape [C, C].
    func testMissingOrMisShapedKeyIsNamed() throws {
        let file = try Self.fixture("vae_tiny.safetensors")
        var tensors = Dictionary(uniqueKeysWithValues: try file.names.map { ($0, try file.tensor($0)) })
        let missing = "first_stage_model.decoder.up.1.upsample.conv.weight"
        let misShaped = "first_stage_model.encoder.mid.attn_1.q.weight"
        XCTAssertNotNil(tensors.removeValue(forKey: missing))
        tensors[misShaped] = try XCTUnwrap(tensors[misShaped]).reshaped([64, 64])
        let binder = WeightBinder(TensorDictionary(tensors, name: "broken_vae.safetensors"))
        _ = VAE(binder.scope("first_stage_model"), config: .tiny)
        XCTAssertThrowsError(try binder.finish(checkingUnusedUnder: ["first_stage_model."])) { error in
            guard let error = error as? WeightLoadError else { return XCTFail("not a WeightLoadError: \(error)") }
            XCTAssertEqual(error.missing, [missing])
            XCTAssertEqual(error.mismatched.map(\.key), [misShaped])
            XCTAssertEqual(error.mismatched.first?.expected, [64, 64, 1, 1])
            XCTAssertTrue(error.unexpected.isEmpty, "\(error.unexpected)")
            XCTAssertTrue("\(error)".contains(missing) && "\(error)".contains(misShaped), "\(error)")
        }
    }
}

/// A checkpoint that has only shapes: every key is a zero fp16 view of one shared buffer.
private struct ShapesOnly: WeightSource {
    let shapes: [String: [Int]]
    let zeros: Storage
    init(_ shapes: [String: [Int]]) {
        self.shapes = shapes
        let bytes = 2 * (shapes.values.map { $0.reduce(1, *) }.max() ?? 1)
        let buffer = ZeroBuffer(bytes)
        zeros = Storage(borrowing: UnsafeRawBufferPointer(start: buffer.pointer, count: bytes), owner: buffer)
    }
    func tensor(_ key: String, expectedShape: [Int]) throws -> Tensor? {
        shapes[key].map { Tensor(shape: $0, dtype: .f16, storage: zeros, byteOffset: 0) }
    }
    var keys: [String] { shapes.keys.sorted() }
    var sourceName: String { "vae_sdxl_shapes.json" }
}

private final class ZeroBuffer {
    let pointer: UnsafeMutableRawPointer
    init(_ bytes: Int) { pointer = calloc(max(bytes, 1), 1)! }
    deinit { free(pointer) }
}
