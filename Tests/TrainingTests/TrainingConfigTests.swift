import Dataset
import Distributed
import Foundation
import Tensor
import Training
import XCTest

/// The training TOML loader (Sources/Training/Config). The kohya argument list these tests check against is
/// Tests/Fixtures/training/kohya_args.json, written by make_kohya_args.py from kohya-ss/sd-scripts' own source
/// (commit 48d368fa557731ad0488c07304dfeba8c07910eb) with Python's `ast`: names, defaults and types of every
/// argparse argument sdxl_train_network.py defines.
final class TrainingConfigTests: XCTestCase {
    static let repoRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
        .deletingLastPathComponent().deletingLastPathComponent()
    static let configs = repoRoot.appendingPathComponent("configs")

    struct KohyaArgument: Decodable {
        let name: String
        let type: String
        let `default`: JSONValue
        let defined_in: String
    }
    enum JSONValue: Decodable, Equatable {
        case null, bool(Bool), number(Double), string(String), other
        init(from decoder: Decoder) throws {
            let c = try decoder.singleValueContainer()
            if c.decodeNil() { self = .null }
            else if let b = try? c.decode(Bool.self) { self = .bool(b) }
            else if let d = try? c.decode(Double.self) { self = .number(d) }
            else if let s = try? c.decode(String.self) { self = .string(s) }
            else { self = .other }
        }
    }
    struct KohyaArgs: Decodable { let commit: String; let arguments: [KohyaArgument] }

    static func kohyaArgs() throws -> KohyaArgs {
        let url = repoRoot.appendingPathComponent("Tests/Fixtures/training/kohya_args.json")
        return try JSONDecoder().decode(KohyaArgs.self, from: Data(contentsOf: url))
    }

    func parse(_ text: String, base: URL = URL(fileURLWithPath: NSTemporaryDirectory())) throws -> TrainingConfig {
        try TrainingConfig.parse(toml: text, source: "test.toml", baseDirectory: base)
    }

    /// The error `body` throws, as text (fails the test when it does not throw a TrainingConfigError).
    func message(_ body: () throws -> Any, file: StaticString = #filePath, line: UInt = #line) -> String {
        do {
            _ = try body()
            XCTFail("expected a TrainingConfigError", file: file, line: line)
            return ""
        } catch let e as TrainingConfigError {
            return e.description
        } catch {
            XCTFail("expected a TrainingConfigError, got \(error)", file: file, line: line)
            return ""
        }
    }

    let minimal = """
        pretrained_model_name_or_path = "model.safetensors"
        train_data_dir = "images"
        resolution = 512

        """

    // MARK: The kohya argument table

    /// Every argument kohya's parser defines is implemented, accepted with a note, or refused by name; and the
    /// table names no argument kohya does not have.
    func testEveryKohyaArgumentIsHandled() throws {
        let args = try Self.kohyaArgs()
        XCTAssertEqual(args.commit, "48d368fa557731ad0488c07304dfeba8c07910eb")
        XCTAssertGreaterThan(args.arguments.count, 150)
        let names = Set(args.arguments.map(\.name))
        let missing = names.subtracting(TrainingConfig.kohyaKeys.keys).sorted()
        XCTAssertEqual(missing, [], "kohya arguments with no handling in TrainingConfig.kohyaKeys")
        let invented = Set(TrainingConfig.kohyaKeys.keys).subtracting(names).sorted()
        XCTAssertEqual(invented, [], "TrainingConfig.kohyaKeys names arguments kohya's parser does not define")
        // Every implemented key is readable back in kohya's terms.
        for (key, handling) in TrainingConfig.kohyaKeys {
            switch handling {
            case .field, .dataset: XCTAssertNotNil(TrainingConfig().kohyaValue(of: key), key)
            case .note(let n): XCTAssertTrue(n.hasPrefix(key + ":"), "note for \(key) should start with the key: \(n)")
            case .unsupported(let what): XCTAssertFalse(what.isEmpty, key)
            }
        }
    }

    /// Implemented fields default to kohya's argparse defaults, except where kohya's argparse default is a
    /// placeholder that its code replaces; each exception names the kohya line that does it.
    func testImplementedDefaultsEqualKohyaDefaults() throws {
        let effective: [String: (KohyaValue, String)] = [
            "network_dim": (.int(4), "networks/lora.py create_network: `if network_dim is None: network_dim = 4`"),
            "network_module": (.string("networks.lora"), "train_network.py imports args.network_module; lora-dist has only networks.lora"),
            "optimizer_type": (.string("AdamW"), "train_util.get_optimizer: `if optimizer_type is None or optimizer_type == \"\": optimizer_type = \"AdamW\"`"),
            "output_name": (.string("last"), "train_util: default_if_none(args.output_name, DEFAULT_LAST_OUTPUT_NAME = \"last\")"),
            "output_dir": (.string("."), "kohya has no usable default (os.path.join(None, ...) fails); lora-dist writes to the current directory"),
        ]
        let defaults = TrainingConfig()
        var checked = 0
        for arg in try Self.kohyaArgs().arguments {
            guard let handling = TrainingConfig.kohyaKeys[arg.name] else { continue }
            switch handling {
            case .field, .dataset: break
            default: continue
            }
            guard let ours = defaults.kohyaValue(of: arg.name) else { XCTFail("no value for \(arg.name)"); continue }
            checked += 1
            if let (value, why) = effective[arg.name] {
                XCTAssertEqual(ours, value, "\(arg.name): \(why)")
                continue
            }
            switch (arg.default, ours) {
            case (.null, .null): break
            case (.bool(let k), .bool(let o)): XCTAssertEqual(k, o, arg.name)
            case (.number(let k), .int(let o)): XCTAssertEqual(k, Double(o), arg.name)
            case (.number(let k), .float(let o)): XCTAssertEqual(k, o, arg.name)
            case (.string(let k), .string(let o)): XCTAssertEqual(k, o, arg.name)
            default: XCTFail("\(arg.name): kohya's default \(arg.default) (\(arg.defined_in)), ours \(ours)")
            }
        }
        XCTAssertGreaterThan(checked, 90)
    }

