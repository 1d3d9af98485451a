import Crypto
import Dataset
import Foundation
import SafeTensors
import Tensor
import TestSupport
import XCTest
@testable import Training

/// `lora-dist generate` against diffusers' StableDiffusionXLPipeline. Fixtures: Tests/Fixtures/sampling/pipeline.safetensors
/// and lora_tiny.safetensors, made by Tests/Fixtures/sampling/make_pipeline.py (diffusers 0.42 on the tiny preset
/// checkpoint `make-model --preset tiny --dtype fp32 --seed 5`, regenerated here and checked by its SHA-256).
final class GenerateTests: XCTestCase {
    static let folder = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../Fixtures/sampling").standardized

    struct Case: Decodable {
        let name, sampler, prompt, negative: String
        let width, height, steps, seed: Int
        let cfg: Float
        let lora: Float?
        let given_noise: Bool?
        var prediction: String? = nil
        var zsnr: Bool? = nil
        var spacing: String? = nil
    }

    var work: URL!
    override func setUpWithError() throws {
        work = FileManager.default.temporaryDirectory.appendingPathComponent("generate-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: work, withIntermediateDirectories: true)
    }
    override func tearDownWithError() throws { try? FileManager.default.removeItem(at: work) }

    /// The tiny checkpoint of the fixture, made again (and checked to be the very file the fixture was made from).
    func model(_ fixture: SafeTensorsFile) throws -> String {
        let path = work.appendingPathComponent("tiny5.safetensors").path
        let made = try TestProcesses.run(try TestProcesses.executable("lora-dist"),
                                         ["make-model", "--preset", "tiny", "--dtype", "fp32", "--seed", "5", "--out", path])
        XCTAssertEqual(made.status, 0, made.output)
        let sha = SHA256.hash(data: try Data(contentsOf: URL(fileURLWithPath: path))).map { String(format: "%02x", $0) }.joined()
        XCTAssertEqual(sha, fixture.metadata["model_sha256"], "make-model's tiny preset changed: rerun make_pipeline.py")
        return path
    }

    func generate(_ c: Case, model: String, extra: [String] = [], lora: Bool = true) throws -> (latents: Tensor, png: String, output: String) {
        let out = work.appendingPathComponent(c.name).path
        let latents = work.appendingPathComponent(c.name + ".latents.safetensors").path
        var args = ["generate", "--model", model, "--prompt", c.prompt, "--negative-prompt", c.negative,
                    "--width", "\(c.width)", "--height", "\(c.height)", "--steps", "\(c.steps)", "--cfg", "\(c.cfg)",
                    "--seed", "\(c.seed)", "--sampler", c.sampler, "--precision", "fp32", "--threads", "2",
                    "--latents-out", latents, "--out", out] + extra
        if lora, let m = c.lora { args += ["--lora", Self.folder.appendingPathComponent("lora_tiny.safetensors").path + ":\(m)"] }
        let r = try TestProcesses.run(try TestProcesses.executable("lora-dist"), args)
        XCTAssertEqual(r.status, 0, r.output)
        let png = try FileManager.default.contentsOfDirectory(atPath: out).filter { $0.hasSuffix(".png") }
        XCTAssertEqual(png.count, 1, "\(c.name): \(png)")
        return (try SafeTensorsFile(path: latents).tensor("latents").fp32(), out + "/" + (png.first ?? ""), r.output)
    }

    func testGenerationsEqualDiffusersPipeline() throws {
        let fixture = try SafeTensorsFile(path: Self.folder.appendingPathComponent("pipeline.safetensors").path)
        let cases = try JSONDecoder().decode([Case].self, from: Data(fixture.metadata["cases"]!.utf8))
        XCTAssertEqual(cases.count, 8)
        let model = try model(fixture)
        for c in cases {
            var extra: [String] = []
            if c.given_noise == true {
                let noiseFile = work.appendingPathComponent("noise.safetensors").path
                var tensors = ["noise": try fixture.tensor(c.name + ".noise")]
                if fixture.entries[c.name + ".step_noise"] != nil { tensors["step_noise"] = try fixture.tensor(c.name + ".step_noise") }
                try writeSafeTensors(tensors, metadata: [:], to: noiseFile)
                extra = ["--noise", noiseFile]
            }
            if c.prediction == "v_prediction" { extra.append("--v-prediction") }
            if c.zsnr == true { extra.append("--zero-terminal-snr") }
            if let spacing = c.spacing { extra += ["--timestep-spacing", spacing] }
            let (latents, png, output) = try generate(c, model: model, extra: extra)
            let expected = try fixture.tensor(c.name + ".latents")
            XCTAssertEqual(latents.shape, expected.shape, c.name)
            let scale = expected.scalars.map(abs).max()!
            let worst = zip(latents.scalars, expected.scalars).map { abs($0 - $1) }.max()!
            // fp32 throughout on both sides; the latents are O(10) for a random-weight model: 1e-4 relative.
            XCTAssertLessThanOrEqual(worst, 1e-4 * max(1, scale), "\(c.name): final latents differ by \(worst) (scale \(scale))\n\(output)")
            let image = try ImageIO.load(png, resizeTo: (c.width, c.height), crop: (0, 0, c.width, c.height))
            let parameters = "\(c.prompt)\n" + (c.negative.isEmpty ? "" : "Negative prompt: \(c.negative)\n") + "Steps: \(c.steps), Sampler: "
            let text = try ImageIO.pngText(png, key: "parameters")
            XCTAssertTrue(text?.hasPrefix(parameters) == true && text?.contains(", Seed: \(c.seed), Size: \(c.width)x\(c.height)") == true,
                          "\(c.name): A1111 parameters text chunk: \(text ?? "absent")")
            let pixels = try fixture.tensor(c.name + ".image").scalars
            XCTAssertEqual(image.width * image.height * 3, pixels.count, c.name)
            let worstPixel = zip(image.rgb, pixels).map { abs(Float($0) - $1) }.max() ?? 0
            XCTAssertLessThanOrEqual(worstPixel, 1, "\(c.name): decoded image differs from diffusers' by \(worstPixel) levels")
            if c.lora != nil && c.given_noise != true {
                // The LoRA is what makes the difference: without it the same settings end elsewhere.
                let bare = try generate(Case(name: c.name + "-bare", sampler: c.sampler, prompt: c.prompt, negative: c.negative,
                                             width: c.width, height: c.height, steps: c.steps, seed: c.seed, cfg: c.cfg, lora: nil,
                                             given_noise: nil), model: model, lora: false)
                let moved = zip(bare.latents.scalars, expected.scalars).map { abs($0 - $1) }.max()!
                XCTAssertGreaterThan(moved, 100 * worst, "\(c.name): the LoRA changes nothing measurable")
            }
        }
    }
}

extension GenerateTests {
    // Under mpirun each rank renders whole images (image j on rank j mod N): the same files, bit for bit, as one rank on
    // one thread makes (each rank of np 2 runs one thread here), from a kohya prompts file.
    func testTwoRanksRenderTheSameImagesAsOne() throws {
        let model = work.appendingPathComponent("tiny.safetensors").path
        let made = try TestProcesses.run(try TestProcesses.executable("lora-dist"),
                                         ["make-model", "--preset", "tiny", "--dtype", "fp32", "--seed", "2", "--out", model])
        XCTAssertEqual(made.status, 0, made.output)
        let prompts = work.appendingPathComponent("p.txt")
        try "a (red:1.2) fox --w 64 --h 64 --d 3 --s 3\n# comment\na blue bird --n blurry --w 96 --h 64 --s 2 --ss ddim\na cat --s 2 --ss dpm++_2m\n"
            .write(to: prompts, atomically: true, encoding: .utf8)
        func render(_ name: String, ranks: Int?) throws -> [String: Data] {
            let out = work.appendingPathComponent(name).path
            var args = ["generate", "--model", model, "--prompts", prompts.path, "--seed", "40", "--width", "64", "--height", "64",
                        "--precision", "fp32", "--out", out]
            if ranks == nil { args += ["--threads", "1"] }
            let r = try TestProcesses.run(try TestProcesses.executable("lora-dist"), args, ranks: ranks)
            XCTAssertEqual(r.status, 0, r.output)
            XCTAssertTrue(r.output.contains("done: 3 images in"), r.output)
            var files: [String: Data] = [:]
            for f in try FileManager.default.contentsOfDirectory(atPath: out) { files[f] = try Data(contentsOf: URL(fileURLWithPath: out + "/" + f)) }
            return files
        }
        let one = try render("np1", ranks: nil)
        let two = try render("np2", ranks: 2)
        // --d 3 keeps its seed; the others take --seed 40 plus their position.
        XCTAssertEqual(Set(one.keys), ["00000-3.png", "00001-41.png", "00002-42.png"])
        XCTAssertEqual(one, two)
    }
}
