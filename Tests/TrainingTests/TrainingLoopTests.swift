import Dataset
import Distributed
import Foundation
import SafeTensors
import SDXL
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
            .split(separator: "\n").filter { !$0.contains("\"run_start\"") }   // the run's marker line
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
        let images = try TrainingFixtures.squareImages(2, in: work.appendingPathComponent("img"))
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

    // Latents encoded on the bf16 family are cached under their own key (the VAE identity + "/bf16"): a bf16 run after an
    // fp32 one encodes again, a second bf16 run reuses them, and no_half_vae (kohya: VAE in fp32) reuses the fp32 ones.
    func testBF16LatentsAreCachedApartFromFP32() throws {
        if let why = Kernels.bf16UnavailableReason { throw XCTSkip(why) }
        func cacheLine(_ name: String, _ extra: String) throws -> String {
            let (outcomes, lines) = try train(try config(name, batch: 2, steps: 1, extra: extra), ranks: 1)
            XCTAssertEqual(outcomes, [.finished])
            return try XCTUnwrap(lines.first { $0.hasPrefix("latent cache") }, lines.joined(separator: "\n"))
        }
        let fp32 = try cacheLine("fp32", "")
        XCTAssertTrue(fp32.contains(": 0 reused"), fp32)
        let bf16 = try cacheLine("bf16", "mixed_precision = \"bf16\"")
        XCTAssertTrue(bf16.contains(": 0 reused"), bf16)
        let again = try cacheLine("bf16b", "mixed_precision = \"bf16\"")
        XCTAssertTrue(again.contains(", 0 encoded"), again)
        let noHalf = try cacheLine("nohalf", "mixed_precision = \"bf16\"\nno_half_vae = true")
        XCTAssertTrue(noHalf.contains(", 0 encoded"), noHalf)
        XCTAssertEqual(Kernels.family, .fp32, "a run leaves the process's family as it found it")
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

/// The inputs stage's messages: what a new user gets wrong first.
final class RunInputsTests: XCTestCase {
    // A Hugging Face Hub id (kohya downloads it; lora-dist loads local files only) is named as one, with the way out.
    func testHubIDIsNamed() throws {
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("inputs-\(getpid())")
        defer { try? FileManager.default.removeItem(at: work) }
        let cfg = try TrainingConfig.parse(toml: """
            pretrained_model_name_or_path = "stabilityai/stable-diffusion-xl-base-1.0"
            train_data_dir = "builtin:shapes"
            resolution = 128
            output_dir = "\(work.path)"
            """, source: "hub.toml", baseDirectory: work)
        XCTAssertThrowsError(try RunInputs(config: cfg, communicator: LocalGroup(size: 1).communicator(rank: 0))) { error in
            let m = "\(error)"
            XCTAssertTrue(m.contains("looks like a Hugging Face Hub id") && m.contains("huggingface-cli download"), m)
        }
    }
}

/// Lines said by the ranks' threads.
final class LockedLines: @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [String] = []
    func append(_ line: String) { lock.lock(); lines.append(line); lock.unlock() }
    var all: [String] { lock.lock(); defer { lock.unlock() }; return lines }
}