    // MARK: configs/

    func testDemoTOMLMatchesFileAndParses() throws {
        let file = try String(contentsOf: Self.configs.appendingPathComponent("demo.toml"), encoding: .utf8)
        XCTAssertEqual(file, TrainingConfig.demoTOML, "configs/demo.toml and DemoConfig.swift's copy differ")
        let demo = TrainingConfig.demo
        XCTAssertEqual(demo.pretrainedModelNameOrPath, "builtin:tiny")
        XCTAssertEqual(demo.trainDataDir, "builtin:shapes")
        XCTAssertEqual(demo.seed, 42)
        XCTAssertEqual(demo.outputDir, "output/demo")
        XCTAssertEqual(demo.optimizerType, "AdamW")
        XCTAssertNotNil(demo.saveEveryNSteps)
        XCTAssertEqual(demo.notes, [])
        let net = try demo.networkOptions
        XCTAssertEqual(net, NetworkOptions(linearDim: 16, linearAlpha: 16, convDim: 8, convAlpha: 8, trainUNet: true, trainTextEncoder: false))
    }

    /// The demo's dataset settings bucket the built-in shapes (drawn small here) without error.
    func testDemoDatasetBucketsBuiltinShapes() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("lora-dist-demo-shapes-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        try SyntheticShapes.write(to: dir, count: 5, scale: 0.25)
        let cfg = try TrainingConfig.demo.datasetConfig(builtinFolder: dir)
        XCTAssertEqual(cfg.subsets.count, 1)
        XCTAssertEqual(cfg.subsets[0].resolution, [128, 128])
        XCTAssertEqual(cfg.subsets[0].captionExtension, ".txt")
        let report = try DatasetReport.make(cfg)
        XCTAssertEqual(report.entries.count, 5)
        XCTAssertEqual(report.missingCaptions, 0)
        XCTAssertEqual(report.batchSize, TrainingConfig.demo.trainBatchSize)
        for e in report.entries {
            XCTAssertEqual(e.placement.bucket.width % 32, 0)
            XCTAssertEqual(e.placement.bucket.height % 32, 0)
        }
    }

    func testIllustriousSeedConfig() throws {
        let c = try TrainingConfig.load(toml: Self.configs.appendingPathComponent("illustrious-character.toml"))
        XCTAssertEqual(c.pretrainedModelNameOrPath, "models/Illustrious-XL-v0.1.safetensors")
        XCTAssertEqual(c.networkDim, 64)
        XCTAssertEqual(c.networkAlpha, 32)
        XCTAssertEqual(c.minSNRGamma, 1.5)
        XCTAssertEqual(c.lrScheduler, "cosine_with_restarts")
        XCTAssertEqual(c.optimizerType, "AdamW8bit")
        XCTAssertEqual(c.trainDataDir, "dataset/img")
        XCTAssertEqual(c.datasetArguments.resolution, [1024, 1024])
        XCTAssertTrue(c.datasetArguments.enableBucket)
        XCTAssertEqual(c.datasetArguments.minBucketReso, 256)
        XCTAssertEqual(c.datasetArguments.maxBucketReso, 2048)
        XCTAssertEqual(c.datasetArguments.captionExtension, ".txt")
        XCTAssertTrue(c.cacheLatents)
        XCTAssertTrue(c.gradientCheckpointing)
        XCTAssertEqual(c.saveEveryNEpochs, 1)
        XCTAssertEqual(c.outputName, "illustrious-character")
        // The seed trains the text encoders too, at 1e-6 (kohya's default: network_train_unet_only absent).
        XCTAssertEqual(c.textEncoderLR, [1e-6])
        XCTAssertTrue(try c.networkOptions.trainTextEncoder)
        // xformers is accepted with a note; mixed_precision bf16 is a setting (the bf16 kernel family), said at start.
        XCTAssertTrue(c.notes.contains { $0.hasPrefix("xformers:") }, "\(c.notes)")
        XCTAssertEqual(c.notes.count, 1, "\(c.notes)")
        XCTAssertEqual(c.mixedPrecision, "bf16")
        XCTAssertEqual(c.requestedKernelFamily, .bf16)
    }

