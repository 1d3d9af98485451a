import Dataset
import Foundation

/// One implemented kohya training argument: the TOML kind it takes, how it sets the config (with kohya's checks),
/// what kohya's argparse namespace would hold (`kohyaValue(of:)`: the defaults test, metadata), and whether a resumed
/// run must see it unchanged (the fingerprint). `TrainingConfig.fields` is THE table: a key is one entry there plus its
/// field in TrainingConfig.
struct ConfigField {
    let key: String
    let kind: ValueKind
    /// Part of the resume fingerprint (model, data, network, optimizer, schedule, noise and loss settings; not
    /// output paths, cadences, logging, caching switches or the run's length).
    let fingerprinted: Bool
    let read: (TrainingConfig) -> KohyaValue
    /// (config, value of `kind`, the training TOML's folder).
    let apply: (inout TrainingConfig, KohyaValue, URL) throws -> Void

    /// What a value must be, beyond its kind.
    enum Check { case any, atLeastOne, nonNegative, positive }

    static func check(_ d: Double, _ c: Check, _ key: String, _ config: TrainingConfig) throws -> Double {
        switch c {
        case .nonNegative: guard d >= 0, d.isFinite else { throw config.error(key, "is \(d); it must be a finite number ≥ 0") }
        case .positive: guard d > 0 else { throw config.error(key, "is \(d); it must be > 0") }
        case .atLeastOne: guard d >= 1 else { throw config.error(key, "is \(Int(d)); it must be at least 1") }
        case .any: break
        }
        return d
    }

    static func flag(_ key: String, _ path: WritableKeyPath<TrainingConfig, Bool>, fingerprinted: Bool = false) -> ConfigField {
        ConfigField(key: key, kind: .bool, fingerprinted: fingerprinted, read: { .bool($0[keyPath: path]) },
                    apply: { c, v, _ in if case .bool(let b) = v { c[keyPath: path] = b } })
    }

    static func int(_ key: String, _ path: WritableKeyPath<TrainingConfig, Int>, _ check: Check = .any,
                    fingerprinted: Bool = false) -> ConfigField {
        ConfigField(key: key, kind: .int, fingerprinted: fingerprinted, read: { .int($0[keyPath: path]) },
                    apply: { c, v, _ in if case .int(let i) = v { c[keyPath: path] = Int(try Self.check(Double(i), check, key, c)) } })
    }

    static func int(_ key: String, _ path: WritableKeyPath<TrainingConfig, Int?>, _ check: Check = .any,
                    fingerprinted: Bool = false) -> ConfigField {
        ConfigField(key: key, kind: .int, fingerprinted: fingerprinted, read: { $0[keyPath: path].map { .int($0) } ?? .null },
                    apply: { c, v, _ in if case .int(let i) = v { c[keyPath: path] = Int(try Self.check(Double(i), check, key, c)) } })
    }

    static func number(_ key: String, _ path: WritableKeyPath<TrainingConfig, Double>, _ check: Check = .any,
                       fingerprinted: Bool = false) -> ConfigField {
        ConfigField(key: key, kind: .float, fingerprinted: fingerprinted, read: { .float($0[keyPath: path]) },
                    apply: { c, v, _ in if case .float(let d) = v { c[keyPath: path] = try Self.check(d, check, key, c) } })
    }

    static func number(_ key: String, _ path: WritableKeyPath<TrainingConfig, Double?>, _ check: Check = .any,
                       fingerprinted: Bool = false) -> ConfigField {
        ConfigField(key: key, kind: .float, fingerprinted: fingerprinted, read: { $0[keyPath: path].map { .float($0) } ?? .null },
                    apply: { c, v, _ in if case .float(let d) = v { c[keyPath: path] = try Self.check(d, check, key, c) } })
    }

