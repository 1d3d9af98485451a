import Foundation
import Tensor
import XCTest

@testable import Training

/// The 64-bit LCG of Tests/Fixtures/training/make_optim.py (`FixtureRandom`): its values are 24-bit integers
/// scaled by powers of two, exact in Float, so parameters and gradients here equal the script's bit for bit.
struct FixtureRandom {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func nextSigned() -> Float {
        state = state &* 6364136223846793005 &+ 1442695040888963407
        return Float(Double(state >> 40) / Double(1 << 24) * 2 - 1)
    }
    mutating func values(_ n: Int, scale: Float) -> [Float] { (0..<n).map { _ in nextSigned() * scale } }
}

/// Reads Tests/Fixtures/training/optim.json (written by make_optim.py, see its header for the reference
/// libraries and versions).
enum OptimFixture {
    static let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .appendingPathComponent("../Fixtures/training/optim.json")
    nonisolated(unsafe) static let json: [String: Any] = {
        let data = try! Data(contentsOf: url)
        return try! JSONSerialization.jsonObject(with: data) as! [String: Any]
    }()

    struct LayoutSpec {
        let layout: ParameterLayout
        let initScales: [Float]
        let gradScales: [Float]
    }

    static func layout(_ list: [[String: Any]]) -> LayoutSpec {
        var tensors: [(name: String, shape: [Int], group: Int)] = []
        var inits: [Float] = [], grads: [Float] = []
        for e in list {
            tensors.append((e["name"] as! String, e["shape"] as! [Int], e["group"] as! Int))
            inits.append(Float(e["init_scale"] as! Double))
            grads.append(Float(e["grad_scale"] as! Double))
        }
        return LayoutSpec(layout: ParameterLayout(tensors: tensors, groupNames: ["unet", "text_encoder"]),
                          initScales: inits, gradScales: grads)
    }

    /// make_optim.py `make_params`: zero-scale entries still draw their values, then are zeroed.
    static func params(_ spec: LayoutSpec, seed: UInt64) -> [Float] {
        var rng = FixtureRandom(seed: seed)
        var out: [Float] = []
        for (e, entry) in spec.layout.entries.enumerated() {
            let scale = spec.initScales[e]
            let v = rng.values(entry.count, scale: scale > 0 ? scale : 1)
            out += scale > 0 ? v : [Float](repeating: 0, count: entry.count)
        }
        return out
    }

    /// make_optim.py `make_grads`: (direction + noise) * grad_scale, direction fixed across steps.
    static func grads(_ spec: LayoutSpec, seed: UInt64, step: Int) -> [Float] {
        var direction = FixtureRandom(seed: seed * 1000 + 999)
        var noise = FixtureRandom(seed: seed * 1000 + UInt64(step) + 1)
        var out: [Float] = []
        for (e, entry) in spec.layout.entries.enumerated() {
            let d = direction.values(entry.count, scale: 1)
            let n = noise.values(entry.count, scale: 0.5)
            out += zip(d, n).map { ($0 + $1) * spec.gradScales[e] }
        }
        return out
    }

    static func floats(_ any: Any?) -> [Float] { (any as! [Double]).map { Float($0) } }
}

/// Every optimizer against its Python reference (Tests/Fixtures/training/make_optim.py: torch.optim.AdamW,
/// bitsandbytes AdamW8bit CPU, lion_pytorch.Lion, prodigyopt.Prodigy, transformers Adafactor) on a small
/// layout of two groups with different learning rates (a linear pair with a zero-initialised up weight and a
/// conv pair [4, 6, 3, 3] / [8, 4, 1, 1]), 8 steps with a changing lr multiplier.
final class OptimizerTests: XCTestCase {
    let fixture = OptimFixture.json