    func testWAISeedConfig() throws {
        let c = try TrainingConfig.load(toml: Self.configs.appendingPathComponent("wai-character.toml"))
        let net = try c.networkOptions
        XCTAssertEqual(net.linearDim, 16)
        XCTAssertEqual(net.convDim, 8)
        XCTAssertEqual(net.convAlpha, 4)
        XCTAssertEqual(c.trainBatchSize, 2)
        XCTAssertEqual(c.gradientAccumulationSteps, 2)
        XCTAssertEqual(c.maxTrainSteps, 3000)
        XCTAssertEqual(c.learningRate, 7e-5)
        XCTAssertEqual(c.saveEveryNSteps, 100)
        XCTAssertEqual(c.lora.resolutions, [512, 768])
        XCTAssertEqual(c.lora.keepStepSaves, 30)
        XCTAssertEqual(c.lora.trigger, "wai_character")
        XCTAssertEqual(c.trainDataDir, "dataset/character")
        // The dataset: one flat-folder subset at the largest resolution, bucketed at both.
        let cfg = try c.datasetConfig(builtinFolder: URL(fileURLWithPath: "/unused"))
        XCTAssertEqual(cfg.subsets.count, 1)
        XCTAssertEqual(cfg.subsets[0].resolution, [768, 768])
        XCTAssertEqual(cfg.subsets[0].batchSize, 2)
        let buckets = c.bucketConfigs(for: cfg.subsets[0])
        XCTAssertEqual(buckets.map(\.width), [512, 768])
        let multi = try c.multiResolutionBucketing(for: cfg.subsets[0])
        let placements = multi.choose(width: 1000, height: 1500)
        XCTAssertEqual(placements.count, 2)
        XCTAssertNotNil(placements[0]); XCTAssertNotNil(placements[1])
    }

    // MARK: Sectioned and flat

    /// The seed's kohya file, sectioned as kohya_ss writes it, and the same keys flat: one config.
    func testSectionedAndFlatAreTheSame() throws {
        let sectioned = try TrainingConfig.load(toml: Self.configs.appendingPathComponent("illustrious-character.toml"))
        let text = try String(contentsOf: Self.configs.appendingPathComponent("illustrious-character.toml"), encoding: .utf8)
        let flatText = text.split(separator: "\n", omittingEmptySubsequences: false)
            .filter { !$0.hasPrefix("[") }.joined(separator: "\n")
        let flat = try parse(flatText, base: Self.configs)
        XCTAssertEqual(flat.fingerprint, sectioned.fingerprint)
        XCTAssertEqual(flat.outputDir, sectioned.outputDir)
        XCTAssertEqual(flat.saveEveryNEpochs, sectioned.saveEveryNEpochs)
        XCTAssertEqual(flat.notes, sectioned.notes)
        // Any section name is flattened (kohya's read_config_from_file does not look at names).
        let odd = try parse("[whatever]\n" + minimal + "[more]\nlearning_rate = 3e-4\n")
        XCTAssertEqual(odd.learningRate, 3e-4)
    }

    func testKeySetTwiceIsAnError() {
        let m = message { try self.parse("[a]\nlearning_rate = 1e-4\n[b]\nlearning_rate = 2e-4\n" + self.minimal) }
        XCTAssertTrue(m.contains("`learning_rate`") && m.contains("set twice"), m)
    }

    // MARK: Errors

    // kohya ignores keys its parser does not define; lora-dist warns (with a suggestion for a typo) and goes on —
    // refusing only under strict. Keys GUIs add share one line; [lora_dist] is lora-dist's own: a typo there stops.
    func testUnknownKeysWarnWithTheClosest() throws {
        var c = try parse(minimal + "learning_rte = 1e-4\n")
        XCTAssertTrue(c.warnings.contains { $0.contains("`learning_rte`") && $0.contains("did you mean `learning_rate`?") && $0.contains("ignored") }, "\(c.warnings)")
        c = try parse(minimal + "keep_step_save = 3\n")
        XCTAssertTrue(c.warnings.contains { $0.contains("did you mean `keep_step_saves` (in the [lora_dist] section)?") }, "\(c.warnings)")
        c = try parse(minimal + "zzzz_qqqq_xxxx = 1\n")
        XCTAssertTrue(c.warnings.contains { $0.contains("unknown key") && !$0.contains("did you mean") }, "\(c.warnings)")
        c = try parse(minimal + "sdxl = true\nepoch = 10\nnum_cpu_threads_per_process = 2\n")
        XCTAssertEqual(c.warnings.count, 1, "\(c.warnings)")
        XCTAssertTrue(c.warnings[0].hasPrefix("ignored GUI/front-end settings") && c.warnings[0].contains("epoch") && c.warnings[0].contains("sdxl"))
        var m = message { try self.parse(self.minimal + "learning_rte = 1e-4\n[lora_dist]\nstrict = true\n") }
        XCTAssertTrue(m.contains("strict mode") && m.contains("`learning_rte`"), m)
        m = message { try self.parse(self.minimal + "[lora_dist]\nwire_fromat = \"bf16\"\n") }
        XCTAssertTrue(m.contains("did you mean `wire_format`?"), m)
        m = message { try self.parse(self.minimal + "wire_format = \"bf16\"\n") }
        XCTAssertTrue(m.contains("move it into the [lora_dist] section"), m)
        m = message { try self.parse(self.minimal + "[lora_dist]\nlearning_rate = 1e-4\n") }
        XCTAssertTrue(m.contains("move it out of [lora_dist]"), m)
        // LoRA_Easy_Training_Scripts' UI format is named.
        m = message { try self.parse("[general_args.args]\npretrained_model_name_or_path = \"m\"\n[network_args.args]\nnetwork_dim = 8\n") }
        XCTAssertTrue(m.contains("LoRA_Easy_Training_Scripts' UI format"), m)
    }