    /// A string, one of `choices` when given (kohya's argparse choices).
    static func text(_ key: String, _ path: WritableKeyPath<TrainingConfig, String>, choices: [String]? = nil,
                     fingerprinted: Bool = false) -> ConfigField {
        ConfigField(key: key, kind: .string, fingerprinted: fingerprinted, read: { .string($0[keyPath: path]) },
                    apply: { c, v, _ in if case .string(let s) = v { c[keyPath: path] = try Self.choose(s, choices, key, c) } })
    }

    /// An optional string; "" is unset (kohya tests these with `if args.x:`).
    static func text(_ key: String, _ path: WritableKeyPath<TrainingConfig, String?>, choices: [String]? = nil,
                     fingerprinted: Bool = false) -> ConfigField {
        ConfigField(key: key, kind: .string, fingerprinted: fingerprinted, read: { $0[keyPath: path].map { .string($0) } ?? .null },
                    apply: { c, v, _ in
                        guard case .string(let s) = v else { return }
                        c[keyPath: path] = s.isEmpty ? nil : try Self.choose(s, choices, key, c)
                    })
    }

    /// kohya's sample_every_n_steps / _epochs: ≤ 0 turns sampling off (verify_training_args warns and sets None).
    static func sampleCadence(_ key: String, _ path: WritableKeyPath<TrainingConfig, Int?>) -> ConfigField {
        ConfigField(key: key, kind: .int, fingerprinted: false, read: { $0[keyPath: path].map { .int($0) } ?? .null },
                    apply: { c, v, _ in
                        guard case .int(let i) = v else { return }
                        if i < 0 { c.warnings.append("\(key) = \(i): sampling on this cadence is off (kohya disables it too)") }
                        c[keyPath: path] = i > 0 ? i : nil
                    })
    }

    static func choose(_ s: String, _ choices: [String]?, _ key: String, _ c: TrainingConfig) throws -> String {
        guard let choices, !choices.contains(s) else { return s }
        throw c.error(key, "= \"\(s)\" is not one of \(choices.map { "\"\($0)\"" }.joined(separator: ", "))")
    }

    static func strings(_ key: String, _ path: WritableKeyPath<TrainingConfig, [String]>, fingerprinted: Bool = false,
                        validate: @escaping (String, TrainingConfig) throws -> Void = { _, _ in }) -> ConfigField {
        ConfigField(key: key, kind: .strings, fingerprinted: fingerprinted,
                    read: { $0[keyPath: path].isEmpty ? .null : .strings($0[keyPath: path]) },
                    apply: { c, v, _ in
                        guard case .strings(let a) = v else { return }
                        for s in a { try validate(s, c) }
                        c[keyPath: path] = a
                    })
    }
}

