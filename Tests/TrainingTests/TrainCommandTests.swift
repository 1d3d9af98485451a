import Dataset
import Distributed
import Foundation
import SafeTensors
import Tensor
import TestSupport
@testable import Training
import XCTest

/// `lora-dist train` end to end, as processes (MPI_Init inside the test process would break later mpirun children):
/// the tiny built-in model on a few drawn images. Equivalence of np 2 × batch 1 and np 1 × batch 2, kill -9 and
/// resume ending bit-identical to an uninterrupted run, keep-last rules on disk, and the demo config under mpirun.
final class TrainCommandTests: XCTestCase {
    var work: URL!

    override func setUpWithError() throws {
        work = FileManager.default.temporaryDirectory.appendingPathComponent("train-cmd-\(getpid())-\(name.hashValue)")
        try? FileManager.default.removeItem(at: work)
        try FileManager.default.createDirectory(at: work, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws { try? FileManager.default.removeItem(at: work) }

    /// `lora-dist ARGS` alone (ranks nil) or under `mpirun -np ranks`.
    func run(_ args: [String], ranks: Int? = nil, env extra: [String: String] = [:]) throws -> (status: Int32, output: String) {
        try TestProcesses.run(try TestProcesses.executable("lora-dist"), args, ranks: ranks, environment: extra)
    }

    func squareImages(_ count: Int) throws -> URL { try TrainingFixtures.squareImages(count, in: work.appendingPathComponent("img")) }

    /// A flat kohya training TOML over `images`.
    func config(_ name: String, images: URL, batch: Int, steps: Int, extra: String = "", lora: String = "",
                unetOnly: Bool = true) throws -> String {
        let text = """
            pretrained_model_name_or_path = "builtin:tiny"
            train_data_dir = "\(images.path)"
            caption_extension = ".txt"
            resolution = 128
            network_module = "networks.lora"
            network_dim = 4
            network_alpha = 2
            network_train_unet_only = \(unetOnly)
            optimizer_type = "AdamW"
            learning_rate = 1e-3
            lr_scheduler = "constant"
            train_batch_size = \(batch)
            max_train_steps = \(steps)
            seed = 7
            min_snr_gamma = 5.0
            output_dir = "\(work.appendingPathComponent(name).path)"
            output_name = "t"
            \(extra)
            [lora_dist]
            cache_dir = "\(work.appendingPathComponent("cache").path)"
            parameter_check_every = 1
            \(lora)
            """
        let url = work.appendingPathComponent("\(name).toml")
        try text.write(to: url, atomically: true, encoding: .utf8)
        return url.path
    }

    func loraTensors(_ path: String) throws -> [String: [Float]] {
        let file = try SafeTensorsFile(path: path)
        var out: [String: [Float]] = [:]
        for n in file.names { out[n] = try file.tensor(n).fp32().scalars }
        return out
    }

    // mpirun -np 2 with batch 1 trains on the same samples per step as one rank with batch 2 (a one-bucket, two-image
    // dataset: every step holds both images), with the same per-sample noise: the LoRAs agree to float tolerance
    // (lossless fp32 wire; only summation order differs). parameter_check_every = 1 makes every step check that both
    // ranks hold identical weights (the run fails otherwise).
    func testTwoRanksBatchOneEqualsOneRankBatchTwo() throws {
        let images = try squareImages(2)
        let one = try run(["train", try config("np1", images: images, batch: 2, steps: 4)])
        XCTAssertEqual(one.status, 0, one.output)
        let two = try run(["train", try config("np2", images: images, batch: 1, steps: 4)], ranks: 2)
        XCTAssertEqual(two.status, 0, two.output)
        let a = try loraTensors(work.appendingPathComponent("np1/t.safetensors").path)
        let b = try loraTensors(work.appendingPathComponent("np2/t.safetensors").path)
        XCTAssertEqual(Set(a.keys), Set(b.keys))
        var maxDiff: Float = 0, maxUp: Float = 0, maxAbs: Float = 0
        for (k, va) in a {
            maxDiff = max(maxDiff, zip(va, b[k]!).map { abs($0 - $1) }.max() ?? 0)
            maxAbs = max(maxAbs, va.map(abs).max() ?? 0)
            if k.hasSuffix("lora_up.weight") { maxUp = max(maxUp, va.map(abs).max() ?? 0) }
        }
        XCTAssertGreaterThan(maxUp, 1e-4, "4 AdamW steps at lr 1e-3 must move lora_up away from zero")
        // Float tolerance: the two runs sum the same per-sample gradients in another order (rounding ~1e-7), which
        // Adam's per-element normalisation can magnify where a gradient is near zero (measured up to 1.4e-5 absolute
        // on weights of magnitude ~0.5).
        XCTAssertLessThan(maxDiff, 1e-4 * maxAbs, "np2×b1 vs np1×b2")
    }

    // The overlapped all-reduce (the default across hosts; forced on here, where both ranks share one; tiny buckets:
    // dozens per step) gives the LoRA bit for bit
    // that reducing after backward gives, on 2 ranks with the text encoders trained and gradient accumulation (only the
    // window's last micro-step overlaps); parameter_check_every = 1 checks every step that both ranks agree.
    func testOverlappedReductionEqualsReductionAfterBackward() throws {
        let images = try squareImages(3)
        let extra = "gradient_accumulation_steps = 2\ngradient_checkpointing = true"
        let on = try run(["train", try config("overlap", images: images, batch: 1, steps: 3, extra: extra, lora: "overlap_reduction = true\nbucket_mb = 0.002",
                                             unetOnly: false)], ranks: 2)
        XCTAssertEqual(on.status, 0, on.output)
        XCTAssertTrue(on.output.contains("hidden behind backward"), on.output)
        let off = try run(["train", try config("after", images: images, batch: 1, steps: 3, extra: extra,
                                              lora: "overlap_reduction = false", unetOnly: false)], ranks: 2)
        XCTAssertEqual(off.status, 0, off.output)
        XCTAssertFalse(off.output.contains("hidden behind backward"), off.output)
        let wrong = try run(["train", try config("wrongoverlap", images: images, batch: 1, steps: 1, lora: "overlap_reduction = \"yes\"")])
        XCTAssertNotEqual(wrong.status, 0)
        XCTAssertTrue(wrong.output.contains("overlap_reduction") && wrong.output.contains("\"auto\""), wrong.output)
        let a = try loraTensors(work.appendingPathComponent("overlap/t.safetensors").path)
        let b = try loraTensors(work.appendingPathComponent("after/t.safetensors").path)
        XCTAssertEqual(Set(a.keys), Set(b.keys))
        for (k, v) in a { XCTAssertEqual(v.map(\.bitPattern), b[k]!.map(\.bitPattern), k) }
        // `auto` (the default) times steps 2–3 after backward and 4–5 during it, then keeps the faster, saying so.
        let auto = try run(["train", try config("auto", images: images, batch: 1, steps: 7)], ranks: 2)
        XCTAssertEqual(auto.status, 0, auto.output)
        XCTAssertTrue(auto.output.contains("overlap_reduction auto: ") && auto.output.contains("from here on"), auto.output)
        let short = try run(["train", try config("autoshort", images: images, batch: 1, steps: 3)], ranks: 2)
        XCTAssertEqual(short.status, 0, short.output)
        XCTAssertFalse(short.output.contains("overlap_reduction auto") || short.output.contains("hidden behind backward"), short.output)
        let bad = try run(["train", try config("badbucket", images: images, batch: 1, steps: 1, lora: "bucket_mb = 0")])
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertTrue(bad.output.contains("bucket_mb") && bad.output.contains("> 0"), bad.output)
    }

    // The same with the text encoders' LoRA trained too (kohya's default): te1/te2 modules at their own rates, their
    // gradients all-reduced with the UNet's in the one buffer; np 2 × batch 1 equals np 1 × batch 2.
    func testTextEncoderLoRATwoRanksEqualsOneRank() throws {
        let images = try squareImages(2)
        let extra = "text_encoder_lr = [5e-4, 1e-3]"
        let one = try run(["train", try config("te1", images: images, batch: 2, steps: 4, extra: extra, unetOnly: false)])
        XCTAssertEqual(one.status, 0, one.output)
        XCTAssertTrue(one.output.contains("unet 0.001, te1 0.0005, te2 0.001"), one.output)
        let two = try run(["train", try config("te2", images: images, batch: 1, steps: 4, extra: extra, unetOnly: false)], ranks: 2)
        XCTAssertEqual(two.status, 0, two.output)
        let a = try loraTensors(work.appendingPathComponent("te1/t.safetensors").path)
        let b = try loraTensors(work.appendingPathComponent("te2/t.safetensors").path)
        XCTAssertEqual(Set(a.keys), Set(b.keys))
        // builtin:tiny has 2 layers per text encoder: 6 modules each × 3 tensors.
        XCTAssertEqual(a.keys.filter { $0.hasPrefix("lora_te1_") }.count, 36)
        XCTAssertEqual(a.keys.filter { $0.hasPrefix("lora_te2_") }.count, 36)
        let teUp = a.filter { $0.key.hasPrefix("lora_te2_") && $0.key.hasSuffix("lora_up.weight") }.values.flatMap { $0 }.map(abs).max() ?? 0
        XCTAssertGreaterThan(teUp, 1e-4, "the text encoders' lora_up must move")
        var maxDiff: Float = 0, maxAbs: Float = 0
        for (k, va) in a {
            maxDiff = max(maxDiff, zip(va, b[k]!).map { abs($0 - $1) }.max() ?? 0)
            maxAbs = max(maxAbs, va.map(abs).max() ?? 0)
        }
        XCTAssertLessThan(maxDiff, 1e-4 * maxAbs, "np2×b1 vs np1×b2 with text-encoder LoRA")
        let meta = try SafeTensorsFile(path: work.appendingPathComponent("te1/t.safetensors").path).metadata
        XCTAssertEqual(meta["ss_text_encoder_lr"], "[0.0005, 0.001]")

        // `lora-dist eval text --lora` applies the file's text-encoder modules: the conditioning changes.
        let model = work.appendingPathComponent("cache/builtin-tiny.safetensors").path
        var outputs: [[Float]] = []
        for (name, lora) in [("base", [String]()), ("lora", ["--lora", work.appendingPathComponent("te1/t.safetensors").path])] {
            let out = work.appendingPathComponent("\(name).safetensors").path
            let r = try run(["eval", "text", "--model", model, "--prompt", "a red circle", "--out", out] + lora)
            XCTAssertEqual(r.status, 0, r.output)
            outputs.append(try SafeTensorsFile(path: out).tensor("context").scalars)
        }
        XCTAssertNotEqual(outputs[0], outputs[1])
    }

    // `lora-dist cache CONFIG` under mpirun builds the plan `lora-dist train` builds: the training run that follows
    // finds every latent (0 encoded), and its owner ranks are training's.
    func testCacheCommandPreparesTheTrainingCache() throws {
        let images = try squareImages(4)
        let cfg = try config("cached", images: images, batch: 1, steps: 2)
        let cache = try run(["cache", cfg, "--threads", "1"], ranks: 2)
        XCTAssertEqual(cache.status, 0, cache.output)
        XCTAssertTrue(cache.output.contains("4 latents, 0 hits, 4 misses, 0 rebuilt"), cache.output)
        let train = try run(["train", cfg, "--threads", "1"], ranks: 2)
        XCTAssertEqual(train.status, 0, train.output)
        XCTAssertTrue(train.output.contains(": 4 reused, 0 encoded"), train.output)
    }

    // The first seed's guide config (Tests/Fixtures/training/configs/seed-guide.toml) trains as written: v2 = false
    // and v_parameterization = false ask for nothing, network_rank is read as network_dim (with a note),
    // learning_rate_te1/te2 give way to text_encoder_lr (with a note), and the text encoders train at 1e-6.
    func testSeedGuideConfigTrainsAsWritten() throws {
        let images = try squareImages(2)
        var text = try String(contentsOf: URL(fileURLWithPath: TrainingFixtures.path("configs/seed-guide.toml")), encoding: .utf8)
        text = text.replacingOccurrences(of: "models/Illustrious-XL-v0.1.safetensors", with: "builtin:tiny")
            .replacingOccurrences(of: "\"dataset/img\"", with: "\"\(images.path)\"")
            .replacingOccurrences(of: "\"1024,1024\"", with: "\"128,128\"")
            .replacingOccurrences(of: "min_bucket_reso = 256", with: "min_bucket_reso = 64")
            .replacingOccurrences(of: "max_bucket_reso = 2048", with: "max_bucket_reso = 256")
        let cfg = work.appendingPathComponent("guide.toml")
        try text.write(to: cfg, atomically: true, encoding: .utf8)
        let out = work.appendingPathComponent("guide")
        let r = try run(["train", cfg.path, "--output-dir", out.path, "--max-train-steps", "2", "--threads", "2"])
        XCTAssertEqual(r.status, 0, r.output)
        XCTAssertTrue(r.output.contains("network_rank = 64: read as network_dim"), r.output)
        XCTAssertTrue(r.output.contains("text_encoder_lr applies"), r.output)
        XCTAssertTrue(r.output.contains("ignored, as they ask for nothing: v2 = false"), r.output)
        XCTAssertTrue(r.output.contains("lr unet 0.0001, te1 1e-06, te2 1e-06"), r.output)
        let file = try SafeTensorsFile(path: out.appendingPathComponent("character.safetensors").path)
        XCTAssertEqual(file.metadata["ss_network_dim"], "64")
        XCTAssertEqual(file.metadata["ss_text_encoder_lr"], "1e-06")
        XCTAssertEqual(try file.tensor("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight").shape, [64, 32])
    }

    // A launch script's kohya flags next to the file, and --set, override it (kohya's read_config_from_file: the command
    // line wins); a stray word is a named error.
    func testKohyaFlagsOnTheCommandLine() throws {
        let images = try squareImages(2)
        let cfg = try config("flags", images: images, batch: 1, steps: 5)
        let r = try run(["train", cfg, "--max_train_steps", "2", "--set", "output_name=\"cli\"", "--zero_terminal_snr",
                         "--v_parameterization", "--threads", "2"])
        XCTAssertEqual(r.status, 0, r.output)
        XCTAssertTrue(r.output.contains("2 optimizer steps"), r.output)
        let meta = try SafeTensorsFile(path: work.appendingPathComponent("flags/cli.safetensors").path).metadata
        XCTAssertEqual(meta["ss_zero_terminal_snr"], "True")
        XCTAssertEqual(meta["modelspec.prediction_type"], "v")
        let bad = try run(["train", cfg, "stray"])
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertTrue(bad.output.contains("stray"), bad.output)
    }

    // kohya's `vae = FILE`: the latents are encoded by that VAE (here the tiny checkpoint's own VAE saved alone, without
    // the single-file prefix), and the cache keys carry the VAE's identity, so the checkpoint's latents are not reused.
    func testExternalVAEEncodesTheLatents() throws {
        let images = try squareImages(2)
        let first = try run(["train", try config("own-vae", images: images, batch: 1, steps: 1), "--threads", "2"])
        XCTAssertEqual(first.status, 0, first.output)
        XCTAssertTrue(first.output.contains(": 0 reused, 2 encoded"), first.output)
        let model = try SafeTensorsFile(path: work.appendingPathComponent("cache/builtin-tiny.safetensors").path)
        var vae: [String: Tensor] = [:]
        for name in model.names where name.hasPrefix("first_stage_model.") {
            vae[String(name.dropFirst("first_stage_model.".count))] = try model.tensor(name)
        }
        let vaePath = work.appendingPathComponent("vae.safetensors").path
        try writeSafeTensors(vae, metadata: [:], to: vaePath)
        let second = try run(["train", try config("file-vae", images: images, batch: 1, steps: 1, extra: "vae = \"\(vaePath)\""),
                              "--threads", "2"])
        XCTAssertEqual(second.status, 0, second.output)
        XCTAssertTrue(second.output.contains(": 0 reused, 2 encoded"), second.output)
        let missing = try run(["train", try config("no-vae", images: images, batch: 1, steps: 1, extra: "vae = \"/nonexistent/vae.safetensors\"")])
        XCTAssertNotEqual(missing.status, 0)
        XCTAssertTrue(missing.output.contains("vae: /nonexistent/vae.safetensors does not exist"), missing.output)
    }

    // kohya's in_json with train_data_dir (fine-tuning captions per image in one JSON) trains; the captions come from it.
    func testInJSONTrains() throws {
        let images = try squareImages(2)
        let meta = work.appendingPathComponent("meta.json")
        try Data(#"{"sq_00.png": {"caption": "a shape", "tags": "red"}, "sq_01.png": {"tags": "blue"}}"#.utf8).write(to: meta)
        let cfg = try config("injson", images: images, batch: 1, steps: 2, extra: "in_json = \"\(meta.path)\"")
        let r = try run(["train", cfg, "--threads", "2"])
        XCTAssertEqual(r.status, 0, r.output)
        let tags = try SafeTensorsFile(path: work.appendingPathComponent("injson/t.safetensors").path).metadata["ss_tag_frequency"] ?? ""
        XCTAssertTrue(tags.contains("\"red\"") && tags.contains("\"blue\""), tags)
    }

    // A seed makes the run deterministic: the demo config in two output folders (its generated model and dataset in each),
    // one rank on 2 threads, gives bit-identical LoRAs. Sample ids are relative to the dataset folder, so where the
    // dataset lives does not change the plan or any random draw.
    // The same holds in bf16 (oneDNN's kernels are deterministic for a fixed thread count), whose LoRA is not fp32's.
    func testSameConfigGivesBitIdenticalLoRA() throws {
        let bf16 = Kernels.bf16UnavailableReason == nil
        var outputs: [String: [[String: [Float]]]] = [:]
        for precision in bf16 ? ["no", "bf16"] : ["no"] {
            for name in ["first", "second"] {
                let out = work.appendingPathComponent(name + precision)
                let r = try run(["train", "--output-dir", out.path, "--max-train-steps", "6", "--threads", "2",
                                 "--set", "mixed_precision=\"\(precision)\""])
                XCTAssertEqual(r.status, 0, r.output)
                XCTAssertEqual(r.output.contains("mixed_precision bf16: linear layers"), precision == "bf16", r.output)
                outputs[precision, default: []].append(try loraTensors(out.appendingPathComponent("demo.safetensors").path))
            }
            XCTAssertEqual(outputs[precision]![0], outputs[precision]![1], precision)
        }
        if bf16 { XCTAssertNotEqual(outputs["no"]![0], outputs["bf16"]![0], "bf16 must compute differently from fp32") }
    }

    // A run killed with SIGKILL after the state of step 2 is written, then resumed, ends with the same LoRA bits as an
    // uninterrupted run (same world size). Under mpirun -np 2 with the bf16 wire format, whose error-feedback residual
    // per rank is part of the state.
    func testKillAndResumeIsBitIdentical() throws {
        let images = try squareImages(3)
        let extra = "save_every_n_steps = 2\nsave_state = true\n"
        let lora = "wire_format = \"bf16\""
        let straight = try run(["train", try config("straight", images: images, batch: 1, steps: 5, extra: extra, lora: lora)], ranks: 2)
        XCTAssertEqual(straight.status, 0, straight.output)
        let cfg = try config("killed", images: images, batch: 1, steps: 5, extra: extra, lora: lora)
        let killed = try run(["train", cfg], ranks: 2, env: ["LORA_DIST_TEST_KILL_AT_STEP": "3"])
        XCTAssertNotEqual(killed.status, 0, "the run must have died")
        let killedDir = work.appendingPathComponent("killed")
        XCTAssertFalse(FileManager.default.fileExists(atPath: killedDir.appendingPathComponent("t.safetensors").path))
        let states = try CheckpointWriter.completeStates(in: killedDir.appendingPathComponent("t-state")).map(\.step)
        XCTAssertEqual(states, [2], "the step-2 state is the newest complete one")
        let resumed = try run(["train", cfg, "--resume", killedDir.appendingPathComponent("t-state").path], ranks: 2)
        XCTAssertEqual(resumed.status, 0, resumed.output)
        XCTAssertTrue(resumed.output.contains("resumed from"), resumed.output)
        let a = try loraTensors(work.appendingPathComponent("straight/t.safetensors").path)
        let b = try loraTensors(killedDir.appendingPathComponent("t.safetensors").path)
        XCTAssertEqual(a, b, "resumed LoRA differs from the uninterrupted run")
        // SIGUSR1 on rank 1 at step 3: both ranks stop at that step, the state is saved, exit 75 (requeue); the job
        // script's `--resume auto` then continues from it and ends bit-identical too.
        let cfg2 = try config("signalled", images: images, batch: 1, steps: 5, extra: extra, lora: lora)
        let stopped = try run(["train", cfg2, "--resume", "auto", "--requeue-on-stop"], ranks: 2,
                              env: ["LORA_DIST_TEST_SIGNAL_AT_STEP": "3"])
        XCTAssertEqual(stopped.status, 75, stopped.output)
        XCTAssertTrue(stopped.output.contains("stopped by"), stopped.output)
        let signalledDir = work.appendingPathComponent("signalled")
        XCTAssertEqual(try CheckpointWriter.completeStates(in: signalledDir.appendingPathComponent("t-state")).map(\.step).last, 3)
        let requeued = try run(["train", cfg2, "--resume", "auto", "--requeue-on-stop"], ranks: 2)
        XCTAssertEqual(requeued.status, 0, requeued.output)
        XCTAssertTrue(requeued.output.contains("resumed from"), requeued.output)
        XCTAssertEqual(try loraTensors(signalledDir.appendingPathComponent("t.safetensors").path), a)
        // Another world size resumes too (elastic): StopTests.testElasticResumeAndExport.
    }

    // save_every_n_steps with kohya's save_last_n_steps and AI Toolkit's keep count, on disk.
    func testKeepLastRulesOnDisk() throws {
        let images = try squareImages(1)
        let out = try run(["train", try config("keep", images: images, batch: 1, steps: 7,
                                               extra: "save_every_n_steps = 1\nsave_last_n_steps = 4\n", lora: "keep_step_saves = 2")])
        XCTAssertEqual(out.status, 0, out.output)
        let dir = work.appendingPathComponent("keep")
        XCTAssertEqual(SaveNames.existingSteps(in: dir, outputName: "t"), [5, 6])
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir.appendingPathComponent("t.safetensors").path))
        let file = try SafeTensorsFile(path: dir.appendingPathComponent("t-step00000006.safetensors").path)
        XCTAssertEqual(file.metadata["ss_steps"], "6")
        XCTAssertEqual(file.metadata["ss_base_model_version"], "sdxl_base_v1-0")
        XCTAssertEqual(file.metadata["ss_network_module"], "networks.lora")
        XCTAssertEqual(file.metadata["ss_network_dim"], "4")
        for key in ["ss_network_alpha", "ss_network_args", "ss_output_name", "ss_epoch", "ss_learning_rate", "ss_unet_lr",
                    "ss_text_encoder_lr", "ss_num_train_images", "ss_datasets", "ss_tag_frequency", "ss_seed", "ss_min_snr_gamma",
                    "ss_noise_offset", "ss_training_started_at", "sshs_model_hash", "sshs_legacy_hash", "modelspec.architecture"] {
            XCTAssertNotNil(file.metadata[key], key)
        }
        let final = try SafeTensorsFile(path: dir.appendingPathComponent("t.safetensors").path)
        XCTAssertNotNil(final.metadata["ss_training_finished_at"])
        let freq = try JSONSerialization.jsonObject(with: Data(final.metadata["ss_tag_frequency"]!.utf8)) as? [String: [String: Int]]
        XCTAssertEqual(freq?["img"]?["demo_trigger"], 1)
        // The metrics file has one line per optimizer step.
        let metrics = try StepMetrics.readJSONL(dir.appendingPathComponent("t-metrics.jsonl"))
        XCTAssertEqual(metrics.map(\.step), Array(1...7))
    }

    // The README's first command: the embedded demo under mpirun -np 2 (here its first 40 of 200 steps): the loss falls
    // (measured with the demo's settings: 20-step means 0.97, 0.80, 0.67, … 0.41 over the full run).
    func testDemoTrainsUnderMPIAndLossFalls() throws {
        let out = work.appendingPathComponent("demo")
        let r = try run(["train", "--output-dir", out.path, "--max-train-steps", "40"], ranks: 2)
        XCTAssertEqual(r.status, 0, r.output)
        XCTAssertTrue(FileManager.default.fileExists(atPath: out.appendingPathComponent("demo.safetensors").path), r.output)
        let metrics = try StepMetrics.readJSONL(out.appendingPathComponent("demo-metrics.jsonl"))
        XCTAssertEqual(metrics.count, 40)
        let first = metrics.prefix(10).map(\.loss).reduce(0, +) / 10, last = metrics.suffix(10).map(\.loss).reduce(0, +) / 10
        XCTAssertLessThan(last, first * 0.9, "loss must fall: first ten \(first), last ten \(last)")
        XCTAssertTrue(r.output.contains("global batch 4 = 2 per rank × 1 accumulation × 2 ranks"), r.output)
    }

    // mixed_precision = "bf16" (the seeds' setting): the demo's loss falls as far as in fp32 over the same 40 steps, one
    // rank (the last ten steps' mean within 5 % of fp32's, both well below the first ten's).
    func testDemoInBF16FallsAsFarAsFP32() throws {
        if let why = Kernels.bf16UnavailableReason { throw XCTSkip(why) }
        var means: [String: (first: Double, last: Double)] = [:]
        for precision in ["no", "bf16"] {
            let out = work.appendingPathComponent("demo-\(precision)")
            let r = try run(["train", "--output-dir", out.path, "--max-train-steps", "40", "--set", "mixed_precision=\"\(precision)\""])
            XCTAssertEqual(r.status, 0, r.output)
            let metrics = try StepMetrics.readJSONL(out.appendingPathComponent("demo-metrics.jsonl"))
            XCTAssertEqual(metrics.count, 40)
            means[precision] = (metrics.prefix(10).map(\.loss).reduce(0, +) / 10, metrics.suffix(10).map(\.loss).reduce(0, +) / 10)
        }
        let fp32 = means["no"]!, bf16 = means["bf16"]!
        XCTAssertLessThan(fp32.last, fp32.first * 0.9, "fp32 \(fp32)")
        XCTAssertLessThan(bf16.last, bf16.first * 0.9, "bf16 \(bf16)")
        XCTAssertLessThan(abs(bf16.last - fp32.last), 0.05 * fp32.last, "bf16 \(bf16) vs fp32 \(fp32)")
    }

    // Where oneDNN cannot run bf16 (here: DNNL_MAX_CPU_ISA caps its ISA below AVX512-BF16, as on a CPU without it), a
    // bf16 config trains in fp32 with one line saying why — no crash, no emulation; mixed_precision fp16 says it runs
    // as bf16 first. The LoRA equals the fp32 run's bit for bit.
    func testBF16FallsBackToFP32WithOneLine() throws {
        let fp32 = work.appendingPathComponent("fp32"), capped = work.appendingPathComponent("capped")
        let a = try run(["train", "--output-dir", fp32.path, "--max-train-steps", "3", "--threads", "2"])
        XCTAssertEqual(a.status, 0, a.output)
        let b = try run(["train", "--output-dir", capped.path, "--max-train-steps", "3", "--threads", "2",
                         "--set", "mixed_precision=\"fp16\""], env: ["DNNL_MAX_CPU_ISA": "AVX512_CORE"])
        XCTAssertEqual(b.status, 0, b.output)
        XCTAssertTrue(b.output.contains("mixed_precision fp16: this CPU has no fast fp16 arithmetic; computing as bf16"), b.output)
        XCTAssertEqual(b.output.components(separatedBy: "bf16 requested, computing in fp32: oneDNN is capped at avx512_core").count, 2, b.output)
        XCTAssertTrue(b.output.contains("computing in fp32"), b.output)
        XCTAssertEqual(try loraTensors(fp32.appendingPathComponent("demo.safetensors").path),
                       try loraTensors(capped.appendingPathComponent("demo.safetensors").path))
    }

    // A loss that turns non-finite (an absurd learning rate blows the weights up after step 1): each such step is
    // skipped and reported; three in a row stop the run with an error, and the files of the last good step are intact.
    func testRepeatedNonFiniteStepsStopWithLastGoodStateIntact() throws {
        let images = try squareImages(1)
        let cfg = try config("nan", images: images, batch: 1, steps: 10,
                             extra: "save_every_n_steps = 1\nsave_state = true\nmax_grad_norm = 0.0\n",
                             lora: "max_nonfinite_steps = 3")
        var text = try String(contentsOfFile: cfg, encoding: .utf8)
        text = text.replacingOccurrences(of: "learning_rate = 1e-3", with: "learning_rate = 1e30")
        try text.write(toFile: cfg, atomically: true, encoding: .utf8)
        let r = try run(["train", cfg])
        XCTAssertNotEqual(r.status, 0, r.output)
        XCTAssertTrue(r.output.contains("step skipped"), r.output)
        XCTAssertTrue(r.output.contains("3 steps in a row had a non-finite loss or gradient"), r.output)
        let dir = work.appendingPathComponent("nan")
        let steps = SaveNames.existingSteps(in: dir, outputName: "t")
        XCTAssertFalse(steps.isEmpty, "the good step's LoRA must be there")
        let states = try CheckpointWriter.completeStates(in: dir.appendingPathComponent("t-state")).map(\.step)
        XCTAssertEqual(states.last, steps.last)
        for (_, values) in try loraTensors(dir.appendingPathComponent(SaveNames.step("t", steps.last!)).path) {
            XCTAssertTrue(values.allSatisfy(\.isFinite))
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir.appendingPathComponent("t.safetensors").path))
    }