    func testUnsupportedKohyaKeyIsNamed() {
        let m = message { try self.parse(self.minimal + "conditioning_data_dir = \"cond\"\n") }
        XCTAssertTrue(m.contains("`conditioning_data_dir` is a kohya option lora-dist does not implement"), m)
        XCTAssertTrue(m.contains("\"cond\"") && m.contains("remove it"), m)
        for (k, v) in [("v2", "true"), ("color_aug", "true"), ("lr_scheduler_type", "\"x.Y\""), ("huggingface_repo_id", "\"a/b\"")] {
            let m = message { try self.parse(self.minimal + "\(k) = \(v)\n") }
            XCTAssertTrue(m.contains("does not implement"), m)
        }
        // Values kohya has but lora-dist does not implement.
        for (k, v) in [("optimizer_type", "\"DAdaptAdam\""), ("lr_scheduler", "\"adafactor\""), ("save_model_as", "\"ckpt\""),
                       ("log_with", "\"wandb\""), ("network_module", "\"networks.dylora\"")] {
            let m = message { try self.parse(self.minimal + "\(k) = \(v)\n") }
            XCTAssertTrue(m.contains("`\(k)`"), m)
        }
    }

    // kohya GUIs write dozens of unimplemented options at values that ask for nothing: off, empty, kohya's own default,
    // or a part of a feature that is not switched on (upload settings without a repository). Those train, with one
    // compact note.
    func testUnsupportedKeysAtInertValuesAreIgnored() throws {
        let inert = ["v2 = false", "color_aug = false", "random_crop = false", "debug_dataset = false",
                     "weighted_captions = false", "dim_from_weights = false", "token_warmup_min = 1", "token_warmup_step = 0",
                     "lr_scheduler_args = []", "lr_scheduler_type = \"\"", "validation_split = 0", "huggingface_repo_id = \"\"",
                     "huggingface_token = \"hf_x\"", "async_upload = true", "masked_loss = false",
                     "save_last_n_steps_state = 1"]
        let c = try parse(minimal + inert.joined(separator: "\n") + "\n")
        let notes = c.warnings.filter { $0.hasPrefix("ignored, as they ask for nothing:") }
        XCTAssertEqual(notes.count, 1, "\(c.warnings)")
        XCTAssertEqual(c.warnings.count, 1, "one compact line: \(c.warnings)")
        for entry in inert { XCTAssertTrue(notes[0].contains(entry.components(separatedBy: " = ")[0]), entry) }
        // Every unsupported key written at kohya's own default (kohya_args.json) asks for nothing.
        for arg in try Self.kohyaArgs().arguments {
            guard case .unsupported = TrainingConfig.kohyaKeys[arg.name] else { continue }
            let value: String
            switch arg.default {
            case .bool(let b): value = String(b)
            case .number(let d): value = arg.type == "int" ? String(Int(d)) : String(d)
            case .string(let str): value = "\"\(str)\""
            default: continue
            }
            XCTAssertNoThrow(try parse(minimal + "\(arg.name) = \(value)\n"), "\(arg.name) = \(value)")
        }
        // The same features switched on are refused.
        for on in ["validation_split = 0.1", "huggingface_token = \"x\"\nhuggingface_repo_id = \"me/lora\"",
                   "token_warmup_step = 100", "v2 = true"] {
            XCTAssertTrue(message { try self.parse(self.minimal + on + "\n") }.contains("does not implement"), on)
        }
    }

    // configs/README.md carries the table of every kohya option, generated from `kohyaKeys`: equal to what the code
    // says now. To regenerate it: LORA_DIST_WRITE_KEY_TABLE=1 swift test --filter TrainingConfigTests/testReadmeKeyTable
    func testReadmeKeyTableIsGeneratedFromTheKeyTable() throws {
        let url = Self.configs.appendingPathComponent("README.md")
        var text = try String(contentsOf: url, encoding: .utf8)
        let begin = "<!-- kohya key table: generated from TrainingConfig.kohyaKeys by TrainingConfigTests -->\n"
        let end = "<!-- end of the generated key table -->"
        let start = try XCTUnwrap(text.range(of: begin), "configs/README.md lacks the key-table markers")
        let stop = try XCTUnwrap(text.range(of: end, range: start.upperBound..<text.endIndex))
        let table = TrainingConfig.keyTableMarkdown + "\n"
        if ProcessInfo.processInfo.environment["LORA_DIST_WRITE_KEY_TABLE"] == "1" {
            text.replaceSubrange(start.upperBound..<stop.lowerBound, with: table)
            try text.write(to: url, atomically: true, encoding: .utf8)
        }
        XCTAssertEqual(String(text[start.upperBound..<stop.lowerBound]), table,
                       "configs/README.md's key table is stale: regenerate it (see this test's comment)")
        XCTAssertEqual(table.split(separator: "\n").count, TrainingConfig.kohyaKeys.count + 2)
        XCTAssertTrue(table.contains("| `clip_skip` | ignored, with a warning |"), table)
    }

    // kohya warns that SDXL ignores clip_skip and trains; so does lora-dist.
    func testClipSkipIsANote() throws {
        let c = try parse(minimal + "clip_skip = 2\n")
        XCTAssertTrue(c.warnings.contains { $0.hasPrefix("clip_skip:") }, "\(c.warnings)")
    }