extension TrainingConfig {
    /// Every implemented kohya training argument (sdxl_train_network.py), by key.
    static let fields: [String: ConfigField] = {
        typealias F = ConfigField
        var all: [ConfigField] = [
            // [model_arguments]
            F(key: "pretrained_model_name_or_path", kind: .string, fingerprinted: true,
              read: { $0.pretrainedModelNameOrPath.isEmpty ? .null : .string($0.pretrainedModelNameOrPath) },
              apply: { c, v, _ in if case .string(let s) = v { c.pretrainedModelNameOrPath = s } }),
            .flag("v_parameterization", \.vParameterization, fingerprinted: true),
            .text("vae", \.vae, fingerprinted: true),

            // [dataset_arguments] (the flat dataset arguments are `datasetArgumentFields`)
            F(key: "dataset_config", kind: .string, fingerprinted: true, read: { $0.datasetConfigPath.map { .string($0) } ?? .null },
              apply: { c, v, base in
                  guard case .string(let path) = v else { return }
                  let relative = URL(fileURLWithPath: path, relativeTo: base).standardizedFileURL
                  let fm = FileManager.default
                  if path.hasPrefix("/") || fm.fileExists(atPath: relative.path) || !fm.fileExists(atPath: path) {
                      c.datasetConfigPath = path.hasPrefix("/") ? path : relative.path
                  } else {
                      // kohya reads it relative to the current directory; lora-dist first tries the TOML's folder.
                      c.datasetConfigPath = URL(fileURLWithPath: path).standardizedFileURL.path
                      c.notes.append("dataset_config: \(path) is not next to \(c.sourceFile); using \(c.datasetConfigPath!) (relative to the current directory, as kohya reads it)")
                  }
              }),
            .text("train_data_dir", \.trainDataDir, fingerprinted: true),
            .text("reg_data_dir", \.regDataDir, fingerprinted: true),
            .text("in_json", \.inJSON, fingerprinted: true),
            .flag("cache_latents", \.cacheLatents),
            .flag("cache_latents_to_disk", \.cacheLatentsToDisk),
            .flag("cache_text_encoder_outputs", \.cacheTextEncoderOutputs),
            .flag("cache_text_encoder_outputs_to_disk", \.cacheTextEncoderOutputsToDisk),
            F(key: "max_token_length", kind: .int, fingerprinted: true,
              read: { $0.maxTokenLength == 75 ? .null : .int($0.maxTokenLength) },
              apply: { c, v, _ in
                  // kohya takes any value from a TOML (argparse's choices 150/225 do not apply there): it tokenises
                  // to n + 2 ids and cuts them into 75-token chunks at 1, 76, 151, … below n − 73 (library/
                  // strategy_base.py _get_input_ids), each closed by the sequence's last id — the same ids as
                  // 75 · ⌈(n − 74) / 75⌉ = 75 · ⌊n / 75⌋ tokens (128 → 75, 255 → 225).
                  guard case .int(let n) = v else { return }
                  guard n >= 75 else {
                      throw c.error("max_token_length", "= \(n): lora-dist encodes captions in 75-token chunks; use 75 (or leave it out), 150 or 225")
                  }
                  let chunks = n / 75
                  c.maxTokenLength = 75 * chunks
                  if ![75, 150, 225].contains(n) {
                      c.warnings.append("max_token_length = \(n): kohya's chunking gives \(75 * chunks) tokens (\(chunks) chunk\(chunks == 1 ? "" : "s") of 75); so does lora-dist")
                  }
              }),

            // [training_arguments]
            .text("output_dir", \.outputDir),
            .text("output_name", \.outputName),
            F(key: "save_model_as", kind: .string, fingerprinted: false, read: { .string($0.saveModelAs) },
              apply: { c, v, _ in
                  guard case .string(let s) = v else { return }
                  guard s == "safetensors" else {
                      throw c.error("save_model_as", "= \"\(s)\": lora-dist writes only \"safetensors\" (kohya's .ckpt/.pt are pickles) — use \"safetensors\"")
                  }
                  c.saveModelAs = s
              }),
            .text("save_precision", \.savePrecision, choices: ["float", "fp16", "bf16"]),
            .int("save_every_n_epochs", \.saveEveryNEpochs, .atLeastOne),
            .int("save_every_n_steps", \.saveEveryNSteps, .atLeastOne),
            .int("save_last_n_steps", \.saveLastNSteps, .atLeastOne),
            .int("save_last_n_epochs", \.saveLastNEpochs, .atLeastOne),
            .flag("save_state", \.saveState),
            .text("sample_prompts", \.samplePrompts),
            .flag("sample_at_first", \.sampleAtFirst),
            .text("sample_sampler", \.sampleSampler),
            F.sampleCadence("sample_every_n_steps", \.sampleEveryNSteps),
            F.sampleCadence("sample_every_n_epochs", \.sampleEveryNEpochs),
            .flag("save_state_on_train_end", \.saveStateOnTrainEnd),
            .text("resume", \.resume),
            // kohya: train_batch_size is also the dataset's batch_size (its argparse level).
            F(key: "train_batch_size", kind: .int, fingerprinted: true, read: { .int($0.trainBatchSize) },
              apply: { c, v, _ in
                  guard case .int(let n) = v else { return }
                  guard n >= 1 else { throw c.error("train_batch_size", "is \(n); it must be at least 1") }
                  c.trainBatchSize = n
                  c.datasetArguments.batchSize = n
                  c.datasetArgumentKeys.insert("batch_size")
              }),
            .int("max_train_steps", \.maxTrainSteps, .atLeastOne),
            .int("max_train_epochs", \.maxTrainEpochs, .atLeastOne),
            .int("gradient_accumulation_steps", \.gradientAccumulationSteps, .atLeastOne, fingerprinted: true),
            .flag("gradient_checkpointing", \.gradientCheckpointing),
            // What it means for the engine: TrainingConfig.useKernelFamily (said at start, with the fallback where the CPU
            // lacks bf16). Not fingerprinted: a run may resume in another precision.
            F(key: "mixed_precision", kind: .string, fingerprinted: false, read: { .string($0.mixedPrecision) },
              apply: { c, v, _ in
                  guard case .string(let s) = v else { return }
                  c.mixedPrecision = try F.choose(s, ["no", "fp16", "bf16"], "mixed_precision", c)
              }),
            .flag("no_half_vae", \.noHalfVAE),
            .int("seed", \.seed, fingerprinted: true),

            // [optimizer_arguments]
            .number("learning_rate", \.learningRate, .nonNegative, fingerprinted: true),
            .number("unet_lr", \.unetLR, .nonNegative, fingerprinted: true),
            F(key: "text_encoder_lr", kind: .floatOrFloats, fingerprinted: true, read: { $0.textEncoderLR.map { .floats($0) } ?? .null },
              apply: { c, v, _ in
                  // kohya (nargs="*"): none or [] = learning_rate; one number for both encoders; [te1, te2].
                  guard case .floats(let lrs) = v else { return }
                  guard lrs.count <= 2 else {
                      throw c.error("text_encoder_lr", "= \(lrs): SDXL has two text encoders — give one rate, or [te1, te2]")
                  }
                  c.textEncoderLR = lrs.isEmpty ? nil : try lrs.map { try F.check($0, .nonNegative, "text_encoder_lr", c) }
              }),
            F(key: "lr_scheduler", kind: .string, fingerprinted: true, read: { .string($0.lrScheduler) },
              apply: { c, v, _ in
                  guard case .string(let s) = v else { return }
                  guard schedulers.contains(s) else {
                      throw c.error("lr_scheduler", "= \"\(s)\": lora-dist implements \(schedulers.joined(separator: ", ")) — pick one of those")
                  }
                  c.lrScheduler = s
              }),
            F(key: "lr_warmup_steps", kind: .intOrFloat, fingerprinted: true,
              read: { $0.lrWarmupSteps < 1 && $0.lrWarmupSteps > 0 ? .float($0.lrWarmupSteps) : .int(Int($0.lrWarmupSteps)) },
              apply: { c, v, _ in
                  switch v {
                  case .int(let n):
                      guard n >= 0 else { throw c.error("lr_warmup_steps", "is \(n); it must be ≥ 0") }
                      c.lrWarmupSteps = Double(n)
                  case .float(let r):
                      // kohya: a float is a ratio of the total steps (int(ratio * steps)); ≥ 1 would be more warmup than run.
                      guard r >= 0, r < 1 else {
                          throw c.error("lr_warmup_steps", "= \(r): a float is a ratio of max_train_steps and must be in [0, 1); write an integer for a number of steps")
                      }
                      c.lrWarmupSteps = r
                  default: break
                  }
              }),
            .int("lr_scheduler_num_cycles", \.lrSchedulerNumCycles, .atLeastOne, fingerprinted: true),
            .number("lr_scheduler_power", \.lrSchedulerPower, fingerprinted: true),
            F(key: "optimizer_type", kind: .string, fingerprinted: true, read: { .string($0.optimizerType) },
              apply: { c, v, _ in
                  // kohya lower-cases optimizer_type before matching; "" means AdamW (its default).
                  guard case .string(let s) = v else { return }
                  if s.isEmpty { c.optimizerType = "AdamW"; return }
                  guard let name = optimizers[s.lowercased()] else {
                      throw c.error("optimizer_type", "= \"\(s)\": lora-dist implements \(optimizers.values.sorted().joined(separator: ", ")) — pick one of those")
                  }
                  c.optimizerType = name
              }),
            .strings("optimizer_args", \.optimizerArgs, fingerprinted: true) { a, c in
                guard a.split(separator: "=", omittingEmptySubsequences: false).count >= 2 else {
                    throw c.error("optimizer_args", "entry \"\(a)\" is not key=value (e.g. \"weight_decay=0.01\")")
                }
            },
            // The legacy switches: the loader reads them (they pick optimizer_type when it is not given).
            F(key: "use_8bit_adam", kind: .bool, fingerprinted: false, read: { _ in .bool(false) }, apply: { _, _, _ in }),
            F(key: "use_lion_optimizer", kind: .bool, fingerprinted: false, read: { _ in .bool(false) }, apply: { _, _, _ in }),
            .number("max_grad_norm", \.maxGradNorm, .nonNegative, fingerprinted: true),

            // Noise and loss.
            .number("noise_offset", \.noiseOffset, fingerprinted: true),
            .flag("noise_offset_random_strength", \.noiseOffsetRandomStrength, fingerprinted: true),
            .number("adaptive_noise_scale", \.adaptiveNoiseScale, fingerprinted: true),
            .int("multires_noise_iterations", \.multiresNoiseIterations, .atLeastOne, fingerprinted: true),
            .number("multires_noise_discount", \.multiresNoiseDiscount, fingerprinted: true),
            .number("ip_noise_gamma", \.ipNoiseGamma, fingerprinted: true),
            .flag("ip_noise_gamma_random_strength", \.ipNoiseGammaRandomStrength, fingerprinted: true),
            F(key: "min_snr_gamma", kind: .float, fingerprinted: true, read: { $0.minSNRGamma.map { .float($0) } ?? .null },
              apply: { c, v, _ in
                  guard case .float(let d) = v else { return }
                  guard d > 0 else { throw c.error("min_snr_gamma", "is \(d); it must be > 0 (kohya's papers use 1 to 5)") }
                  c.minSNRGamma = d
              }),
            .flag("debiased_estimation_loss", \.debiasedEstimationLoss, fingerprinted: true),
            .flag("scale_v_pred_loss_like_noise_pred", \.scaleVPredLossLikeNoisePred, fingerprinted: true),
            .number("v_pred_like_loss", \.vPredLikeLoss, fingerprinted: true),
            .flag("zero_terminal_snr", \.zeroTerminalSNR, fingerprinted: true),
            .int("min_timestep", \.minTimestep, fingerprinted: true),
            .int("max_timestep", \.maxTimestep, fingerprinted: true),
            .text("loss_type", \.lossType, choices: ["l1", "l2", "huber", "smooth_l1"], fingerprinted: true),
            .text("huber_schedule", \.huberSchedule, choices: ["constant", "exponential", "snr"], fingerprinted: true),
            .number("huber_c", \.huberC, fingerprinted: true),
            .number("huber_scale", \.huberScale, fingerprinted: true),

            // Logging.
            F(key: "log_with", kind: .string, fingerprinted: false, read: { $0.logWith.map { .string($0) } ?? .null },
              apply: { c, v, _ in
                  guard case .string(let s) = v else { return }
                  guard s == "tensorboard" else {
                      throw c.error("log_with", "= \"\(s)\": lora-dist logs to TensorBoard event files and JSONL only (no wandb) — use \"tensorboard\" or remove it")
                  }
                  c.logWith = s
              }),
            .text("logging_dir", \.loggingDir),
            .text("log_prefix", \.logPrefix),

            // [network_arguments]
            F(key: "network_module", kind: .string, fingerprinted: true, read: { .string($0.networkModule) },
              apply: { c, v, _ in
                  guard case .string(let s) = v else { return }
                  guard s == "networks.lora" || s == "lycoris.kohya" else {
                      throw c.error("network_module", "= \"\(s)\": lora-dist trains kohya's networks.lora (LoRA, and LoCon via network_args conv_dim), and LyCORIS's lycoris.kohya with algo=lora or locon (the same math) — use one of those")
                  }
                  c.networkModule = s
              }),
            .int("network_dim", \.networkDim, .atLeastOne, fingerprinted: true),
            .number("network_alpha", \.networkAlpha, fingerprinted: true),
            .number("network_dropout", \.networkDropout, fingerprinted: true),
            .strings("network_args", \.networkArgs, fingerprinted: true),
            .text("network_weights", \.networkWeights, fingerprinted: true),
            .flag("network_train_unet_only", \.networkTrainUnetOnly, fingerprinted: true),
            .flag("network_train_text_encoder_only", \.networkTrainTextEncoderOnly, fingerprinted: true),

            // Metadata.
            .text("training_comment", \.trainingComment),
            .flag("no_metadata", \.noMetadata),
        ]
        // kohya's --metadata_* (sai_model_spec overrides), one string each.
        for name in ["title", "author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from",
                     "trigger_phrase", "preprocessor", "is_negative_embedding"] {
            all.append(F(key: "metadata_" + name, kind: .string, fingerprinted: false,
                         read: { $0.modelSpecMetadata[name].map { .string($0) } ?? .null },
                         apply: { c, v, _ in if case .string(let s) = v { c.modelSpecMetadata[name] = s } }))
        }
        return Dictionary(uniqueKeysWithValues: all.map { ($0.key, $0) })
    }()