    /// Relative error per element, with an absolute floor for values that pass near zero.
    func assertClose(_ actual: [Float], _ expected: [Float], rtol: Float, atol: Float, _ what: String,
                     file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(actual.count, expected.count, what, file: file, line: line)
        var worst: (Int, Float) = (-1, 0)
        for i in 0..<min(actual.count, expected.count) {
            let err = abs(actual[i] - expected[i]) / (atol + rtol * abs(expected[i]))
            if err > worst.1 || err.isNaN { worst = (i, err.isNaN ? .infinity : err) }
        }
        if worst.1 > 1 {
            XCTFail("\(what): element \(worst.0) is \(actual[worst.0]), reference \(expected[worst.0]) "
                        + "(rtol \(rtol), atol \(atol))", file: file, line: line)
        }
    }

    func testEveryOptimizerMatchesItsPythonReference() throws {
        let spec = OptimFixture.layout(fixture["layout"] as! [[String: Any]])
        let seed = UInt64(fixture["seed"] as! Int)
        let steps = fixture["steps"] as! Int
        let factors = fixture["lr_factors"] as! [Double]
        for case_ in fixture["cases"] as! [[String: Any]] {
            let type = case_["type"] as! String
            let args = case_["args"] as! [String]
            let groupLRs = case_["group_lrs"] as! [Double]
            let label = "\(type) \(args)"
            let optimizer = try Optimizers.make(type: type, args: args, layout: spec.layout)
            var params = OptimFixture.params(spec, seed: seed)
            let snapshots = case_["params_after"] as! [String: Any]
            for step in 0..<steps {
                let lrs = groupLRs.map { $0 * factors[step] }
                optimizer.step(parameters: &params, gradients: OptimFixture.grads(spec, seed: seed, step: step),
                               learningRates: lrs)
                if let expected = snapshots["\(step + 1)"] {
                    // fp32 updates; reductions (Prodigy's dot products, Adafactor's means) are summed in a
                    // different order than torch, which moves the last bits
                    assertClose(params, OptimFixture.floats(expected), rtol: 1e-5, atol: 1e-7,
                                "\(label) after step \(step + 1)")
                }
            }
            if let d = case_["d"] as? Double, let prodigy = optimizer as? Prodigy {
                XCTAssertEqual(prodigy.d, d, accuracy: 1e-5 * d, "\(label) d")
                XCTAssertEqual(optimizer.effectiveLearningRates([1, 1]), [prodigy.d, prodigy.d])
            }
            if let effective = case_["effective_lrs"] as? [Double] {
                let ours = optimizer.effectiveLearningRates(groupLRs.map { $0 * factors[steps - 1] })
                for (a, b) in zip(ours, effective) { XCTAssertEqual(a, b, accuracy: 1e-5 * b, "\(label) effective lr") }
            }
        }
    }

    // MARK: AdamW8bit

    /// bnb's maps come from torch's fp32 linspace, whose vectorised kernel rounds some points 1 ulp apart
    /// from the scalar formula used here (and differently on AVX2 and AVX512 machines); after averaging
    /// neighbours and scaling, map values agree within 2 ulp (~2.4e-7 relative).
    func testDynamicMapsEqualBitsandbytes() {
        let q = fixture["quantization"] as! [String: Any]
        for (signed, key) in [(true, "signed_map"), (false, "unsigned_map")] {
            let ours = BlockwiseQuantization.dynamicMap(signed: signed), theirs = OptimFixture.floats(q[key])
            XCTAssertEqual(ours.count, 256)
            for (a, b) in zip(ours, theirs) {
                XCTAssertLessThanOrEqual(abs(a - b), 2 * b.ulp, "create_dynamic_map(signed=\(signed)): \(a) vs \(b)")
            }
            XCTAssertEqual(ours, ours.sorted())
        }
    }