    // network_rank (GUIs' and guides' name) is read as network_dim with a note — kohya would silently ignore it and
    // train rank 4; disagreeing with network_dim is an error naming both.
    func testNetworkRankIsReadAsNetworkDim() throws {
        var c = try parse(minimal + "network_rank = 64\n")
        XCTAssertEqual(c.networkDim, 64)
        XCTAssertTrue(c.warnings.contains { $0.hasPrefix("network_rank = 64: read as network_dim") }, "\(c.warnings)")
        c = try parse(minimal + "network_rank = 32\nnetwork_dim = 32\n")
        XCTAssertEqual(c.networkDim, 32)
        let m = message { try self.parse(self.minimal + "network_rank = 64\nnetwork_dim = 32\n") }
        XCTAssertTrue(m.contains("network_rank") && m.contains("network_dim = 32") && m.contains("disagree"), m)
    }

    // sdxl_train.py's learning_rate_te1/te2 in a LoRA config: the text encoders' rates when text_encoder_lr is absent
    // (a note says so); with text_encoder_lr, a note that they are ignored, as kohya's LoRA trainer ignores them.
    func testPerEncoderLearningRates() throws {
        var c = try parse(minimal + "learning_rate = 1e-4\nlearning_rate_te1 = 1e-6\nlearning_rate_te2 = 2e-6\n")
        XCTAssertEqual(c.textEncoderLR, [1e-6, 2e-6])
        c = try parse(minimal + "learning_rate = 1e-4\nlearning_rate_te1 = 1e-6\n")
        XCTAssertEqual(c.textEncoderLR, [1e-6, 1e-4])
        c = try parse(minimal + "text_encoder_lr = 5e-5\nlearning_rate_te1 = 1e-6\n")
        XCTAssertEqual(c.textEncoderLR, [5e-5])
        XCTAssertTrue(c.warnings.contains { $0.contains("learning_rate_te1 = 1e-06") && $0.contains("text_encoder_lr applies") }, "\(c.warnings)")
    }

    func testRuntimeKeysAreAcceptedWithNotes() throws {
        let c = try parse(minimal + "xformers = true\nmax_data_loader_n_workers = 4\npersistent_data_loader_workers = true\nlowram = true\n")
        XCTAssertEqual(c.notes.count, 4)
        XCTAssertTrue(c.notes.allSatisfy { n in ["xformers", "max_data_loader_n_workers", "persistent_data_loader_workers", "lowram"].contains { n.hasPrefix($0 + ":") } }, "\(c.notes)")
    }

    func testTypeErrorsNameKeyValueAndType() {
        var m = message { try self.parse(self.minimal + "max_train_steps = \"many\"\n") }
        XCTAssertTrue(m.contains("`max_train_steps`") && m.contains("\"many\"") && m.contains("a string") && m.contains("an integer"), m)
        m = message { try self.parse(self.minimal + "max_train_steps = 100.5\n") }
        XCTAssertTrue(m.contains("a float") && m.contains("an integer"), m)
        m = message { try self.parse(self.minimal + "learning_rate = \"fast\"\n") }
        XCTAssertTrue(m.contains("`learning_rate`") && m.contains("a number"), m)
        m = message { try self.parse(self.minimal + "network_args = \"conv_dim=8\"\n") }
        XCTAssertTrue(m.contains("`network_args`") && m.contains("an array of strings"), m)
        m = message { try self.parse(self.minimal + "gradient_checkpointing = 1\n") }
        XCTAssertTrue(m.contains("true or false"), m)
        m = message { try self.parse(self.minimal + "[lora_dist]\nthreads_per_rank = \"4\"\n") }
        XCTAssertTrue(m.contains("`lora_dist.threads_per_rank`") && m.contains("an integer"), m)
        m = message { try self.parse(self.minimal + "[lora_dist]\nwire_format = \"fp16\"\n") }
        XCTAssertTrue(m.contains("\"fp16\"") && m.contains("\"bf16\""), m)
        m = message { try self.parse("pretrained_model_name_or_path = \"m\"\ntrain_data_dir = \"i\"\nresolution = \"big\"\n") }
        XCTAssertTrue(m.contains("`resolution`") && m.contains("\"W,H\""), m)
    }

    // kohya skips argparse's types for TOML values, and its code then uses them as Python does: a number in a string
    // works where kohya computes with it, "" and false where it tests `if args.x:`. Read the same, with a note.
    func testValuesAreReadAsKohyasCodeUsesThem() throws {
        let c = try parse(minimal + "max_grad_norm = \"1.0\"\nmax_train_steps = \"\"\nmax_train_epochs = 4\nresume = false\nlearning_rate = \"1e-4\"\n")
        XCTAssertEqual(c.maxGradNorm, 1.0)
        XCTAssertEqual(c.learningRate, 1e-4)
        XCTAssertEqual(c.maxTrainSteps, 1600, "\"\" is not set: the default (max_train_epochs decides)")
        XCTAssertEqual(c.maxTrainEpochs, 4)
        XCTAssertNil(c.resume)
        XCTAssertTrue(c.warnings.contains { $0.hasPrefix("max_grad_norm = \"1.0\": read as the number 1.0") }, "\(c.warnings)")
        XCTAssertTrue(c.warnings.contains { $0.hasPrefix("resume = false: treated as not set") }, "\(c.warnings)")
    }

