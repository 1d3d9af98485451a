import Crypto
import Dataset
import Foundation
import TOMLKit

extension TrainingConfig {
    // MARK: Dataset

    /// The dataset to scan, built fresh from the config (the trainer stores it in `dataset`):
    /// - `dataset_config` → `DatasetConfig.load`, then kohya's argparse level: every flat dataset argument the
    ///   training TOML sets (resolution, enable_bucket, caption_extension, train_batch_size → batch_size, ...)
    ///   fills the subsets whose subset / dataset / [general] levels leave it unset (BlueprintGenerator.generate);
    /// - `train_data_dir` (+ `reg_data_dir`) → kohya `N_name` subfolders (or one flat folder) with the flat dataset
    ///   arguments as their settings; reg subsets are `is_reg`;
    /// - `builtin:shapes` → the same over `builtinFolder` (the trainer writes the images there first).
    /// With `[lora_dist] resolutions`, every subset's `resolution` is set to the largest listed one (so
    /// single-resolution tools see a valid value) and `bucketConfigs(for:)` gives one bucketing per resolution.
    /// Every subset's bucketing is checked here (min/max bucket sizes against the resolution, step a multiple
    /// of 32), so a bad combination fails before training.
    public func datasetConfig(builtinFolder: URL) throws -> DatasetConfig {
        var cfg: DatasetConfig
        if let path = datasetConfigPath {
            let url = URL(fileURLWithPath: path)
            guard FileManager.default.fileExists(atPath: path) else {
                throw error("dataset_config", "= \(path): no such file (a relative dataset_config is read from the training TOML's folder, else from the current directory)")
            }
            do { cfg = try DatasetConfig.load(toml: url) } catch let e as DatasetError {
                throw error("dataset_config", "\(e.description)")
            }
            try applyArgparseLevel(to: &cfg, datasetTOML: url)
        } else if let dir = trainDataDir {
            let url = dir == "builtin:shapes" ? builtinFolder : URL(fileURLWithPath: dir)
            var (subsets, issues) = folderSubsets(url, isReg: false)
            if let reg = regDataDir {
                let r = folderSubsets(URL(fileURLWithPath: reg), isReg: true)
                subsets += r.subsets; issues += r.issues
            }
            cfg = DatasetConfig(general: datasetArguments, datasets: [subsets], issues: issues, source: dir)
        } else {
            throw error("train_data_dir", "is not set and neither is dataset_config")
        }
        if let resolutions = lora.resolutions, let largest = resolutions.max() {
            cfg.datasets = cfg.datasets.map { $0.map { var s = $0; s.resolution = [largest, largest]; return s } }
        }
        for (i, s) in cfg.subsets.enumerated() {
            guard s.resolution != nil else {
                throw error("resolution", "is not set for subset \(i) (\(s.imageDir ?? "?")) — set resolution (e.g. 1024) or [lora_dist] resolutions")
            }
            for b in bucketConfigs(for: s) {
                do { _ = try Bucketing(config: b) } catch let e as DatasetError {
                    throw error(lora.resolutions != nil ? "lora_dist.resolutions" : "resolution",
                                "subset \(i) (\(s.imageDir ?? "?")) at \(b.width)x\(b.height): \(e.description)")
                }
            }
        }
        return cfg
    }

    /// One bucketing per training resolution for `subset`: `[lora_dist] resolutions` when set, else the subset's
    /// own `resolution`. Without enable_bucket kohya trains every image at exactly the resolution: min = max =
    /// the side pins a square resolution to its one bucket (as DatasetReport does).
    public func bucketConfigs(for subset: SubsetConfig) -> [BucketConfig] {
        let sizes: [(Int, Int)]
        if let rs = lora.resolutions { sizes = rs.map { ($0, $0) } }
        else if let r = subset.resolution, let w = r.first { sizes = [(w, r.count > 1 ? r[1] : w)] }
        else { sizes = [] }
        return sizes.map { w, h in
            subset.enableBucket
                ? BucketConfig(width: w, height: h, minSize: subset.minBucketReso, maxSize: subset.maxBucketReso,
                               step: subset.bucketResoSteps, noUpscale: subset.bucketNoUpscale)
                : BucketConfig(width: w, height: h, minSize: min(w, h), maxSize: max(w, h), step: subset.bucketResoSteps)
        }
    }

