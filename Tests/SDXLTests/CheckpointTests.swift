import Foundation
import SafeTensors
import SDXL
import Tensor
import XCTest

/// make-model / SDXLCheckpoint / eval, end to end on small files.
final class CheckpointTests: XCTestCase {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/sdxl")
    var dir: URL!

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("ckpt-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws { try? FileManager.default.removeItem(at: dir) }

    func path(_ name: String) -> String { dir.appendingPathComponent(name).path }

    /// A tiny random checkpoint holds exactly the keys its four networks load, and loads back strictly with
    /// the preset's configuration (head size and norm groups from its metadata).
    func testTinyPresetRoundTrip() throws {
        let preset = SDXLPreset.tiny
        try writeSafeTensors(preset.randomWeights(seed: 5, dtype: .f16), metadata: preset.metadata, to: path("tiny.safetensors"))
        let ckpt = try SDXLCheckpoint(path: path("tiny.safetensors"))
        XCTAssertEqual(ckpt.family, .sdxl(vPrediction: false))
        XCTAssertEqual(ckpt.unetConfig, preset.unet)
        XCTAssertEqual(ckpt.vaeConfig, preset.vae)
        XCTAssertEqual(ckpt.textLConfig, preset.textL)
        XCTAssertEqual(ckpt.textGConfig, preset.textG)
        XCTAssertEqual(ckpt.sizeEmbedDim, 8)
        XCTAssertEqual(ckpt.unknownTopLevelKeys, [])
        let unet = try ckpt.unet()
        _ = try ckpt.vae()
        _ = try ckpt.textEncoders()
        let x = Var(Tensor(randomNormal: [1, 4, 8, 8], seed: 1))
        let out = unet(Tape(recording: false), x: x, timesteps: Var(Tensor(shape: [1], [500])),
                       context: Var(Tensor(randomNormal: [1, 77, 80], seed: 2)), y: Var(Tensor(randomNormal: [1, 96], seed: 3)))
        XCTAssertEqual(out.shape, [1, 4, 8, 8])
        XCTAssertTrue(out.value.scalars.allSatisfy(\.isFinite))
        // Same seed, same file contents; another seed, other weights.
        let again = preset.randomWeights(seed: 5, dtype: .f16)
        let key = "model.diffusion_model.out.2.weight"
        XCTAssertEqual(again[key]!.scalars, try ckpt.file.tensor(key).scalars)
        XCTAssertNotEqual(preset.randomWeights(seed: 6, dtype: .f16)[key]!.scalars, again[key]!.scalars)
    }

    /// `eval unet` on the diffusers conformance fixture (Tests/Fixtures/sdxl/make_unet.py: diffusers
    /// UNet2DConditionModel(...)(x, timesteps, context, added_cond_kwargs).sample) reproduces its output.
    func testEvalUNetMatchesDiffusersFixture() throws {
        let ckpt = try SDXLCheckpoint(path: Self.fixtures.appendingPathComponent("unet_tiny.safetensors").path,
                                      headDim: 8, normGroups: 4)
        let io = try SafeTensorsFile(path: Self.fixtures.appendingPathComponent("unet_io.safetensors").path)
        let out = try Evaluate.unet(ckpt, inputs: io)["out"]!
        let expected = try io.tensor("output")
        let scale = expected.scalars.map(abs).max()!
        let err = zip(out.scalars, expected.scalars).map { abs($0 - $1) }.max()! / scale
        XCTAssertLessThan(err, 1e-4, "max |out − diffusers| / max |diffusers|")
    }

    /// `eval vae-encode` / `vae-decode` on the diffusers fixture (make_vae.py: vae.encode(image).latent_dist.mean,
    /// .logvar; vae.decode(latent).sample).
    func testEvalVAEMatchesDiffusersFixture() throws {
        let io = try SafeTensorsFile(path: Self.fixtures.appendingPathComponent("vae_io.safetensors").path)
        // A VAE alone is no SDXL checkpoint: give it a UNet so the file is recognised.
        var tensors = SDXLPreset.tiny.randomWeights(seed: 1, dtype: .f16).filter { $0.key.hasPrefix("model.diffusion_model.") }
        let vae = try SafeTensorsFile(path: Self.fixtures.appendingPathComponent("vae_tiny.safetensors").path)
        for name in vae.names { tensors[name] = try vae.tensor(name) }
        try writeSafeTensors(tensors, metadata: SDXLPreset.tiny.metadata, to: path("unet+vae.safetensors"))
        let ckpt = try SDXLCheckpoint(path: path("unet+vae.safetensors"))
        let enc = try Evaluate.vaeEncode(ckpt, inputs: io)
        try writeSafeTensors(["latents": try io.tensor("latent")], to: path("latents.safetensors"))
        let dec = try Evaluate.vaeDecode(ckpt, inputs: try SafeTensorsFile(path: path("latents.safetensors")))
        for (got, name) in [(enc["mean"]!, "mean"), (enc["logvar"]!, "logvar"), (dec["image"]!, "decoded")] {
            let e = try io.tensor(name).scalars
            let err = zip(got.scalars, e).map { abs($0 - $1) }.max()! / e.map(abs).max()!
            XCTAssertLessThan(err, 1e-4, name)
        }
    }

    func testBadInputsAndFilesAreNamedErrors() throws {
        let preset = SDXLPreset.tiny
        var tensors = preset.randomWeights(seed: 1, dtype: .f16)
        try writeSafeTensors(tensors, metadata: preset.metadata, to: path("tiny.safetensors"))
        let ckpt = try SDXLCheckpoint(path: path("tiny.safetensors"))
        try writeSafeTensors(["x": Tensor(zeros: [1, 4, 8, 8]), "timesteps": Tensor(zeros: [1]),
                              "context": Tensor(zeros: [1, 77, 2048]), "y": Tensor(zeros: [1, 96])], to: path("in.safetensors"))
        XCTAssertThrowsError(try Evaluate.unet(ckpt, inputs: try SafeTensorsFile(path: path("in.safetensors")))) {
            XCTAssertTrue("\($0)".contains("context [1, 77, 2048]") && "\($0)".contains("[1, T, 80]"), "\($0)")
        }
        try writeSafeTensors(["image": Tensor(zeros: [1, 3, 8, 8])], to: path("img.safetensors"))
        XCTAssertThrowsError(try Evaluate.unet(ckpt, inputs: try SafeTensorsFile(path: path("img.safetensors")))) {
            XCTAssertTrue("\($0)".contains("has no tensor 'x'"), "\($0)")
        }
        // A stray key outside the networks is reported; a missing one fails the strict load, by name.
        tensors["some_trainer.step"] = Tensor(zeros: [1])
        tensors["model.diffusion_model.out.2.bias"] = nil
        try writeSafeTensors(tensors, metadata: preset.metadata, to: path("broken.safetensors"))
        let broken = try SDXLCheckpoint(path: path("broken.safetensors"))
        XCTAssertEqual(broken.unknownTopLevelKeys, ["some_trainer.step"])
        XCTAssertThrowsError(try broken.unet()) { XCTAssertTrue("\($0)".contains("model.diffusion_model.out.2.bias"), "\($0)") }
        // Another family is refused by name.
        try writeSafeTensors(["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": Tensor(zeros: [4, 2])],
                             to: path("sd15.safetensors"))
        XCTAssertThrowsError(try SDXLCheckpoint(path: path("sd15.safetensors"))) {
            XCTAssertTrue("\($0)".contains("Stable Diffusion 1.x"), "\($0)")
        }
    }
}