    // max_token_length: any value kohya accepts, chunked as kohya chunks it (75-token chunks: 128 → 75, 255 → 225).
    func testMaxTokenLengthIsChunkedAsKohya() throws {
        for (n, want) in [(75, 75), (128, 75), (150, 150), (200, 150), (225, 225), (255, 225)] {
            XCTAssertEqual(try parse(minimal + "max_token_length = \(n)\n").maxTokenLength, want, "\(n)")
        }
        XCTAssertTrue(try parse(minimal + "max_token_length = 255\n").warnings.contains { $0.contains("gives 225 tokens") })
        XCTAssertTrue(message { try self.parse(self.minimal + "max_token_length = 50\n") }.contains("75-token chunks"))
    }

    // kohya's flag spellings next to the file (a launch script's `--dataset_config d.toml --optimizer_args a=1 b=2
    // --zero_terminal_snr`) and `--set key=value` override the file's values, wherever the file sets them.
    func testCommandLineOverridesTheFile() throws {
        let overrides = try TrainingConfig.commandLineOverrides(
            kohyaFlags: ["--optimizer_args", "weight_decay=0.1", "betas=0.9,0.99", "--zero_terminal_snr", "--max_train_steps", "50",
                         "--learning_rate=3e-4", "--output_name", "from-cli"],
            set: ["network_dim=32", "network_args=[\"conv_dim=4\"]"])
        let c = try TrainingConfig.parse(toml: minimal + "[training_arguments]\nmax_train_steps = 10\n[network_arguments]\nnetwork_dim = 8\n",
                                         source: "t.toml", baseDirectory: URL(fileURLWithPath: NSTemporaryDirectory()),
                                         overrides: overrides)
        XCTAssertEqual(c.optimizerArgs, ["weight_decay=0.1", "betas=0.9,0.99"])
        XCTAssertTrue(c.zeroTerminalSNR)
        XCTAssertEqual(c.maxTrainSteps, 50)
        XCTAssertEqual(c.learningRate, 3e-4)
        XCTAssertEqual(c.outputName, "from-cli")
        XCTAssertEqual(c.networkDim, 32)
        XCTAssertEqual(c.networkArgs, ["conv_dim=4"])
        XCTAssertThrowsError(try TrainingConfig.commandLineOverrides(kohyaFlags: ["stray"], set: []))
        XCTAssertThrowsError(try TrainingConfig.commandLineOverrides(kohyaFlags: [], set: ["output_name=unquoted text"]))
    }

    // train_data_dir = "" names the key (it used to surface as ": no usable image found").
    func testEmptyTrainDataDirIsNamed() {
        let m = message { try self.parse("pretrained_model_name_or_path = \"m\"\ntrain_data_dir = \"\"\nresolution = 512\n") }
        XCTAssertTrue(m.contains("`train_data_dir`") && m.contains("is not set"), m)
    }

    func testKohyaValueShapes() throws {
        // An integer where kohya declares float is a number in Python: accepted.
        XCTAssertEqual(try parse(minimal + "learning_rate = 1\n").learningRate, 1)
        // lr_warmup_steps: steps as an integer, a ratio as a float.
        XCTAssertEqual(try parse(minimal + "lr_warmup_steps = 50\n").lrWarmupSteps, 50)
        XCTAssertEqual(try parse(minimal + "lr_warmup_steps = 0.1\n").lrWarmupSteps, 0.1)
        XCTAssertTrue(message { try self.parse(self.minimal + "lr_warmup_steps = 1.5\n") }.contains("ratio"))
        // resolution: "W,H", "N", N or [W, H].
        XCTAssertEqual(try parse("pretrained_model_name_or_path = \"m\"\ntrain_data_dir = \"i\"\nresolution = \"768,1024\"\n").datasetArguments.resolution, [768, 1024])
        XCTAssertEqual(try parse("pretrained_model_name_or_path = \"m\"\ntrain_data_dir = \"i\"\nresolution = [640, 512]\n").datasetArguments.resolution, [640, 512])
        // text_encoder_lr: a number or kohya's per-encoder list [te1, te2].
        XCTAssertEqual(try parse(minimal + "text_encoder_lr = 1e-6\n").textEncoderLR, [1e-6])
        XCTAssertEqual(try parse(minimal + "text_encoder_lr = [5e-5, 1e-5]\n").textEncoderLR, [5e-5, 1e-5])
        XCTAssertNil(try parse(minimal + "text_encoder_lr = []\n").textEncoderLR)
        XCTAssertTrue(message { try self.parse(self.minimal + "text_encoder_lr = [5e-5, 1e-5, 1e-5]\n") }.contains("`text_encoder_lr`"))
        // kohya's legacy optimizer switch.
        XCTAssertEqual(try parse(minimal + "use_8bit_adam = true\n").optimizerType, "AdamW8bit")
        XCTAssertEqual(try parse(minimal + "optimizer_type = \"adamw8bit\"\n").optimizerType, "AdamW8bit")
        // kohya's old misspelling.
        XCTAssertEqual(try parse(minimal + "caption_extention = \".txt\"\n").datasetArguments.captionExtension, ".txt")
    }

    func testMissingModelOrDataset() {
        XCTAssertTrue(message { try self.parse("train_data_dir = \"i\"\n") }.contains("`pretrained_model_name_or_path`"))
        XCTAssertTrue(message { try self.parse("pretrained_model_name_or_path = \"m\"\n") }.contains("dataset_config"))
        XCTAssertTrue(message { try self.parse("pretrained_model_name_or_path = \"m\"\ntrain_data_dir = \"i\"\n").datasetConfig(builtinFolder: URL(fileURLWithPath: "/x")) }
            .contains("`resolution`"))
    }

    // MARK: Network args