    /// `bucketConfigs(for:)` as the Dataset module's multi-resolution bucketing.
    public func multiResolutionBucketing(for subset: SubsetConfig) throws -> MultiResolutionBucketing {
        do { return try MultiResolutionBucketing(configs: bucketConfigs(for: subset)) } catch let e as DatasetError {
            throw error(lora.resolutions != nil ? "lora_dist.resolutions" : "resolution", e.description)
        }
    }

    /// kohya `generate_dreambooth_subsets_config_by_subdirs`: each `N_name` folder a subset (its repeats and
    /// class token win over the flat arguments, as the subset level does); a flat folder (lora-dist's AI Toolkit
    /// layout) is one subset with `dataset_repeats`.
    func folderSubsets(_ url: URL, isReg: Bool) -> (subsets: [SubsetConfig], issues: [DatasetIssue]) {
        let folder = DatasetConfig.folder(url)
        let root = url.standardizedFileURL.path
        let subsets = folder.subsets.map { f in
            var s = datasetArguments
            s.imageDir = f.imageDir
            s.isReg = isReg
            if f.imageDir != root {   // an N_name subfolder
                s.numRepeats = f.numRepeats
                s.classTokens = f.classTokens
            }
            return s
        }
        return (subsets, folder.issues)
    }

    /// kohya's argparse level under a dataset TOML: a key the training TOML sets reaches every subset whose own
    /// levels (subset, its dataset, [general]) leave it unset. `prior_loss_weight` exists only as an argument.
    func applyArgparseLevel(to cfg: inout DatasetConfig, datasetTOML url: URL) throws {
        guard !datasetArgumentKeys.isEmpty else { return }
        let root: TOMLTable
        do { root = try TOMLTable(string: String(contentsOf: url, encoding: .utf8)) } catch {
            throw self.error("dataset_config", "\(url.path): \(error)")
        }
        let general = Set(root["general"]?.table?.keys ?? [])
        var datasetTables: [TOMLTable] = []
        if let arr = root["datasets"]?.array { for d in arr { if let t = d.table { datasetTables.append(t) } } }
        for name in datasetArgumentKeys where !general.contains(name) { copyDatasetArgument(name, into: &cfg.general) }
        for di in cfg.datasets.indices {
            let dt = di < datasetTables.count ? datasetTables[di] : nil
            let datasetKeys = Set(dt?.keys ?? [])
            var subsetTables: [TOMLTable] = []
            if let arr = dt?["subsets"]?.array { for s in arr { if let t = s.table { subsetTables.append(t) } } }
            for si in cfg.datasets[di].indices {
                let subsetKeys = Set(si < subsetTables.count ? subsetTables[si].keys : [])
                let present = general.union(datasetKeys).union(subsetKeys)
                for name in datasetArgumentKeys where !present.contains(name) {
                    copyDatasetArgument(name, into: &cfg.datasets[di][si])
                }
            }
        }
    }

    func copyDatasetArgument(_ name: String, into s: inout SubsetConfig) {
        let a = datasetArguments
        switch name {
        case "batch_size": s.batchSize = a.batchSize
        case "shuffle_caption": s.shuffleCaption = a.shuffleCaption
        case "caption_separator": s.captionSeparator = a.captionSeparator
        case "caption_extension": s.captionExtension = a.captionExtension
        case "keep_tokens": s.keepTokens = a.keepTokens
        case "keep_tokens_separator": s.keepTokensSeparator = a.keepTokensSeparator
        case "secondary_separator": s.secondarySeparator = a.secondarySeparator
        case "enable_wildcard": s.enableWildcard = a.enableWildcard
        case "caption_prefix": s.captionPrefix = a.captionPrefix
        case "caption_suffix": s.captionSuffix = a.captionSuffix
        case "flip_aug": s.flipAug = a.flipAug
        case "resolution": s.resolution = a.resolution
        case "enable_bucket": s.enableBucket = a.enableBucket
        case "min_bucket_reso": s.minBucketReso = a.minBucketReso
        case "max_bucket_reso": s.maxBucketReso = a.maxBucketReso
        case "bucket_reso_steps": s.bucketResoSteps = a.bucketResoSteps
        case "bucket_no_upscale": s.bucketNoUpscale = a.bucketNoUpscale
        case "caption_dropout_rate": s.captionDropoutRate = a.captionDropoutRate
        case "caption_dropout_every_n_epochs": s.captionDropoutEveryNEpochs = a.captionDropoutEveryNEpochs
        case "caption_tag_dropout_rate": s.captionTagDropoutRate = a.captionTagDropoutRate
        case "num_repeats": s.numRepeats = a.numRepeats
        case "prior_loss_weight": s.priorLossWeight = a.priorLossWeight
        default: preconditionFailure("dataset argument \(name) has no copy rule")
        }
    }

