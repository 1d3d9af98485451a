import Dataset
import Distributed
import Foundation
import SafeTensors
import Tensor
@testable import Training
import XCTest

/// The training loop in this process: ranks are threads of a `LocalGroup` (no mpirun), on the built-in tiny model
/// and drawn-shapes dataset.
final class TrainingLoopTests: XCTestCase {
    var work: URL!

    override func setUpWithError() throws {
        work = FileManager.default.temporaryDirectory.appendingPathComponent("loop-\(getpid())-\(name.hashValue)")
        try? FileManager.default.removeItem(at: work)
        try FileManager.default.createDirectory(at: work, withIntermediateDirectories: true)
        Threads.set(1)
    }

    override func tearDownWithError() throws {
        try? FileManager.default.removeItem(at: work)
        Threads.set(ProcessInfo.processInfo.activeProcessorCount)
    }

    /// `images`: a folder, or the built-in drawn shapes.
    func config(_ name: String, batch: Int, steps: Int, images: String = "builtin:shapes", optimizer: String = "AdamW",
                extra: String = "") throws -> TrainingConfig {
        try TrainingConfig.parse(toml: """
            pretrained_model_name_or_path = "builtin:tiny"
            train_data_dir = "\(images)"
            caption_extension = ".txt"
            resolution = 128
            network_module = "networks.lora"
            network_dim = 4
            network_alpha = 2
            optimizer_type = "\(optimizer)"
            learning_rate = 1e-3
            lr_scheduler = "constant"
            train_batch_size = \(batch)
            max_train_steps = \(steps)
            seed = 3
            output_dir = "\(work.appendingPathComponent(name).path)"
            output_name = "t"
            \(extra)
            [lora_dist]
            cache_dir = "\(work.appendingPathComponent("cache").path)"
            parameter_check_every = 1
            """, source: "\(name).toml", baseDirectory: work)
    }

    func train(_ config: TrainingConfig, ranks: Int) throws -> (outcomes: [TrainingOutcome], lines: [String]) {
        let lines = LockedLines()
        let outcomes = try LocalGroup(size: ranks).run { comm in
            try Trainer(config: config, communicator: comm, say: { lines.append($0) }).run()
        }
        return (outcomes, lines.all)
    }

    func tensors(_ path: String) throws -> [String: [Float]] {
        let file = try SafeTensorsFile(path: path)
        return Dictionary(uniqueKeysWithValues: try file.names.map { ($0, try file.tensor($0).fp32().scalars) })
    }

    // One rank, text encoders trained too (kohya's default): the run ends, the file holds the UNet's and both
    // text encoders' modules, the metrics have one line per step with each group's learning rate.
    func testOneRankTrainsAndSaves() throws {
        let cfg = try config("one", batch: 2, steps: 3, extra: "text_encoder_lr = 5e-4")
        let (outcomes, lines) = try train(cfg, ranks: 1)
        XCTAssertEqual(outcomes, [.finished])
        XCTAssertTrue(lines.contains { $0.contains("LoRA: ") && $0.contains("te1 12") && $0.contains("te2 12") }, lines.joined(separator: "\n"))
        let lora = try tensors(work.appendingPathComponent("one/t.safetensors").path)
        XCTAssertEqual(lora.keys.filter { $0.hasPrefix("lora_te1_") }.count, 36)
        XCTAssertTrue(lora.keys.contains { $0.hasPrefix("lora_unet_") })
        let metrics = try String(contentsOf: work.appendingPathComponent("one/t-metrics.jsonl"), encoding: .utf8)
            .split(separator: "\n")
        XCTAssertEqual(metrics.count, 3)
        let last = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(metrics[2].utf8)) as? [String: Any])
        let rates = try XCTUnwrap(last["learning_rates"] as? [String: Double], "\(last)")
        XCTAssertEqual(rates["te1"], 5e-4)
        XCTAssertEqual(rates["unet"], 1e-3)
    }

    // Two thread ranks with batch 1 train what one rank with batch 2 trains, with the text encoders' LoRA: on a
    // one-bucket, two-image dataset every step holds both images, with the same per-sample draws; the ranks' gradient
    // sums meet in the all-reduce and are divided once.
    func testTwoThreadRanksEqualOneRank() throws {
        let images = work.appendingPathComponent("img")
        try FileManager.default.createDirectory(at: images, withIntermediateDirectories: true)
        for k in 0..<2 {
            let d = SyntheticShapes.render(index: 5 * k, scale: 0.125)
            try ImageIO.writePNG(d.image.rgb, width: d.image.width, height: d.image.height,
                                 to: images.appendingPathComponent("sq\(k).png").path)
            try Data(d.caption.utf8).write(to: images.appendingPathComponent("sq\(k).txt"))
        }
        let extra = "text_encoder_lr = 5e-4"
        _ = try train(try config("b2", batch: 2, steps: 3, images: images.path, extra: extra), ranks: 1)
        let (outcomes, _) = try train(try config("np2", batch: 1, steps: 3, images: images.path, extra: extra), ranks: 2)
        XCTAssertEqual(outcomes, [.finished, .finished])
        let a = try tensors(work.appendingPathComponent("b2/t.safetensors").path)
        let b = try tensors(work.appendingPathComponent("np2/t.safetensors").path)
        XCTAssertEqual(Set(a.keys), Set(b.keys))
        var maxDiff: Float = 0, maxAbs: Float = 0
        for (k, va) in a {
            maxDiff = max(maxDiff, zip(va, b[k]!).map { abs($0 - $1) }.max() ?? 0)
            maxAbs = max(maxAbs, va.map(abs).max() ?? 0)
        }
        XCTAssertLessThan(maxDiff, 1e-4 * maxAbs)
    }

    // A setting that only the built network can check (Prodigy allows one learning rate across kohya's groups) is
    // refused before the latent cache is built: nothing is encoded.
    func testBadGroupRatesAreRefusedBeforeTheCache() throws {
        let cfg = try config("bad", batch: 1, steps: 2, optimizer: "Prodigy", extra: "text_encoder_lr = 0.5")
        XCTAssertThrowsError(try train(cfg, ranks: 1)) { error in
            XCTAssertTrue("\(error)".contains("Prodigy: group 'unet' has learning rate 0.001 but the largest is 0.5"), "\(error)")
        }
        let latents = work.appendingPathComponent("cache/latents")
        XCTAssertEqual((try? FileManager.default.contentsOfDirectory(atPath: latents.path))?.count ?? 0, 0)
    }
}

/// Lines said by the ranks' threads.
final class LockedLines: @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [String] = []
    func append(_ line: String) { lock.lock(); lines.append(line); lock.unlock() }
    var all: [String] { lock.lock(); defer { lock.unlock() }; return lines }
}