    func testNetworkArgs() throws {
        var c = try parse(minimal + "network_dim = 32\nnetwork_alpha = 16\nnetwork_args = [\"conv_dim=4\", \"rank_dropout=0.1\", \"module_dropout=0.05\"]\nnetwork_dropout = 0.2\n")
        XCTAssertEqual(try c.networkOptions, NetworkOptions(linearDim: 32, linearAlpha: 16, convDim: 4, convAlpha: 1.0,
                                                             dropout: 0.2, rankDropout: 0.1, moduleDropout: 0.05,
                                                             trainUNet: true, trainTextEncoder: true))
        // As kohya's create_network: args it does not read are ignored (a warning, with a suggestion), `dropout` in
        // network_args included (networks.lora reads network_dropout); unimplemented ones that change training stop.
        c = try parse(minimal + "network_args = [\"conv_dimm=4\", \"dropout=0.1\", \"algo=lokr\"]\n")
        XCTAssertEqual(try c.networkOptions.dropout, nil)
        XCTAssertEqual(try c.networkOptions.convDim, nil)
        XCTAssertTrue(c.warnings.contains { $0.contains("conv_dimm") && $0.contains("did you mean conv_dim?") }, "\(c.warnings)")
        XCTAssertTrue(c.warnings.contains { $0.contains("dropout=0.1") && $0.contains("network_dropout") }, "\(c.warnings)")
        XCTAssertTrue(c.warnings.contains { $0.contains("algo=lokr") }, "\(c.warnings)")
        c.networkArgs = ["block_dims=2,4,8"]
        XCTAssertTrue(message { try c.networkOptions }.contains("does not implement"))
        c.networkArgs = ["conv_dim"]
        XCTAssertTrue(message { try c.networkOptions }.contains("key=value"))
        // LyCORIS's lycoris.kohya with algo=lora/locon is kohya's LoRA/LoCon math with LyCORIS's defaults (the "full"
        // preset adapts the ResBlock convs, conv_dim/conv_alpha default to network_dim/alpha; lycoris/kohya.py);
        // other algorithms and variant switches are named.
        c = try parse(minimal + "network_module = \"lycoris.kohya\"\nnetwork_dim = 16\nnetwork_alpha = 8\nnetwork_args = [\"algo=lora\", \"use_tucker=False\"]\n")
        XCTAssertEqual(try c.networkOptions, NetworkOptions(linearDim: 16, linearAlpha: 8, convDim: 16, convAlpha: 8,
                                                             trainUNet: true, trainTextEncoder: true))
        c.networkArgs = ["algo=locon", "conv_dim=8", "conv_alpha=4"]
        XCTAssertEqual(try c.networkOptions.convDim, 8)
        XCTAssertEqual(try c.networkOptions.convAlpha, 4)
        c.networkArgs = ["algo=lokr"]
        XCTAssertTrue(message { try c.networkOptions }.contains("algo=lokr"))
        c.networkArgs = ["algo=locon", "use_tucker=True"]
        XCTAssertTrue(message { try c.networkOptions }.contains("use_tucker=True"))
        // text_encoder_lr = 0: kohya skips the text encoders' groups (their modules never move): UNet-only.
        c = try parse(minimal + "text_encoder_lr = 0\n")
        XCTAssertFalse(try c.networkOptions.trainTextEncoder)
        XCTAssertTrue(c.warnings.contains { $0.hasPrefix("text_encoder_lr = 0") }, "\(c.warnings)")
        XCTAssertTrue(try parse(minimal + "text_encoder_lr = [0, 1e-5]\n").networkOptions.trainTextEncoder)
    }

    // MARK: dataset_config

    /// A dataset TOML named relative to the training TOML's folder, with kohya's argparse level filling what it
    /// leaves unset (BlueprintGenerator: subset < dataset < [general] < training arguments).
    func testDatasetConfigRelativePathAndCascade() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("lora-dist-cfg-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        try FileManager.default.createDirectory(at: dir.appendingPathComponent("sub"), withIntermediateDirectories: true)
        try """
            [general]
            shuffle_caption = true

            [[datasets]]
            batch_size = 4
              [[datasets.subsets]]
              image_dir = "a"
              caption_extension = ".caption"

            [[datasets]]
              [[datasets.subsets]]
              image_dir = "b"
              num_repeats = 3
            """.write(to: dir.appendingPathComponent("sub/data.toml"), atomically: true, encoding: .utf8)
        try """
            [model_arguments]
            pretrained_model_name_or_path = "m.safetensors"
            [dataset_arguments]
            dataset_config = "sub/data.toml"
            resolution = 640
            caption_extension = ".txt"
            shuffle_caption = false
            [training_arguments]
            train_batch_size = 2
            dataset_repeats = 5
            """.write(to: dir.appendingPathComponent("train.toml"), atomically: true, encoding: .utf8)
        let c = try TrainingConfig.load(toml: dir.appendingPathComponent("train.toml"))
        XCTAssertEqual(c.datasetConfigPath, dir.appendingPathComponent("sub/data.toml").standardizedFileURL.path)
        let d = try c.datasetConfig(builtinFolder: dir)
        XCTAssertEqual(d.datasets.count, 2)
        let a = d.datasets[0][0], b = d.datasets[1][0]
        XCTAssertEqual(a.batchSize, 4)            // the dataset's own
        XCTAssertEqual(b.batchSize, 2)            // train_batch_size
        XCTAssertEqual(a.resolution, [640, 640])  // from the training TOML for both
        XCTAssertEqual(b.resolution, [640, 640])
        XCTAssertEqual(a.captionExtension, ".caption")  // the subset's own
        XCTAssertEqual(b.captionExtension, ".txt")
        XCTAssertTrue(a.shuffleCaption)           // [general] wins over the argparse level
        XCTAssertTrue(b.shuffleCaption)
        XCTAssertEqual(a.numRepeats, 5)           // dataset_repeats
        XCTAssertEqual(b.numRepeats, 3)
        XCTAssertEqual(c.dataset?.datasets.count, 2, "load resolves a dataset TOML that exists")
        // A dataset_config that does not exist: parsing works, resolving the dataset says which file is missing.
        let missing = try parse(minimal + "dataset_config = \"nope.toml\"\n", base: dir)
        let m = message { try missing.datasetConfig(builtinFolder: dir) }
        XCTAssertTrue(m.contains("nope.toml") && m.contains("no such file"), m)
    }