    // MARK: Resume fingerprint

    /// SHA-256 (hex) of every setting that must not change across `--resume`: model, dataset (source and
    /// settings), network, optimizer and its arguments, learning rates and schedule shape, seed, batch size,
    /// accumulation, noise and loss settings, wire format, cache mode, trigger, resolutions. Not in it: output
    /// paths and names, save cadence and keep rules, logging, `resume` itself, max_train_steps / max_train_epochs
    /// (a run may be extended), caching switches, gradient checkpointing, mixed_precision (fp32 compute either
    /// way), threads per rank. A saved state records it; `--resume` must refuse a state whose fingerprint differs.
    public var fingerprint: String {
        var parts: [String] = []
        func add(_ k: String, _ v: Any?) { parts.append("\(k)=\(v.map { String(reflecting: $0) } ?? "nil")") }
        add("pretrained_model_name_or_path", pretrainedModelNameOrPath)
        add("v_parameterization", vParameterization)
        add("dataset_config", datasetConfigPath)
        add("train_data_dir", trainDataDir)
        add("reg_data_dir", regDataDir)
        add("dataset_arguments", datasetArguments)
        add("dataset_argument_keys", datasetArgumentKeys.sorted())
        // The dataset TOML's text (its settings), not the resolved `dataset` (which the trainer fills in later).
        add("dataset_config_text", datasetConfigPath.flatMap { try? String(contentsOfFile: $0, encoding: .utf8) })
        add("max_token_length", maxTokenLength)
        add("train_batch_size", trainBatchSize)
        add("gradient_accumulation_steps", gradientAccumulationSteps)
        add("seed", seed)
        add("learning_rate", learningRate)
        add("unet_lr", unetLR)
        add("text_encoder_lr", textEncoderLR)
        add("lr_scheduler", lrScheduler)
        add("lr_warmup_steps", lrWarmupSteps)
        add("lr_scheduler_num_cycles", lrSchedulerNumCycles)
        add("lr_scheduler_power", lrSchedulerPower)
        add("optimizer_type", optimizerType)
        add("optimizer_args", optimizerArgs)
        add("max_grad_norm", maxGradNorm)
        add("noise_offset", noiseOffset)
        add("noise_offset_random_strength", noiseOffsetRandomStrength)
        add("adaptive_noise_scale", adaptiveNoiseScale)
        add("multires_noise_iterations", multiresNoiseIterations)
        add("multires_noise_discount", multiresNoiseDiscount)
        add("ip_noise_gamma", ipNoiseGamma)
        add("ip_noise_gamma_random_strength", ipNoiseGammaRandomStrength)
        add("min_snr_gamma", minSNRGamma)
        add("debiased_estimation_loss", debiasedEstimationLoss)
        add("scale_v_pred_loss_like_noise_pred", scaleVPredLossLikeNoisePred)
        add("v_pred_like_loss", vPredLikeLoss)
        add("zero_terminal_snr", zeroTerminalSNR)
        add("min_timestep", minTimestep)
        add("max_timestep", maxTimestep)
        add("loss_type", lossType)
        add("huber_schedule", huberSchedule)
        add("huber_c", huberC)
        add("huber_scale", huberScale)
        add("network_module", networkModule)
        add("network_dim", networkDim)
        add("network_alpha", networkAlpha)
        add("network_dropout", networkDropout)
        add("network_args", networkArgs)
        add("network_weights", networkWeights)
        add("network_train_unet_only", networkTrainUnetOnly)
        add("network_train_text_encoder_only", networkTrainTextEncoderOnly)
        add("lora_dist.wire_format", lora.wireFormat.rawValue)
        add("lora_dist.cache_mode", lora.cacheMode.rawValue)
        add("lora_dist.trigger", lora.trigger)
        add("lora_dist.resolutions", lora.resolutions)
        let digest = SHA256.hash(data: Data(parts.joined(separator: "\n").utf8))
        return digest.map { String(format: "%02x", $0) }.joined()
    }