    static let optimizers = ["adamw": "AdamW", "adamw8bit": "AdamW8bit", "lion": "Lion", "prodigy": "Prodigy",
                             "adafactor": "Adafactor"]
    static let schedulers = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
}

/// One of kohya's flat dataset arguments (add_dataset_arguments): the dataset's argparse level, a `SubsetConfig` field
/// under the dataset-config name it stands for (kohya's ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME renames two). Applying it
/// sets `datasetArguments`; `copy` carries it to the subsets whose own levels leave it unset.
struct DatasetArgumentField {
    let key: String
    let configName: String
    let kind: ValueKind
    let read: (SubsetConfig) -> KohyaValue
    let apply: (inout SubsetConfig, KohyaValue, TrainingConfig) throws -> Void
    let copy: (SubsetConfig, inout SubsetConfig) -> Void

    static func make<T>(_ key: String, _ kind: ValueKind, _ path: WritableKeyPath<SubsetConfig, T>, configName: String? = nil,
                        read: @escaping (T) -> KohyaValue, value: @escaping (KohyaValue) -> T?,
                        check: @escaping (T, TrainingConfig) throws -> Void = { _, _ in }) -> DatasetArgumentField {
        DatasetArgumentField(key: key, configName: configName ?? key, kind: kind, read: { read($0[keyPath: path]) },
                             apply: { s, v, c in
                                 guard let t = value(v) else { return }
                                 try check(t, c)
                                 s[keyPath: path] = t
                             },
                             copy: { from, to in to[keyPath: path] = from[keyPath: path] })
    }
    static func flag(_ key: String, _ path: WritableKeyPath<SubsetConfig, Bool>) -> Self {
        make(key, .bool, path, read: { .bool($0) }, value: { if case .bool(let b) = $0 { return b }; return nil })
    }
    static func int(_ key: String, _ path: WritableKeyPath<SubsetConfig, Int>, configName: String? = nil, atLeast: Int? = nil) -> Self {
        make(key, .int, path, configName: configName, read: { .int($0) }, value: { if case .int(let i) = $0 { return i }; return nil },
             check: { n, c in
                 if let low = atLeast, n < low { throw c.error(key, "is \(n); it must be at least \(low)") }
             })
    }
    static func number(_ key: String, _ path: WritableKeyPath<SubsetConfig, Double>) -> Self {
        make(key, .float, path, read: { .float($0) }, value: { if case .float(let d) = $0 { return d }; return nil })
    }
    static func text(_ key: String, _ path: WritableKeyPath<SubsetConfig, String>) -> Self {
        make(key, .string, path, read: { .string($0) }, value: { if case .string(let s) = $0 { return s }; return nil })
    }
    static func optionalText(_ key: String, _ path: WritableKeyPath<SubsetConfig, String?>) -> Self {
        make(key, .string, path, read: { $0.map { .string($0) } ?? .null },
             value: { if case .string(let s) = $0 { return .some(s) }; return nil })
    }
}