    func testBlockwiseQuantizationEqualsBitsandbytesCPU() {
        let q = fixture["quantization"] as! [String: Any]
        let values = OptimFixture.floats(q["values"])
        let signed = BlockwiseQuantization.quantize(values, map: BlockwiseQuantization.dynamicMap(signed: true))
        XCTAssertEqual(signed.codes.map(Int.init), q["signed_codes"] as! [Int], "quantize_blockwise codes (signed)")
        XCTAssertEqual(signed.absmax, OptimFixture.floats(q["signed_absmax"]))
        let back = BlockwiseQuantization.dequantize(codes: signed.codes, absmax: signed.absmax,
                                                    map: BlockwiseQuantization.dynamicMap(signed: true))
        // code[q] · absmax: equal up to the maps' 1-ulp differences
        assertClose(back, OptimFixture.floats(q["signed_dequantized"]), rtol: 2.5e-7, atol: 0, "dequantize_blockwise")
        let unsigned = BlockwiseQuantization.quantize(values.map(abs), map: BlockwiseQuantization.dynamicMap(signed: false))
        XCTAssertEqual(unsigned.codes.map(Int.init), q["unsigned_codes"] as! [Int], "quantize_blockwise codes (unsigned)")
        XCTAssertEqual(unsigned.absmax, OptimFixture.floats(q["unsigned_absmax"]))
    }

    /// A 4480-element entry (8-bit state, 17.5 blocks) next to a 64-element one (fp32 state), 5 steps against
    /// bitsandbytes' CPU AdamW8bit: parameters and the 8-bit moments themselves.
    func testAdamW8bitMatchesBitsandbytesCPU() throws {
        let f = fixture["adamw8bit"] as! [String: Any]
        let spec = OptimFixture.layout(f["layout"] as! [[String: Any]])
        let seed = UInt64(f["seed"] as! Int), steps = f["steps"] as! Int
        let groupLRs = f["group_lrs"] as! [Double]
        let factors = fixture["lr_factors"] as! [Double]
        let optimizer = try Optimizers.make(type: "adamw8bit", args: [], layout: spec.layout) as! AdamW8bit
        var params = OptimFixture.params(spec, seed: seed)
        for step in 0..<steps {
            optimizer.step(parameters: &params, gradients: OptimFixture.grads(spec, seed: seed, step: step),
                           learningRates: groupLRs.map { $0 * factors[step] })
        }
        let expected = OptimFixture.floats((f["params_after"] as! [String: Any])["\(steps)"])
        assertClose(params, expected, rtol: 1e-5, atol: 1e-7, "AdamW8bit after \(steps) steps")
        // moments: codes may differ by one step where fp32 rounding lands a value on a bin edge
        let codes1 = f["state1_codes"] as! [Int], codes2 = f["state2_codes"] as! [Int]
        let exact1 = zip(optimizer.codes1, codes1).filter { Int($0) == $1 }.count
        let exact2 = zip(optimizer.codes2, codes2).filter { Int($0) == $1 }.count
        XCTAssertGreaterThan(Double(exact1) / Double(codes1.count), 0.999, "state1 codes equal to bnb")
        XCTAssertGreaterThan(Double(exact2) / Double(codes2.count), 0.999, "state2 codes equal to bnb")
        XCTAssertLessThanOrEqual(zip(optimizer.codes1, codes1).map { abs(Int($0) - $1) }.max() ?? 0, 1)
        assertClose(optimizer.absmax1, OptimFixture.floats(f["absmax1"]), rtol: 1e-5, atol: 0, "absmax1")
        assertClose(optimizer.absmax2, OptimFixture.floats(f["absmax2"]), rtol: 1e-5, atol: 0, "absmax2")
    }

