import Foundation
import SDXL
import Tensor
import XCTest
@testable import Training

/// kohya's sample-prompt syntax against kohya's own code. Fixture: Tests/Fixtures/sampling/kohya_prompts.json, made by
/// Tests/Fixtures/sampling/make_kohya_prompts.py, which runs sd-scripts 48d368fa's line_to_prompt_dict, load_prompts
/// (on the real files in Tests/Fixtures/sampling/prompt_files, see SOURCES.md there) and TokenizeStrategy's weighted
/// tokenisation (parse_prompt_attention inside it).
final class SamplePromptTests: XCTestCase {
    static let folder = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../Fixtures/sampling").standardized
    static let fixture: [String: Any] = {
        let data = try! Data(contentsOf: folder.appendingPathComponent("kohya_prompts.json"))
        return try! JSONSerialization.jsonObject(with: data) as! [String: Any]
    }()

    func testAttentionSyntaxEqualsKohya() throws {
        let cases = Self.fixture["attention"] as! [[Any]]
        XCTAssertGreaterThan(cases.count, 30)
        for c in cases {
            let text = c[0] as! String
            if let expected = c[1] as? [[Any]] {
                let pieces = try PromptAttention.parse(text)
                XCTAssertEqual(pieces.map(\.text), expected.map { $0[0] as! String }, "\(text)")
                // kohya keeps the weights as a float32 tensor.
                XCTAssertEqual(pieces.map { Float($0.weight) }, expected.map { Float(($0[1] as! NSNumber).doubleValue) }, "\(text)")
            } else {
                XCTAssertThrowsError(try PromptAttention.parse(text), "\(text): kohya raises ValueError") {
                    XCTAssertTrue("\($0)".contains("is not a number"), "\($0)")
                }
            }
        }
    }

    /// The keys lora-dist reads, from kohya's prompt dict (guidance_scale, cfg_trunc_ratio … are for other models).
    func check(_ p: SamplePrompt, _ d: [String: Any], _ what: String) {
        XCTAssertEqual(p.prompt, d["prompt"] as? String ?? "", what)
        XCTAssertEqual(p.negativePrompt, d["negative_prompt"] as? String, what)
        XCTAssertEqual(p.width, (d["width"] as? NSNumber)?.intValue, what)
        XCTAssertEqual(p.height, (d["height"] as? NSNumber)?.intValue, what)
        XCTAssertEqual(p.seed, (d["seed"] as? NSNumber)?.uint64Value, what)
        XCTAssertEqual(p.steps, (d["sample_steps"] as? NSNumber)?.intValue, what)
        XCTAssertEqual(p.scale, (d["scale"] as? NSNumber).map { Float($0.doubleValue) }, what)
        XCTAssertEqual(p.sampler, d["sample_sampler"] as? String, what)
        XCTAssertEqual(p.controlnetImage, d["controlnet_image"] as? String, what)
        if let e = d["enum"] as? NSNumber { XCTAssertEqual(p.index, e.intValue, what) }
    }

    func testLinesEqualKohya() {
        let cases = Self.fixture["lines"] as! [[Any]]
        XCTAssertGreaterThan(cases.count, 30)
        for c in cases { check(SamplePrompt.parseLine(c[0] as! String), c[1] as! [String: Any], "line \(c[0])") }
    }

    func testRealPromptFilesLoadAsKohyaLoadsThem() throws {
        let files = Self.fixture["files"] as! [String: Any]
        XCTAssertEqual(files.count, 15)
        for (name, expected) in files.sorted(by: { $0.key < $1.key }) {
            let url = Self.folder.appendingPathComponent("prompt_files").appendingPathComponent(name)
            guard let list = expected as? [[String: Any]] else { XCTFail("\(name): kohya failed: \(expected)"); continue }
            let prompts = try SamplePrompt.load(url)
            XCTAssertEqual(prompts.count, list.count, name)
            for (p, d) in zip(prompts, list) { check(p, d, "\(name) #\(p.index)") }
        }
    }