    // MARK: kohya view

    /// The current value of an implemented kohya key (a `.field` or `.dataset` entry of `kohyaKeys`), in kohya's
    /// terms: what kohya's argparse namespace would hold. nil for keys that are not implemented. Used for the
    /// defaults test and for `ss_*` metadata.
    public func kohyaValue(of key: String) -> KohyaValue? {
        func opt<T>(_ v: T?, _ f: (T) -> KohyaValue) -> KohyaValue { v.map(f) ?? .null }
        let a = datasetArguments
        switch key {
        case "pretrained_model_name_or_path": return pretrainedModelNameOrPath.isEmpty ? .null : .string(pretrainedModelNameOrPath)
        case "v_parameterization": return .bool(vParameterization)
        case "dataset_config": return opt(datasetConfigPath, KohyaValue.string)
        case "train_data_dir": return opt(trainDataDir, KohyaValue.string)
        case "reg_data_dir": return opt(regDataDir, KohyaValue.string)
        case "cache_latents": return .bool(cacheLatents)
        case "cache_latents_to_disk": return .bool(cacheLatentsToDisk)
        case "cache_text_encoder_outputs": return .bool(cacheTextEncoderOutputs)
        case "cache_text_encoder_outputs_to_disk": return .bool(cacheTextEncoderOutputsToDisk)
        case "max_token_length": return maxTokenLength == 75 ? .null : .int(maxTokenLength)
        case "output_dir": return .string(outputDir)
        case "output_name": return .string(outputName)
        case "save_model_as": return .string(saveModelAs)
        case "save_precision": return opt(savePrecision, KohyaValue.string)
        case "save_every_n_epochs": return opt(saveEveryNEpochs, KohyaValue.int)
        case "save_every_n_steps": return opt(saveEveryNSteps, KohyaValue.int)
        case "save_last_n_steps": return opt(saveLastNSteps, KohyaValue.int)
        case "save_last_n_epochs": return opt(saveLastNEpochs, KohyaValue.int)
        case "save_state": return .bool(saveState)
        case "save_state_on_train_end": return .bool(saveStateOnTrainEnd)
        case "resume": return opt(resume, KohyaValue.string)
        case "train_batch_size": return .int(trainBatchSize)
        case "max_train_steps": return .int(maxTrainSteps)
        case "max_train_epochs": return opt(maxTrainEpochs, KohyaValue.int)
        case "gradient_accumulation_steps": return .int(gradientAccumulationSteps)
        case "gradient_checkpointing": return .bool(gradientCheckpointing)
        case "mixed_precision": return .string(mixedPrecision)
        case "seed": return opt(seed, KohyaValue.int)
        case "learning_rate": return .float(learningRate)
        case "unet_lr": return opt(unetLR, KohyaValue.float)
        case "text_encoder_lr": return opt(textEncoderLR) { .floats($0) }
        case "lr_scheduler": return .string(lrScheduler)
        case "lr_warmup_steps":
            return lrWarmupSteps < 1 && lrWarmupSteps > 0 ? .float(lrWarmupSteps) : .int(Int(lrWarmupSteps))
        case "lr_scheduler_num_cycles": return .int(lrSchedulerNumCycles)
        case "lr_scheduler_power": return .float(lrSchedulerPower)
        case "optimizer_type": return .string(optimizerType)
        case "optimizer_args": return optimizerArgs.isEmpty ? .null : .strings(optimizerArgs)
        case "use_8bit_adam": return .bool(false)
        case "use_lion_optimizer": return .bool(false)
        case "max_grad_norm": return .float(maxGradNorm)
        case "noise_offset": return opt(noiseOffset, KohyaValue.float)
        case "noise_offset_random_strength": return .bool(noiseOffsetRandomStrength)
        case "adaptive_noise_scale": return opt(adaptiveNoiseScale, KohyaValue.float)
        case "multires_noise_iterations": return opt(multiresNoiseIterations, KohyaValue.int)
        case "multires_noise_discount": return .float(multiresNoiseDiscount)
        case "ip_noise_gamma": return opt(ipNoiseGamma, KohyaValue.float)
        case "ip_noise_gamma_random_strength": return .bool(ipNoiseGammaRandomStrength)
        case "min_snr_gamma": return opt(minSNRGamma, KohyaValue.float)
        case "debiased_estimation_loss": return .bool(debiasedEstimationLoss)
        case "scale_v_pred_loss_like_noise_pred": return .bool(scaleVPredLossLikeNoisePred)
        case "v_pred_like_loss": return opt(vPredLikeLoss, KohyaValue.float)
        case "zero_terminal_snr": return .bool(zeroTerminalSNR)
        case "min_timestep": return opt(minTimestep, KohyaValue.int)
        case "max_timestep": return opt(maxTimestep, KohyaValue.int)
        case "loss_type": return .string(lossType)
        case "huber_schedule": return .string(huberSchedule)
        case "huber_c": return .float(huberC)
        case "huber_scale": return .float(huberScale)
        case "log_with": return opt(logWith, KohyaValue.string)
        case "logging_dir": return opt(loggingDir, KohyaValue.string)
        case "log_prefix": return opt(logPrefix, KohyaValue.string)
        case "network_module": return .string(networkModule)
        case "network_dim": return .int(networkDim)
        case "network_alpha": return .float(networkAlpha)
        case "network_dropout": return opt(networkDropout, KohyaValue.float)
        case "network_args": return networkArgs.isEmpty ? .null : .strings(networkArgs)
        case "network_weights": return opt(networkWeights, KohyaValue.string)
        case "network_train_unet_only": return .bool(networkTrainUnetOnly)
        case "network_train_text_encoder_only": return .bool(networkTrainTextEncoderOnly)
        case "training_comment": return opt(trainingComment, KohyaValue.string)
        case "no_metadata": return .bool(noMetadata)
        // Flat dataset arguments.
        case "shuffle_caption": return .bool(a.shuffleCaption)
        case "caption_separator": return .string(a.captionSeparator)
        case "caption_extension": return .string(a.captionExtension)
        case "caption_extention": return .null   // only an alias; kohya clears it after copying
        case "keep_tokens": return .int(a.keepTokens)
        case "keep_tokens_separator": return .string(a.keepTokensSeparator)
        case "secondary_separator": return opt(a.secondarySeparator, KohyaValue.string)
        case "enable_wildcard": return .bool(a.enableWildcard)
        case "caption_prefix": return opt(a.captionPrefix, KohyaValue.string)
        case "caption_suffix": return opt(a.captionSuffix, KohyaValue.string)
        case "flip_aug": return .bool(a.flipAug)
        case "resolution": return opt(a.resolution, KohyaValue.ints)
        case "enable_bucket": return .bool(a.enableBucket)
        case "min_bucket_reso": return .int(a.minBucketReso)
        case "max_bucket_reso": return .int(a.maxBucketReso)
        case "bucket_reso_steps": return .int(a.bucketResoSteps)
        case "bucket_no_upscale": return .bool(a.bucketNoUpscale)
        case "caption_dropout_rate": return .float(a.captionDropoutRate)
        case "caption_dropout_every_n_epochs": return .int(a.captionDropoutEveryNEpochs)
        case "caption_tag_dropout_rate": return .float(a.captionTagDropoutRate)
        case "dataset_repeats": return .int(a.numRepeats)
        case "prior_loss_weight": return .float(a.priorLossWeight)
        default:
            if key.hasPrefix("metadata_") {
                return opt(modelSpecMetadata[String(key.dropFirst("metadata_".count))], KohyaValue.string)
            }
            return nil
        }
    }
}