/// The batch stage on a real image file: kohya's SDXL size conditioning.
final class BatchConditioningTests: XCTestCase {
    // An image whose aspect ratio differs from its bucket's (261×1495 → bucket 256×1024 at resolution 512, buckets
    // 256–1024 in steps of 64): the batch's (original size, crop top/left, target size) are kohya's, plain and flipped
    // — BucketManager.get_crop_ltrb, then `target width − crop right` for a flipped image (BaseDataset.__getitem__),
    // as Tests/Fixtures/dataset/make_buckets.py computed them from kohya's code (buckets.json) — not the
    // centre-trim offsets. y carries exactly those numbers.
    func testBatchSizeConditioningIsKohyas() throws {
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("batch-cond-\(getpid())")
        try? FileManager.default.removeItem(at: work)
        defer { try? FileManager.default.removeItem(at: work) }
        let images = work.appendingPathComponent("img")
        try FileManager.default.createDirectory(at: images, withIntermediateDirectories: true)
        let (w, h) = (261, 1495)
        let rgb = (0..<(w * h)).flatMap { i -> [UInt8] in [UInt8(i % 251), UInt8((i / w) % 253), 90] }
        try ImageIO.writePNG(rgb, width: w, height: h, to: images.appendingPathComponent("tall.png").path)
        try Data("a tall image".utf8).write(to: images.appendingPathComponent("tall.txt"))

        // kohya's numbers for this image (buckets.json row [261, 1495, no_upscale 0] of the 512 / 256–1024 / 64 config).
        let golden = try JSONSerialization.jsonObject(with: Data(contentsOf: TrainingFixtures.folder
            .appendingPathComponent("../dataset/buckets.json"))) as! [String: Any]
        let configs = golden["configs"] as! [[String: Any]]
        let entry = try XCTUnwrap(configs.first {
            let c = $0["config"] as! [String: Any]
            return (c["resolution"] as! [Int]) == [512, 512] && c["min"] as! Int == 256 && c["max"] as! Int == 1024 && c["step"] as! Int == 64
        })
        let row = try XCTUnwrap((entry["cases"] as! [[Any]]).first { ($0[0] as! Int) == w && ($0[1] as! Int) == h && ($0[2] as! Int) == 0 })[3] as! [Any]
        let int = { (i: Int) in row[i] as! Int }
        let plain = SDXLSizeConditioning(originalHeight: int(11), originalWidth: int(12), cropTop: int(13), cropLeft: int(14),
                                         targetHeight: int(15), targetWidth: int(16))
        let flipped = SDXLSizeConditioning(originalHeight: int(11), originalWidth: int(12), cropTop: int(17), cropLeft: int(18),
                                           targetHeight: int(15), targetWidth: int(16))
        XCTAssertNotEqual(plain, flipped, "the case must tell flipped from plain")
        // The centre trim (row's crop_top, crop_left: what the trainer used before) differs from kohya's crop here.
        XCTAssertNotEqual([plain.cropTop, plain.cropLeft], [int(5), int(4)], "the case must tell kohya's crop from the trim")

        let cfg = try TrainingConfig.parse(toml: """
            pretrained_model_name_or_path = "builtin:tiny"
            train_data_dir = "\(images.path)"
            caption_extension = ".txt"
            resolution = 512
            enable_bucket = true
            min_bucket_reso = 256
            max_bucket_reso = 1024
            bucket_reso_steps = 64
            flip_aug = true
            network_train_unet_only = true
            max_train_steps = 16
            output_dir = "\(work.appendingPathComponent("out").path)"
            """, source: "cond.toml", baseDirectory: work)
        let stages = try TrainingStages(config: cfg, communicator: LocalGroup(size: 1).communicator(rank: 0), say: { _ in })
        var seen: Set<Bool> = []
        for epoch in 0..<16 where seen.count < 2 {
            let plan = stages.plan.coordinator.plan(epoch: epoch)
            for i in plan.steps.indices {
                let batch = try XCTUnwrap(try stages.batches.batch(plan, stepIndex: i, rank: 0))
                let size = batch.sizes[0]
                XCTAssertTrue(size == plain || size == flipped, "\(size)")
                seen.insert(size == flipped)
                // The step's y from this batch: pooled ⊕ the embeddings of kohya's six numbers (sgm's order).
                let t = Tape(recording: false)
                let pooled = Var(Tensor(randomNormal: [1, 48], seed: 5))
                let want = size == flipped ? flipped : plain
                let expected = Conditioning.y(t, pooled: pooled, originalSize: [(want.originalHeight, want.originalWidth)],
                                              cropTopLeft: [(want.cropTop, want.cropLeft)],
                                              targetSize: [(want.targetHeight, want.targetWidth)], embedDim: 8)
                XCTAssertEqual(batch.y(t, pooled: pooled, embedDim: 8).value.scalars, expected.value.scalars)
            }
        }
        XCTAssertEqual(seen, [false, true], "both the plain and the flipped latent were drawn")
    }
}
