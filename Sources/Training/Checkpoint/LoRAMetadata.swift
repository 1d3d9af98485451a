import Dataset
import Foundation

extension Checkpointer {
    /// The metadata kohya's train_network.py writes into a LoRA (`ss_*` training record, `modelspec.*` from
    /// library/sai_model_spec.py), from this run's settings. Values are strings, as kohya writes them (Python `str()`
    /// of the value: "True"/"False", "None").
    func loraMetadata(position: TrainingPosition, final: Bool) -> [String: String] {
        func py(_ b: Bool) -> String { b ? "True" : "False" }
        func py(_ d: Double?) -> String { d.map { String($0) } ?? "None" }
        func py(_ i: Int?) -> String { i.map(String.init) ?? "None" }
        let c = config
        var m: [String: String] = [:]
        m["ss_session_id"] = String(plan.seed)
        m["ss_training_started_at"] = String(startedAt.timeIntervalSince1970)
        if final { m["ss_training_finished_at"] = String(Date().timeIntervalSince1970) }
        m["ss_output_name"] = c.outputName
        m["ss_learning_rate"] = String(c.learningRate)
        // kohya records str(args.text_encoder_lr): a TOML number as is, a list as Python prints it.
        m["ss_text_encoder_lr"] = c.textEncoderLR.map { $0.count == 1 ? String($0[0]) : "[" + $0.map { String($0) }.joined(separator: ", ") + "]" } ?? "None"
        m["ss_unet_lr"] = py(c.unetLR)
        m["ss_num_train_images"] = String(plan.coordinator.samplesPerEpoch)
        m["ss_num_reg_images"] = String(plan.report.entries.filter { plan.report.subsets[$0.image.subset].isReg }.count)
        m["ss_num_batches_per_epoch"] = String(plan.coordinator.stepsPerEpoch)
        m["ss_num_epochs"] = String(plan.totalEpochs)
        m["ss_gradient_checkpointing"] = py(c.gradientCheckpointing)
        m["ss_gradient_accumulation_steps"] = String(c.gradientAccumulationSteps)
        m["ss_max_train_steps"] = String(plan.totalSteps)
        m["ss_lr_warmup_steps"] = String(LRSchedule.warmupSteps(c.lrWarmupSteps, totalSteps: plan.totalSteps))
        m["ss_lr_scheduler"] = c.lrScheduler
        m["ss_network_module"] = c.networkModule
        m["ss_network_dim"] = String(network.spec.linearRank)
        m["ss_network_alpha"] = String(network.spec.linearAlpha)
        m["ss_network_dropout"] = py(c.networkDropout)
        m["ss_mixed_precision"] = c.mixedPrecision
        m["ss_full_fp16"] = "False"
        m["ss_v2"] = "False"
        m["ss_base_model_version"] = "sdxl_base_v1-0"
        m["ss_clip_skip"] = "None"
        m["ss_max_token_length"] = c.maxTokenLength == 75 ? "None" : String(c.maxTokenLength)
        m["ss_cache_latents"] = py(true)
        m["ss_seed"] = String(plan.seed)
        m["ss_lowram"] = "False"
        m["ss_noise_offset"] = py(c.noiseOffset)
        m["ss_noise_offset_random_strength"] = py(c.noiseOffsetRandomStrength)
        m["ss_adaptive_noise_scale"] = py(c.adaptiveNoiseScale)
        m["ss_multires_noise_iterations"] = py(c.multiresNoiseIterations)
        m["ss_multires_noise_discount"] = String(c.multiresNoiseDiscount)
        m["ss_ip_noise_gamma"] = py(c.ipNoiseGamma)
        m["ss_ip_noise_gamma_random_strength"] = py(c.ipNoiseGammaRandomStrength)
        m["ss_zero_terminal_snr"] = py(c.zeroTerminalSNR)
        m["ss_min_snr_gamma"] = py(c.minSNRGamma)
        m["ss_debiased_estimation"] = py(c.debiasedEstimationLoss)
        m["ss_scale_weight_norms"] = "None"
        m["ss_loss_type"] = c.lossType
        m["ss_huber_schedule"] = c.huberSchedule
        m["ss_huber_c"] = String(c.huberC)
        m["ss_optimizer"] = optimizerDescription
        m["ss_max_grad_norm"] = String(c.maxGradNorm)
        m["ss_training_comment"] = c.trainingComment ?? "trained with lora-dist on \(worldSize) rank\(worldSize == 1 ? "" : "s")"
        m["ss_sd_model_name"] = URL(fileURLWithPath: c.pretrainedModelNameOrPath).lastPathComponent
        m["ss_steps"] = String(position.optimizerSteps)
        m["ss_epoch"] = String(final ? plan.totalEpochs : max(position.epoch, 1))
        let netArgs = Dictionary(c.networkArgs.compactMap { arg -> (String, String)? in
            let kv = arg.split(separator: "=", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
            return kv.count == 2 ? (kv[0], kv[1]) : nil
        }, uniquingKeysWith: { _, b in b })
        m["ss_network_args"] = jsonText(netArgs)

        // ss_datasets / ss_tag_frequency: one dataset of DreamBooth-style subsets, tags counted per folder as kohya does.
        let first = plan.report.subsets.first ?? SubsetConfig()
        var tagFrequency: [String: [String: Int]] = [:]
        var subsets: [[String: Any]] = []
        for (i, s) in plan.report.subsets.enumerated() {
            let images = plan.report.entries.filter { $0.image.subset == i }
            let dirName = URL(fileURLWithPath: s.imageDir ?? "").lastPathComponent
            let captions = images.map { $0.image.caption ?? $0.image.classToken ?? "" }
            tagFrequency[dirName, default: [:]].merge(Captions.tagFrequency(captions), uniquingKeysWith: +)
            subsets.append(["img_count": images.count, "num_repeats": s.numRepeats, "color_aug": s.colorAug, "flip_aug": s.flipAug,
                            "random_crop": s.randomCrop, "shuffle_caption": s.shuffleCaption, "keep_tokens": s.keepTokens,
                            "keep_tokens_separator": s.keepTokensSeparator, "secondary_separator": s.secondarySeparator as Any,
                            "enable_wildcard": s.enableWildcard, "caption_prefix": s.captionPrefix as Any,
                            "caption_suffix": s.captionSuffix as Any, "image_dir": dirName,
                            "class_tokens": s.classTokens as Any, "is_reg": s.isReg, "alpha_mask": s.alphaMask])
        }
        var buckets: [String: Any] = [:]
        for (i, row) in plan.report.buckets.enumerated() {
            buckets[String(i)] = ["resolution": [row.bucket.width, row.bucket.height], "count": row.samples]
        }
        let resolution = first.resolution ?? [1024, 1024]
        let dataset: [String: Any] = [
            "is_dreambooth": plan.report.subsets.allSatisfy { $0.metadataFile == nil }, "batch_size_per_device": c.trainBatchSize,
            "num_train_images": plan.coordinator.samplesPerEpoch, "num_reg_images": Int(m["ss_num_reg_images"]!)!,
            "resolution": resolution.count == 1 ? [resolution[0], resolution[0]] : resolution,
            "enable_bucket": first.enableBucket, "min_bucket_reso": first.minBucketReso, "max_bucket_reso": first.maxBucketReso,
            "tag_frequency": tagFrequency, "bucket_info": ["buckets": buckets, "mean_img_ar_error": 0.0], "subsets": subsets,
        ]
        m["ss_datasets"] = jsonText([dataset])
        m["ss_tag_frequency"] = jsonText(tagFrequency)
        m["ss_bucket_info"] = jsonText(["buckets": buckets, "mean_img_ar_error": 0.0])

        // modelspec (Stability AI model spec 1.0.0, as sai_model_spec.build_metadata writes it for an SDXL LoRA).
        let size = resolution.count == 1 ? "\(resolution[0])x\(resolution[0])" : "\(resolution[0])x\(resolution[1])"
        m["modelspec.sai_model_spec"] = "1.0.0"
        m["modelspec.architecture"] = "stable-diffusion-xl-v1-base/lora"
        m["modelspec.implementation"] = "https://github.com/Stability-AI/generative-models"
        m["modelspec.title"] = c.outputName
        m["modelspec.resolution"] = size
        m["modelspec.prediction_type"] = c.vParameterization ? "v" : "epsilon"
        let iso = ISO8601DateFormatter()
        iso.formatOptions = [.withInternetDateTime]
        m["modelspec.date"] = iso.string(from: Date())
        for (k, v) in c.modelSpecMetadata { m[k] = v }   // kohya --metadata_title/author/… override the defaults
        if c.noMetadata {
            // kohya --no_metadata: only the minimal keys that loaders need (train_network.py keeps ss_base_model_version
            // and the network module/dim/alpha in minimum_metadata).
            let keep: Set<String> = ["ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                                     "ss_network_args", "ss_v2"]
            m = m.filter { keep.contains($0.key) || $0.key.hasPrefix("modelspec.") }
        }
        return m
    }

    /// kohya writes `ss_optimizer` as `<class path>(<args>)`.
    var optimizerDescription: String {
        let classPath: String
        switch optimizer.name.lowercased() {
        case "adamw": classPath = "torch.optim.adamw.AdamW"
        case "adamw8bit": classPath = "bitsandbytes.optim.adamw.AdamW8bit"
        case "lion": classPath = "lion_pytorch.lion_pytorch.Lion"
        case "prodigy": classPath = "prodigyopt.prodigy.Prodigy"
        case "adafactor": classPath = "transformers.optimization.Adafactor"
        default: classPath = optimizer.name
        }
        return config.optimizerArgs.isEmpty ? classPath : "\(classPath)(\(config.optimizerArgs.joined(separator: ",")))"
    }
}

func jsonText(_ value: Any) -> String {
    guard let data = try? JSONSerialization.data(withJSONObject: value, options: [.sortedKeys, .withoutEscapingSlashes]) else { return "{}" }
    return String(decoding: data, as: UTF8.self)
}