extension TrainingConfig {
    /// kohya's flat dataset arguments, by key.
    static let datasetArgumentFields: [String: DatasetArgumentField] = {
        typealias D = DatasetArgumentField
        let all: [D] = [
            .flag("shuffle_caption", \.shuffleCaption),
            .text("caption_separator", \.captionSeparator),
            .text("caption_extension", \.captionExtension),
            // kohya's old misspelling, still read (train_util: `if args.caption_extention is not None: ...`); kohya
            // clears it after copying, so its own value is None.
            D(key: "caption_extention", configName: "caption_extension", kind: .string, read: { _ in .null },
              apply: { s, v, _ in if case .string(let e) = v { s.captionExtension = e } },
              copy: { from, to in to.captionExtension = from.captionExtension }),
            .int("keep_tokens", \.keepTokens),
            .text("keep_tokens_separator", \.keepTokensSeparator),
            .optionalText("secondary_separator", \.secondarySeparator),
            .flag("enable_wildcard", \.enableWildcard),
            .optionalText("caption_prefix", \.captionPrefix),
            .optionalText("caption_suffix", \.captionSuffix),
            .flag("flip_aug", \.flipAug),
            D.make("resolution", .resolution, \.resolution, read: { $0.map { .ints($0) } ?? .null },
                   value: { if case .ints(let r) = $0 { return .some(r) }; return nil },
                   check: { r, c in
                       if let r, !r.allSatisfy({ $0 > 0 }) { throw c.error("resolution", "= \(r): sides must be positive") }
                   }),
            .flag("enable_bucket", \.enableBucket),
            .int("min_bucket_reso", \.minBucketReso),
            .int("max_bucket_reso", \.maxBucketReso),
            .int("bucket_reso_steps", \.bucketResoSteps),
            .flag("bucket_no_upscale", \.bucketNoUpscale),
            .number("caption_dropout_rate", \.captionDropoutRate),
            .int("caption_dropout_every_n_epochs", \.captionDropoutEveryNEpochs),
            .number("caption_tag_dropout_rate", \.captionTagDropoutRate),
            .int("dataset_repeats", \.numRepeats, configName: "num_repeats", atLeast: 1),
            .number("prior_loss_weight", \.priorLossWeight),
        ]
        return Dictionary(uniqueKeysWithValues: all.map { ($0.key, $0) })
    }()

    /// The dataset-level copy rule of each config name (`batch_size` comes from train_batch_size).
    static let datasetArgumentCopies: [String: (SubsetConfig, inout SubsetConfig) -> Void] = {
        var copies: [String: (SubsetConfig, inout SubsetConfig) -> Void] = [:]
        for f in datasetArgumentFields.values where f.key == f.configName || copies[f.configName] == nil { copies[f.configName] = f.copy }
        copies["batch_size"] = { from, to in to.batchSize = from.batchSize }
        return copies
    }()
}