    func testWeightedTokensEqualKohya() throws {
        let tokenizers = (try CLIPTokenizer.bundled(padding: .endOfText), try CLIPTokenizer.bundled(padding: .zero))
        let rows = Self.fixture["weighted"] as! [[Any]]
        XCTAssertEqual(rows.count, 30)
        for row in rows {
            let text = row[0] as! String
            let windows = ((row[1] as? NSNumber)?.intValue ?? 75) / 75
            for (k, tokenizer) in [tokenizers.0, tokenizers.1].enumerated() {
                let expectedIDs = (row[2 + 2 * k] as! [[NSNumber]]).map { $0.map(\.intValue) }
                let expectedWeights = (row[3 + 2 * k] as! [[NSNumber]]).map { $0.map(\.floatValue) }
                let w = try PromptEncoding.weighted(text, tokenizer, windows: windows)
                XCTAssertEqual(tokenizer.chunks(ids: w.ids), expectedIDs, "\(text.prefix(40)) (\(windows) windows, tokenizer \(k + 1))")
                // kohya's chunked weights: per window [1, the window's 75 token weights, 1].
                let chunked = windows == 1 ? [w.weights] : (0..<windows).map { b in [Float(1)] + Array(w.weights[(1 + 75 * b)..<(76 + 75 * b)]) + [1] }
                XCTAssertEqual(chunked.count, expectedWeights.count, text)
                for (a, e) in zip(chunked, expectedWeights) {
                    XCTAssertEqual(a.count, e.count)
                    for (x, y) in zip(a, e) { XCTAssertEqual(x, y, accuracy: 1e-6, "\(text.prefix(40)) weights") }
                }
                XCTAssertEqual(w.truncated, try PromptEncoding.tokens(text, tokenizer).ids.count > 75 * windows)
            }
        }
    }

    func testRequestsFromPrompts() throws {
        let defaults = SamplePromptDefaults.kohya(sampler: try SamplerChoice(kind: .ddim))
        let p = SamplePrompt.parseLine("a cat --w 1000 --h 60 --ss euler_a", index: 3)
        let r = try p.request(defaults: defaults, seed: 9)
        XCTAssertEqual([r.width, r.height, r.steps], [1000, 64, 30])     // 1000 is a multiple of 8; 60 → max(64, 56)
        XCTAssertEqual(r.cfgScale, 7.5)
        XCTAssertEqual(r.sampler, try SamplerChoice(kind: .eulerAncestral))
        XCTAssertEqual(r.seed, 9)
        XCTAssertThrowsError(try SamplePrompt.parseLine("a cat --cn x.png").request(defaults: defaults, seed: 0)) {
            XCTAssertTrue("\($0)".contains("ControlNet"), "\($0)")
        }
        XCTAssertThrowsError(try SamplePrompt.parseLine("a cat --ss heun").request(defaults: defaults, seed: 0)) {
            XCTAssertTrue("\($0)".contains("heun"), "\($0)")
        }
        let list = [SamplePrompt(prompt: "a", seed: 100), SamplePrompt(prompt: "b")]
        XCTAssertEqual(try SamplePrompt.requests(list, defaults: defaults, imagesEach: 2, firstSeed: 7).map(\.seed), [100, 101, 9, 10])
    }

    func testBadFilesAreNamed() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("prompts-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let cases: [(String, String, String)] = [
            ("p.yaml", "a cat", ".txt, .toml or .json"),
            ("empty.txt", "# only a comment\n\n", "no prompts"),
            ("bad.toml", "[[prompts]]\nprompt = \"a\"\n", "[prompt] table"),
            ("nosub.toml", "[prompt]\nwidth = 512\n", "[[prompt.subset]]"),
            ("bad.json", "{\"prompt\": \"a\"}", "a list"),
            ("badnum.json", "[{\"prompt\": \"a\", \"width\": \"wide\"}]", "width must be a number"),
        ]
        for (name, text, expected) in cases {
            let url = dir.appendingPathComponent(name)
            try text.write(to: url, atomically: true, encoding: .utf8)
            XCTAssertThrowsError(try SamplePrompt.load(url), name) { XCTAssertTrue("\($0)".contains(expected), "\(name): \($0)") }
        }
        // kohya's TOML: defaults in [prompt], one image per [[prompt.subset]]; a subset may override a default here.
        let url = dir.appendingPathComponent("ok.toml")
        try "[prompt]\nwidth = 1024\nscale = 5\n[[prompt.subset]]\nprompt = \"a\"\nwidth = 832\n[[prompt.subset]]\nprompt = \"b\"\n".write(to: url, atomically: true, encoding: .utf8)
        let p = try SamplePrompt.load(url)
        XCTAssertEqual(p.map(\.width), [832, 1024])
        XCTAssertEqual(p.map(\.scale), [5, 5])
    }
}