    /// The 8-bit optimizer tracks fp32 AdamW (same hyper-parameters) on a large entry: after 20 steps the
    /// parameter change differs by < 5% of the change's RMS (bnb's quantisation error of the moments).
    // torch.optim.AdamW's implementation switches (fused, foreach, capturable, differentiable) are AdamW arguments
    // that leave the update unchanged: accepted, and the steps equal AdamW's without them; maximize (another update)
    // is named.
    func testAdamWRuntimeSwitchesAreAcceptedAndChangeNothing() throws {
        let layout = ParameterLayout(entries: [.init(name: "w", shape: [8], offset: 0, group: 0)], groupNames: ["unet"])
        let plain = try Optimizers.make(type: "AdamW", args: [], layout: layout)
        let switched = try Optimizers.make(type: "AdamW", args: ["fused=True", "foreach=False", "capturable=True", "differentiable=False"],
                                           layout: layout)
        var a = (0..<8).map { Float($0) * 0.1 }, b = a
        for step in 0..<3 {
            let g = (0..<8).map { Float(($0 + step) % 5) - 2 }
            plain.step(parameters: &a, gradients: g, learningRates: [1e-2])
            switched.step(parameters: &b, gradients: g, learningRates: [1e-2])
        }
        XCTAssertEqual(a, b)
        XCTAssertThrowsError(try Optimizers.make(type: "AdamW", args: ["maximize=True"], layout: layout)) {
            XCTAssertTrue("\($0)".contains("maximize"), "\($0)")
        }
        let c = try TrainingConfig.parse(toml: "pretrained_model_name_or_path = \"m\"\ntrain_data_dir = \"i\"\nresolution = 512\noptimizer_args = [\"fused=True\"]\n",
                                         source: "t.toml", baseDirectory: URL(fileURLWithPath: NSTemporaryDirectory()))
        XCTAssertTrue(c.notes.contains { $0.hasPrefix("optimizer_args fused:") }, "\(c.notes)")
    }

    func testAdamW8bitTracksFP32AdamW() throws {
        let layout = ParameterLayout(tensors: [("big.lora_down.weight", [32, 320], 0)], groupNames: ["unet"])
        let spec = OptimFixture.LayoutSpec(layout: layout, initScales: [0.125], gradScales: [0.25])
        let eightBit = try Optimizers.make(type: "AdamW8bit", args: [], layout: layout)
        let fp32 = try Optimizers.make(type: "AdamW", args: [], layout: layout)
        let start = OptimFixture.params(spec, seed: 3)
        var a = start, b = start
        for step in 0..<20 {
            let g = OptimFixture.grads(spec, seed: 3, step: step)
            eightBit.step(parameters: &a, gradients: g, learningRates: [1e-3])
            fp32.step(parameters: &b, gradients: g, learningRates: [1e-3])
        }
        var diff = 0.0, change = 0.0
        for i in 0..<a.count {
            diff += Double(a[i] - b[i]) * Double(a[i] - b[i])
            change += Double(b[i] - start[i]) * Double(b[i] - start[i])
        }
        XCTAssertGreaterThan(change, 0)
        XCTAssertLessThan((diff / change).squareRoot(), 0.05, "8-bit vs fp32 AdamW relative deviation")
        XCTAssertNotEqual(a, b, "the 8-bit path must actually quantise")
    }

    // MARK: restore