    func testTrainDataDirKohyaFolders() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("lora-dist-img-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: dir) }
        for sub in ["img/10_character_name", "img/2_style", "reg/1_person"] {
            try FileManager.default.createDirectory(at: dir.appendingPathComponent(sub), withIntermediateDirectories: true)
        }
        let c = try parse("""
            pretrained_model_name_or_path = "m"
            train_data_dir = "\(dir.path)/img"
            reg_data_dir = "\(dir.path)/reg"
            resolution = "1024,1024"
            enable_bucket = true
            max_bucket_reso = 2048
            dataset_repeats = 7
            prior_loss_weight = 0.5
            """)
        let subsets = try c.datasetConfig(builtinFolder: dir).subsets
        XCTAssertEqual(subsets.map(\.numRepeats), [10, 2, 1])   // the folder's prefix wins (subset level)
        XCTAssertEqual(subsets.map(\.classTokens), ["character_name", "style", "person"])
        XCTAssertEqual(subsets.map(\.isReg), [false, false, true])
        XCTAssertTrue(subsets.allSatisfy { $0.enableBucket && $0.maxBucketReso == 2048 && $0.priorLossWeight == 0.5 })
        // Bucket settings that cannot work fail when the dataset is resolved, naming the key.
        let m = message { try self.parse(self.minimal + "enable_bucket = true\nmin_bucket_reso = 768\n").datasetConfig(builtinFolder: dir) }
        XCTAssertTrue(m.contains("`resolution`") && m.contains("min_bucket_reso 768"), m)
    }

    // MARK: Fingerprint

    func testFingerprint() throws {
        let base = try parse(minimal + "learning_rate = 1e-4\noutput_dir = \"out\"\n")
        XCTAssertEqual(base.fingerprint, try parse(minimal + "learning_rate = 1e-4\noutput_dir = \"out\"\n").fingerprint)
        XCTAssertEqual(base.fingerprint.count, 64)
        XCTAssertNotEqual(base.fingerprint, try parse(minimal + "learning_rate = 2e-4\noutput_dir = \"out\"\n").fingerprint)
        XCTAssertNotEqual(base.fingerprint, try parse(minimal + "learning_rate = 1e-4\noutput_dir = \"out\"\nseed = 1\n").fingerprint)
        XCTAssertNotEqual(base.fingerprint, try parse(minimal + "learning_rate = 1e-4\noutput_dir = \"out\"\nnetwork_dim = 8\n").fingerprint)
        for same in ["output_dir = \"elsewhere\"", "output_dir = \"out\"\nsave_every_n_steps = 10",
                     "output_dir = \"out\"\nmax_train_steps = 99", "output_dir = \"out\"\n[lora_dist]\nlog_every = 3"] {
            XCTAssertEqual(base.fingerprint, try parse(minimal + "learning_rate = 1e-4\n" + same + "\n").fingerprint, same)
        }
    }
}

/// Issue 13, items 5 and 6: kohya traps that used to train silently.
extension TrainingConfigTests {
    // kohya networks/lora.py LoRAModule.__init__: `alpha = self.lora_dim if alpha is None or alpha == 0 else alpha`
    // (read in sd-scripts; the same line in LyCORIS's LoConModule): alpha 0 means alpha = rank, not a LoRA that does
    // nothing (scale 0 kept every lora_up at 0).
    func testNetworkAlphaZeroMeansAlphaEqualsRank() throws {
        let c = try parse(minimal + "network_dim = 8\nnetwork_alpha = 0\nnetwork_args = [\"conv_dim=4\", \"conv_alpha=0\"]\n")
        let net = try c.networkOptions
        XCTAssertEqual(net.linearAlpha, 8)
        XCTAssertEqual(net.convAlpha, 4)
        XCTAssertTrue(c.notes.contains { $0.contains("network_alpha = 0: read as network_alpha = network_dim (8)") }, "\(c.notes)")
    }

    func testLearningRateZeroIsSaidAtStart() throws {
        let c = try parse(minimal + "learning_rate = 0\n")
        XCTAssertTrue(c.warnings.contains { $0.contains("learning_rate = 0") && $0.contains("will not change") }, "\(c.warnings)")
        let trains = try parse(minimal + "learning_rate = 0\nunet_lr = 1e-4\n")
        XCTAssertFalse(trains.warnings.contains { $0.contains("learning_rate = 0") }, "\(trains.warnings)")
    }
}