    // [lora_dist] resolutions = [64, 128]: every image trains at both (AI Toolkit's multi-resolution), two latents each.
    func testSeveralResolutions() throws {
        let images = try squareImages(2)
        let r = try run(["train", try config("multi", images: images, batch: 1, steps: 4, lora: "resolutions = [64, 128]")])
        XCTAssertEqual(r.status, 0, r.output)
        XCTAssertTrue(r.output.contains("64x64") && r.output.contains("128x128"), r.output)
        let latents = try FileManager.default.contentsOfDirectory(atPath: work.appendingPathComponent("cache/latents").path)
        XCTAssertEqual(latents.filter { $0.hasSuffix(".safetensors") }.count, 4)
    }
}

/// Sample images during training (kohya's sample_* keys).
extension TrainCommandTests {
    // Two ranks, UNet and text-encoder LoRA, sampling before training and every 2 steps: the LoRA is bit for bit the one
    // the same run trains without sampling; the images are all there under kohya's names, written once (rank 0), with
    // the A1111 parameters chunk, a metrics line per round and TensorBoard image summaries.
    func testSamplingDoesNotChangeTheLoRAAndWritesKohyaNames() throws {
        let images = try squareImages(2)
        let prompts = work.appendingPathComponent("prompts.txt")
        try """
            # kohya syntax: a comment, a blank line, options
            demo_trigger, red square --w 64 --h 64 --d 5 --s 4 --l 5

            [trigger], a (blue:1.3) square --n blurry --w 64 --h 96 --s 3 --ss euler_a
            [green] circle --w 64 --h 64 --s 3 --ss dpm++_2m_karras
            """.write(to: prompts, atomically: true, encoding: .utf8)
        let plain = try run(["train", try config("plain", images: images, batch: 1, steps: 4, lora: "trigger = \"zxc\"", unetOnly: false)], ranks: 2)
        XCTAssertEqual(plain.status, 0, plain.output)
        let sampling = """
            sample_prompts = "\(prompts.path)"
            sample_every_n_steps = 2
            sample_at_first = true
            log_with = "tensorboard"
            """
        let sampled = try run(["train", try config("sampled", images: images, batch: 1, steps: 4, extra: sampling, lora: "trigger = \"zxc\"",
                                                   unetOnly: false)], ranks: 2)
        XCTAssertEqual(sampled.status, 0, sampled.output)
        XCTAssertEqual(try loraTensors(work.appendingPathComponent("plain/t.safetensors").path),
                       try loraTensors(work.appendingPathComponent("sampled/t.safetensors").path), "sampling changed the LoRA")

        let folder = work.appendingPathComponent("sampled/sample")
        let names = try FileManager.default.contentsOfDirectory(atPath: folder.path).sorted()
        XCTAssertEqual(names.count, 9, "\(names)")
        let pattern = try NSRegularExpression(pattern: #"^t_(e000000|000002|000004)_0[0-2]_\d{14}_\d+\.png$"#)
        for n in names {
            XCTAssertNotNil(pattern.firstMatch(in: n, range: NSRange(n.startIndex..., in: n)), n)
        }
        // The prompt with --d 5 keeps its seed; the others take the run's seed plus their index — the same at every round.
        XCTAssertEqual(Set(names.filter { $0.contains("_00_") }.map { $0.components(separatedBy: "_").last! }), ["5.png"])
        XCTAssertEqual(Set(names.filter { $0.contains("_01_") }.map { $0.components(separatedBy: "_").last! }).count, 1)
        let wide = try XCTUnwrap(names.first { $0.hasPrefix("t_000004_01_") })
        let size = try ImageIO.size(of: folder.appendingPathComponent(wide).path)
        XCTAssertEqual([size.width, size.height], [64, 96])
        let text = try ImageIO.pngText(folder.appendingPathComponent(wide).path, key: "parameters") ?? ""
        // [trigger] is [lora_dist] trigger, as AI Toolkit fills it in sample prompts.
        XCTAssertTrue(text.hasPrefix("zxc, a (blue:1.3) square\nNegative prompt: blurry\nSteps: 3, Sampler: Euler a, CFG scale: 7.5,"), text)
        XCTAssertTrue(text.contains("Size: 64x96") && text.contains("Step: 4"), text)

        let lines = try String(contentsOf: work.appendingPathComponent("sampled/t-metrics.jsonl"), encoding: .utf8)
            .split(separator: "\n").compactMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
        XCTAssertEqual(lines.compactMap { ($0["samples_at_step"] as? NSNumber)?.intValue }, [0, 2, 4])
        XCTAssertEqual(try StepMetrics.readJSONL(work.appendingPathComponent("sampled/t-metrics.jsonl")).count, 4)
        let logs = work.appendingPathComponent("sampled/logs")
        let events = try FileManager.default.subpathsOfDirectory(atPath: logs.path).filter { $0.contains("tfevents") }
        XCTAssertEqual(events.count, 1)
        let bytes = try Data(contentsOf: logs.appendingPathComponent(events[0]))
        for tag in ["sample_0", "sample_1", "sample_2"] { XCTAssertNotNil(bytes.range(of: Data(tag.utf8)), tag) }
        XCTAssertTrue(sampled.output.contains("sample images: 9 in"), sampled.output)
    }

    // What is wrong with sampling is said before training, naming the key; a cadence of 0 asks for nothing.
    func testSamplingSettingsAreCheckedBeforeTraining() throws {
        let images = try squareImages(2)
        let prompts = work.appendingPathComponent("p.txt")
        try "a cat --w 64 --h 64 --s 2\n".write(to: prompts, atomically: true, encoding: .utf8)
        let cases: [(String, String)] = [
            ("sample_every_n_steps = 2", "no sample_prompts file is given"),
            ("sample_every_n_steps = 2\nsample_prompts = \"\(work.path)/missing.txt\"", "cannot read the sample prompts file"),
            ("sample_at_first = true\nsample_prompts = \"\(prompts.path)\"\nsample_sampler = \"heun\"", "kohya's heun is not implemented"),
        ]
        for (i, (extra, expected)) in cases.enumerated() {
            let r = try run(["train", try config("bad\(i)", images: images, batch: 1, steps: 2, extra: extra)])
            XCTAssertNotEqual(r.status, 0, r.output)
            XCTAssertTrue(r.output.contains(expected), "\(extra)\n\(r.output)")
            XCTAssertFalse(r.output.contains("latent cache"), "checked after the latent cache: \(r.output)")
        }
        let off = try run(["train", try config("off", images: images, batch: 1, steps: 2,
                                               extra: "sample_every_n_steps = 0\nsample_prompts = \"\(prompts.path)\"\nsample_sampler = \"ddim\"")])
        XCTAssertEqual(off.status, 0, off.output)
        XCTAssertFalse(FileManager.default.fileExists(atPath: work.appendingPathComponent("off/sample").path))
        // The epoch cadence: 2 images at batch 1 are 2 steps an epoch; 3 steps end epoch 1 and, early, epoch 2 —
        // kohya samples at both ends.
        let epochs = try run(["train", try config("epochs", images: images, batch: 1, steps: 3,
                                                  extra: "sample_every_n_epochs = 1\nsample_prompts = \"\(prompts.path)\"")])
        XCTAssertEqual(epochs.status, 0, epochs.output)
        let names = try FileManager.default.contentsOfDirectory(atPath: work.appendingPathComponent("epochs/sample").path)
        XCTAssertEqual(Set(names.map { String($0.prefix(10)) }), ["t_e000001_", "t_e000002_"], "\(names)")
    }
}