    /// N steps, save blobs, restore into a fresh optimizer, continue: bitwise equal to an uninterrupted run.
    func testRestoreContinuesBitIdentically() throws {
        let spec = OptimFixture.layout(fixture["layout"] as! [[String: Any]])
        var bigTensors = spec.layout.entries.map { ($0.name, $0.shape, $0.group) }
        bigTensors.append(("lora_unet_big.lora_down.weight", [64, 70], 0))  // 8-bit state for AdamW8bit
        let layout = ParameterLayout(tensors: bigTensors, groupNames: ["unet", "text_encoder"])
        let big = OptimFixture.LayoutSpec(layout: layout, initScales: spec.initScales + [0.125],
                                          gradScales: spec.gradScales + [0.25])
        let configs: [(String, [String])] = [
            ("AdamW", ["amsgrad=True"]), ("AdamW8bit", []), ("Lion", []), ("Prodigy", ["slice_p=2"]),
            ("Prodigy", ["betas=(0.0,0.99)", "weight_decay=0.1", "decouple=False"]),
            ("Adafactor", []), ("Adafactor", ["relative_step=False", "beta1=0.9"]),
        ]
        for (type, args) in configs {
            let lrs = type == "Prodigy" ? [1.0, 1.0] : [1e-3, 5e-4]
            let uninterrupted = try Optimizers.make(type: type, args: args, layout: layout)
            var a = OptimFixture.params(big, seed: 4)
            var b = a
            let first = try Optimizers.make(type: type, args: args, layout: layout)
            for step in 0..<4 {
                let g = OptimFixture.grads(big, seed: 4, step: step)
                uninterrupted.step(parameters: &a, gradients: g, learningRates: lrs)
                first.step(parameters: &b, gradients: g, learningRates: lrs)
            }
            var saved: [String: [UInt8]] = [:]
            for blob in first.stateBlobs() { saved[blob.name] = blob.bytes.withUnsafeBytes { Array($0) } }
            let resumed = try Optimizers.make(type: type, args: args, layout: layout)
            try resumed.restore(saved)
            for step in 4..<8 {
                let g = OptimFixture.grads(big, seed: 4, step: step)
                uninterrupted.step(parameters: &a, gradients: g, learningRates: lrs)
                resumed.step(parameters: &b, gradients: g, learningRates: lrs)
            }
            XCTAssertEqual(a.map(\.bitPattern), b.map(\.bitPattern), "\(type) \(args) resumed run")
            XCTAssertEqual(uninterrupted.effectiveLearningRates(lrs), resumed.effectiveLearningRates(lrs))

            // a missing or mis-sized blob is named
            let someBlob = saved.keys.sorted().first!
            var missing = saved; missing.removeValue(forKey: someBlob)
            XCTAssertThrowsError(try resumed.restore(missing)) {
                XCTAssertTrue("\($0)".contains("'\(someBlob)'") && "\($0)".contains("missing"), "\($0)")
            }
            var short = saved; short[someBlob] = Array(saved[someBlob]!.dropLast())
            XCTAssertThrowsError(try resumed.restore(short)) {
                XCTAssertTrue("\($0)".contains("'\(someBlob)'") && "\($0)".contains("bytes"), "\($0)")
            }
        }
    }

    /// Results do not depend on the engine's thread count.
    func testResultsDoNotDependOnThreadCount() throws {
        let spec = OptimFixture.layout(fixture["layout"] as! [[String: Any]])
        func run(_ type: String, threads: Int) throws -> [Float] {
            let saved = Threads.count
            Threads.set(threads)
            defer { Threads.set(saved) }
            let opt = try Optimizers.make(type: type, args: [], layout: spec.layout)
            var p = OptimFixture.params(spec, seed: 9)
            for step in 0..<3 {
                var g = OptimFixture.grads(spec, seed: 9, step: step)
                _ = GradientClipping.clip(&g, maxNorm: 1)
                opt.step(parameters: &p, gradients: g, learningRates: type == "Prodigy" ? [1, 1] : [1e-3, 1e-4])
            }
            return p
        }
        for type in Optimizers.supported {
            XCTAssertEqual(try run(type, threads: 1).map(\.bitPattern), try run(type, threads: 4).map(\.bitPattern), type)
        }
    }

    // MARK: arguments