extension SamplePromptTests {
    /// "a (red:1.5) cat" tokenises piece by piece to the same ids as "a red cat"; its conditioning is that of the plain
    /// prompt with the "red" position (index 2, after BOS and "a") times 1.5 in both encoders' halves, nothing else.
    func testWeightsScaleTheirTokensHiddenStates() throws {
        let binder = WeightBinder(RandomWeights(seed: 3))
        let preset = SDXLPreset.tiny
        let l = CLIPTextEncoderL(binder.scope(CLIPTextEncoderL.keyPrefix), config: preset.textL)
        let g = OpenCLIPTextEncoderG(binder.scope(OpenCLIPTextEncoderG.keyPrefix), config: preset.textG)
        let tokenizers = (try CLIPTokenizer.bundled(padding: .endOfText), try CLIPTokenizer.bundled(padding: .zero))
        for windows in [1, 2] {
            let plain = try PromptEncoding.encode(Tape(recording: false), l: l, g: g, tokenizers: tokenizers, prompts: ["a red cat"], windows: windows)
            let weighted = try PromptEncoding.encode(Tape(recording: false), l: l, g: g, tokenizers: tokenizers, prompts: ["a (red:1.5) cat"], windows: windows)
            XCTAssertEqual(plain.context.shape, [1, 75 * windows + 2, 80])
            XCTAssertEqual(weighted.pooled.scalars, plain.pooled.scalars, "the pooled vector is not weighted")
            let c = 80
            for p in 0..<plain.context.shape[1] {
                for ch in 0..<c {
                    let a = plain.context.scalars[p * c + ch], b = weighted.context.scalars[p * c + ch]
                    XCTAssertEqual(b, p == 2 ? a * 1.5 : a, "position \(p), channel \(ch)")
                }
            }
        }
    }
}

extension SamplePromptTests {
    /// kohya's sample_images_common conditions (train_util.py, see TrainingSampler.due): steps == 0 only with
    /// sample_at_first; the epoch cadence switches the step cadence off; the step cadence samples after steps, never at
    /// an epoch's end.
    func testCadenceIsKohyas() throws {
        func sampler(_ edit: (inout TrainingConfig) -> Void) throws -> TrainingSampler? {
            var c = TrainingConfig()
            c.samplePrompts = "builtin:demo"
            edit(&c)
            return try TrainingSampler.make(config: c, seed: 1, outputDirectory: URL(fileURLWithPath: "/nonexistent")) {
                throw TrainingError("not rendered in this test")
            }
        }
        XCTAssertNil(try sampler { _ in }, "no cadence: no sampling")
        let steps = try XCTUnwrap(try sampler { $0.sampleEveryNSteps = 3 })
        XCTAssertEqual([0, 3, 4, 6].map { steps.due(steps: $0, epoch: nil) }, [false, true, false, true])
        XCTAssertFalse(steps.due(steps: 6, epoch: 2), "the step cadence does not sample at an epoch's end")
        XCTAssertFalse(steps.due(steps: 0, epoch: 0))
        let epochs = try XCTUnwrap(try sampler { $0.sampleEveryNSteps = 3; $0.sampleEveryNEpochs = 2 })
        XCTAssertFalse(epochs.due(steps: 3, epoch: nil), "sample_every_n_epochs switches the step cadence off")
        XCTAssertEqual([1, 2, 3, 4].map { epochs.due(steps: 10 * $0, epoch: $0) }, [false, true, false, true])
        let first = try XCTUnwrap(try sampler { $0.sampleAtFirst = true })
        XCTAssertTrue(first.due(steps: 0, epoch: 0))
        XCTAssertFalse(first.due(steps: 5, epoch: nil))
        // Seeds: --d as given; the others the run's seed plus their index. builtin:demo sets --d 1 and --d 2.
        XCTAssertEqual(first.requests.map(\.seed), [1, 2])
        XCTAssertEqual(first.requests.map { [$0.width, $0.height, $0.steps] }, [[128, 128, 20], [128, 128, 20]])
        XCTAssertThrowsError(try sampler { $0.sampleAtFirst = true; $0.samplePrompts = nil }) {
            XCTAssertTrue("\($0)".contains("sample_prompts"), "\($0)")
        }
    }
}

extension SamplePromptTests {
    /// TensorBoardEvent.image against tensorboard's own protobuf serialisation of the same Event
    /// (Tests/Fixtures/sampling/tfevents_image.json, make_tfevents_image.py).
    func testTensorBoardImageEventIsTensorBoards() throws {
        struct Case: Decodable { let tag: String; let width, height, step: Int; let wall_time: Double; let png_hex, event_hex: String }
        struct File: Decodable { let cases: [Case] }
        func bytes(_ hex: String) -> [UInt8] {
            var out: [UInt8] = []
            var i = hex.startIndex
            while i < hex.endIndex {
                let j = hex.index(i, offsetBy: 2)
                out.append(UInt8(hex[i..<j], radix: 16)!)
                i = j
            }
            return out
        }
        let file = try JSONDecoder().decode(File.self, from: Data(contentsOf: Self.folder.appendingPathComponent("tfevents_image.json")))
        XCTAssertEqual(file.cases.count, 3)
        for c in file.cases {
            XCTAssertEqual(TensorBoardEvent.image(tag: c.tag, png: bytes(c.png_hex), width: c.width, height: c.height, step: c.step,
                                                  wallTime: c.wall_time), bytes(c.event_hex), c.tag)
        }
    }
}