    func testArgumentsAndErrors() throws {
        let spec = OptimFixture.layout(fixture["layout"] as! [[String: Any]])
        let layout = spec.layout
        // case-insensitive types, tuples with or without parentheses, Python bools
        let adam = try Optimizers.make(type: "adamw", args: ["betas=0.8,0.9", "weight_decay=0"], layout: layout) as! AdamW
        XCTAssertEqual(adam.beta1, 0.8); XCTAssertEqual(adam.beta2, 0.9); XCTAssertEqual(adam.weightDecay, 0)
        let defaults = try Optimizers.make(type: "AdamW", args: [], layout: layout) as! AdamW
        XCTAssertEqual(defaults.weightDecay, 0.01)  // torch.optim.AdamW's default, which kohya keeps
        let prodigy = try Optimizers.make(type: "PRODIGY", args: ["d_coef=2", "decouple=True", "use_bias_correction=False"],
                                          layout: layout) as! Prodigy
        XCTAssertEqual(prodigy.dCoef, 2); XCTAssertTrue(prodigy.decouple); XCTAssertFalse(prodigy.useBiasCorrection)
        // kohya: warmup_init=True forces relative_step=True
        let ada = try Optimizers.make(type: "Adafactor", args: ["relative_step=False", "warmup_init=True"], layout: layout)
            as! Adafactor
        XCTAssertTrue(ada.relativeStep)
        XCTAssertNil((try Optimizers.make(type: "Adafactor", args: ["beta1=None"], layout: layout) as! Adafactor).beta1)

        func expectError(_ type: String, _ args: [String], mentions: [String], line: UInt = #line) {
            XCTAssertThrowsError(try Optimizers.make(type: type, args: args, layout: layout), line: line) { error in
                for m in mentions { XCTAssertTrue("\(error)".contains(m), "'\(error)' should mention \(m)", line: line) }
            }
        }
        expectError("SGDNesterov", [], mentions: ["SGDNesterov", "AdamW8bit", "Prodigy"])
        expectError("AdamW", ["momentum=0.9"], mentions: ["momentum", "weight_decay", "betas"])
        expectError("Lion", ["betas=0.9"], mentions: ["betas"])
        expectError("AdamW", ["weight_decay"], mentions: ["weight_decay", "key=value"])
        expectError("AdamW", ["eps=abc"], mentions: ["eps", "abc"])
        expectError("Prodigy", ["decouple=maybe"], mentions: ["decouple"])
        expectError("AdamW8bit", ["amsgrad=True"], mentions: ["amsgrad"])
        expectError("Lion", ["decoupled_weight_decay=True", "weight_decay=0.1"], mentions: ["learning_rate"])
        XCTAssertNoThrow(try Optimizers.make(type: "Lion", args: ["decoupled_weight_decay=True", "weight_decay=0.1"],
                                             layout: layout, baseLearningRate: 1e-4))
        // Prodigy refuses different non-zero group lrs, like prodigyopt
        XCTAssertThrowsError(try prodigy.validate(learningRates: [1.0, 0.5])) {
            XCTAssertTrue("\($0)".contains("text_encoder"), "\($0)")
        }
        XCTAssertNoThrow(try prodigy.validate(learningRates: [1.0, 0]))
    }

    func testLayoutValidation() {
        let good = [ParameterLayout.Entry(name: "a", shape: [2, 3], offset: 0, group: 0),
                    ParameterLayout.Entry(name: "b", shape: [3, 2, 1, 1], offset: 6, group: 1)]
        XCTAssertNoThrow(try ParameterLayout.validate(entries: good, groupNames: ["unet", "te"]))
        XCTAssertEqual(ParameterLayout(entries: good, groupNames: ["unet", "te"]).totalCount, 12)
        let gap = [good[0], ParameterLayout.Entry(name: "b", shape: [3, 2], offset: 7, group: 1)]
        XCTAssertThrowsError(try ParameterLayout.validate(entries: gap, groupNames: ["unet", "te"])) {
            XCTAssertTrue("\($0)".contains("'b'") && "\($0)".contains("offset 7"), "\($0)")
        }
        XCTAssertThrowsError(try ParameterLayout.validate(entries: good, groupNames: ["unet"])) {
            XCTAssertTrue("\($0)".contains("group 1"), "\($0)")
        }
    }

    // MARK: clipping

    /// torch.nn.utils.clip_grad_norm_ on the small layout's tensors (make_optim.py "clipping").
    func testClippingMatchesTorch() {
        let spec = OptimFixture.layout(fixture["layout"] as! [[String: Any]])
        for c in fixture["clipping"] as! [[String: Any]] {
            let maxNorm = c["max_norm"] as! Double, scale = Float(c["scale"] as! Double)
            var g = OptimFixture.grads(spec, seed: UInt64(c["seed"] as! Int), step: 0).map { $0 * scale }
            let norm = GradientClipping.clip(&g, maxNorm: maxNorm)
            let expectedNorm = c["norm"] as! Double
            XCTAssertEqual(norm, expectedNorm, accuracy: 1e-6 * expectedNorm, "norm, max_norm \(maxNorm)")
            assertClose(g, OptimFixture.floats(c["clipped"]), rtol: 1e-6, atol: 0, "clipped, max_norm \(maxNorm)")
        }
    }
}
