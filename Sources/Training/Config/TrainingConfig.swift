import Dataset
import Distributed
import Foundation
import Tensor

/// Everything a training run is told: kohya's training arguments (train_network.py / sdxl_train_network.py,
/// names as kohya spells them in a TOML, here in Swift case) plus lora-dist's own `[lora_dist]` section.
///
/// Defaults are kohya's argparse defaults (library/train_util.py, train_network.py at commit 48d368f) unless a
/// comment says otherwise. `TrainingConfig.load(toml:)` (TrainingConfigLoader.swift) fills it from a file.
public struct TrainingConfig: Sendable {
    // MARK: [model_arguments]
    /// A single-file SDXL checkpoint, a diffusers folder, or `builtin:tiny` (the demo's generated tiny model).
    public var pretrainedModelNameOrPath = ""
    public var vParameterization = false
    /// kohya --vae: the VAE that encodes the latents, from its own file (a single-file or diffusers-layout .safetensors,
    /// or a diffusers vae/ folder); nil: the checkpoint's.
    public var vae: String? = nil

    // MARK: [dataset_arguments]
    /// The dataset, resolved once at load: from `dataset_config` (kohya dataset TOML, relative to the training TOML's
    /// folder), or from `train_data_dir` + the flat dataset arguments. nil for `builtin:shapes` (its images are written
    /// at train time; the plan resolves it then with `datasetConfig(builtinFolder:)`).
    public var dataset: DatasetConfig? = nil
    /// Where the dataset came from, for messages and `ss_datasets`.
    public var datasetSource = ""
    public var cacheLatents = false
    public var cacheLatentsToDisk = false
    public var cacheTextEncoderOutputs = false
    public var cacheTextEncoderOutputsToDisk = false
    /// kohya --max_token_length: 75 (None), 150 or 225.
    public var maxTokenLength = 75

    // MARK: [training_arguments]
    public var outputDir = "."
    /// kohya's default output name is "last" (train_network.py: `args.output_name or "last"`... via
    /// train_util.DEFAULT_LAST_OUTPUT_NAME).
    public var outputName = "last"
    /// Only "safetensors" is written (kohya also writes .ckpt/.pt; refused at load with why).
    public var saveModelAs = "safetensors"
    /// "float" (nil in kohya = the training dtype; fp32 here), "fp16", "bf16".
    public var savePrecision: String? = nil
    public var saveEveryNEpochs: Int? = nil
    public var saveEveryNSteps: Int? = nil
    /// kohya --save_last_n_steps: keep step files whose step is > current − N.
    public var saveLastNSteps: Int? = nil
    public var saveLastNEpochs: Int? = nil
    public var saveState = false
    public var saveStateOnTrainEnd = false
    /// kohya's sample images during training (Sample/TrainingSampler.swift): the prompts file (.txt/.toml/.json),
    /// the cadences (≤ 0 is off, as kohya's verify_training_args makes it) and the default sampler.
    public var samplePrompts: String? = nil
    public var sampleEveryNSteps: Int? = nil
    public var sampleEveryNEpochs: Int? = nil
    public var sampleAtFirst = false
    public var sampleSampler = "ddim"
    /// A state folder/file to resume from (kohya --resume). The CLI's `--resume` sets it too.
    public var resume: String? = nil
    /// kohya --train_batch_size: per-rank batch. It is also every dataset's `batch_size` unless a dataset TOML
    /// sets its own (kohya's cascade), so read the subsets' `batchSize` for bucketing.
    public var trainBatchSize = 1
    public var maxTrainSteps = 1600
    public var maxTrainEpochs: Int? = nil
    public var gradientAccumulationSteps = 1
    public var gradientCheckpointing = false
    /// Accepted values "no" (fp32 kernels), "bf16" and "fp16" (both the bf16 kernel family; see useKernelFamily).
    public var mixedPrecision = "no"
    /// kohya's no_half_vae: the VAE encodes latents in fp32 even when mixed_precision computes the rest in bf16.
    public var noHalfVAE = false
    public var seed: Int? = nil
    public var learningRate = 2.0e-6
    public var unetLR: Double? = nil
    /// kohya text_encoder_lr: one rate for both text encoders, or [te1, te2] (nil: learning_rate).
    public var textEncoderLR: [Double]? = nil
    public var lrScheduler = "constant"
    /// kohya --lr_warmup_steps: an int number of steps, or a float < 1 read as a ratio of max steps.
    public var lrWarmupSteps = 0.0
    public var lrSchedulerNumCycles = 1
    public var lrSchedulerPower = 1.0
    public var optimizerType = "AdamW"
    /// kohya --optimizer_args: "key=value" strings (e.g. "weight_decay=0.1", "betas=0.9,0.99").
    public var optimizerArgs: [String] = []
    public var maxGradNorm = 1.0
    public var noiseOffset: Double? = nil
    public var noiseOffsetRandomStrength = false
    public var adaptiveNoiseScale: Double? = nil
    public var multiresNoiseIterations: Int? = nil
    public var multiresNoiseDiscount = 0.3
    public var ipNoiseGamma: Double? = nil
    public var ipNoiseGammaRandomStrength = false
    public var minSNRGamma: Double? = nil
    public var debiasedEstimationLoss = false
    public var scaleVPredLossLikeNoisePred = false
    public var vPredLikeLoss: Double? = nil
    public var zeroTerminalSNR = false
    public var minTimestep: Int? = nil
    public var maxTimestep: Int? = nil
    /// "l2", "l1", "huber", "smooth_l1".
    public var lossType = "l2"
    /// "constant", "exponential", "snr".
    public var huberSchedule = "snr"
    public var huberC = 0.1
    public var huberScale = 1.0
    /// kohya --log_with: nil, "tensorboard", "wandb", "all"; --logging_dir, --log_prefix.
    public var logWith: String? = nil
    public var loggingDir: String? = nil
    public var logPrefix: String? = nil

    // MARK: [network_arguments]
    public var networkModule = "networks.lora"
    public var networkDim = 4
    public var networkAlpha = 1.0
    public var networkDropout: Double? = nil
    /// kohya --network_args "key=value" strings: conv_dim, conv_alpha, rank_dropout, module_dropout.
    public var networkArgs: [String] = []
    public var networkWeights: String? = nil
    public var networkTrainUnetOnly = false
    public var networkTrainTextEncoderOnly = false

    // MARK: [lora_dist]
    public var lora = LoraDistOptions()

    // MARK: Where things came from (filled by the loader, TrainingConfigLoader.swift)
    /// The training TOML (or `<demo>` / `<defaults>`), for messages.
    public var sourceFile = "<defaults>"
    /// kohya --dataset_config, resolved: relative to the training TOML's folder, else (kohya's rule) to the
    /// current directory.
    public var datasetConfigPath: String? = nil
    /// kohya --train_data_dir as written (relative to the current directory, as kohya reads it), or
    /// `builtin:shapes`.
    public var trainDataDir: String? = nil
    /// kohya --reg_data_dir: regularisation images, kohya `N_name` subfolders (is_reg subsets).
    public var regDataDir: String? = nil
    /// kohya --in_json: a fine-tuning metadata JSON (captions and tags per image) with train_data_dir as its image folder.
    public var inJSON: String? = nil
    /// kohya's flat dataset arguments (resolution, enable_bucket, caption_extension, train_batch_size → batch_size,
    /// dataset_repeats → num_repeats, ...) as one level of the dataset cascade: with `dataset_config` they fill
    /// what the dataset TOML leaves unset (kohya's argparse level); with `train_data_dir` they are the settings.
    public var datasetArguments = SubsetConfig()
    /// The dataset-config names (`batch_size`, `num_repeats`, `resolution`, ...) the training TOML set.
    public var datasetArgumentKeys: Set<String> = []
    /// kohya --metadata_title etc. as `modelspec.<name>` values to write (key without the `modelspec.` prefix:
    /// "title", "author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from",
    /// "trigger_phrase", "preprocessor", "is_negative_embedding").
    public var modelSpecMetadata: [String: String] = [:]
    /// kohya --training_comment → `ss_training_comment`.
    public var trainingComment: String? = nil
    /// kohya --no_metadata: write no `ss_*` / `modelspec.*` metadata.
    public var noMetadata = false
    /// One line per accepted kohya runtime key (what lora-dist does instead), and other things worth saying at
    /// start; rank 0 prints them.
    public var notes: [String] = []
    /// What the loader ignored or read other than as written (unknown keys, off values of unimplemented options,
    /// aliases, coerced values): said once at start; `strict` makes them errors.
    public var warnings: [String] = []

    public init() {}
}

/// `[lora_dist] overlap_reduction`: true, false or "auto".
public enum OverlapMode: String, Sendable {
    case auto, on, off
}

/// lora-dist's own settings (the `[lora_dist]` section of a training TOML).
public struct LoraDistOptions: Sendable {
    /// Gradient all-reduce wire format.
    public var wireFormat: WireFormat = .fp32
    /// Threads per rank; nil = node cores / ranks on the node.
    public var threadsPerRank: Int? = nil
    /// Latent/text cache folder; nil = `<output_dir>/cache`.
    public var cacheDir: String? = nil
    public var cacheMode: CacheMode = .shared
    /// AI Toolkit's trigger word: inserted first in captions that lack it, `[trigger]` replaced.
    public var trigger: String? = nil
    /// Training resolutions (multi-resolution bucketing, AI Toolkit's `resolution: [512, 768]`); nil = the
    /// dataset's own resolution.
    public var resolutions: [Int]? = nil
    /// AI Toolkit's "max step saves to keep": keep only the newest N step files (nil = keep all).
    public var keepStepSaves: Int? = nil
    /// Log one plain line every N optimizer steps when stdout is not a terminal.
    public var logEvery = 10
    /// Metrics JSONL path; nil = `<output_dir>/<output_name>-metrics.jsonl`.
    public var metricsFile: String? = nil
    /// Non-finite loss/gradient steps in a row that stop the run.
    public var maxNonFiniteSteps = 3
    /// Check that every rank holds the same LoRA weights every N optimizer steps (0 = never).
    public var parameterCheckEvery = 100
    /// Keep this many resumable state files (kohya keeps every one; 2 here unless set).
    public var keepStates = 2
    /// Seconds a rank waits in a collective for the others, beyond twice the slowest step seen, before it stops naming
    /// the ranks that did not arrive (0 = wait forever). Setup (model load, latent caching) waits 6× as long.
    public var collectiveTimeout = 300.0
    /// Reduce the gradient in buckets during backward, on a communication thread (GradientBuckets), instead of after it.
    /// `auto`: measured in the run (TrainingLoop.AutoOverlap): steps 2–3 after backward, 4–5 overlapped, then the faster
    /// way. Neither wins everywhere: the thread hides wire time but its CPU (codec, TCP) comes out of the compute when
    /// no core is free for it (bench/RESULTS.md "SDXL data-parallel scaling").
    public var overlapReduction = OverlapMode.auto
    /// About how many MB of fp32 gradient per bucket of the overlapped reduction (PyTorch DDP's bucket_cap_mb: 25).
    public var bucketMB = 25.0
    /// Every warning of the config loader is an error (`--strict`).
    public var strict = false

    public init() {}
}

extension TrainingConfig {
    /// The kernel family mixed_precision asks for: bf16 for "bf16", and for "fp16" too (these CPUs have no fast fp16
    /// arithmetic; bf16 has fp32's exponent range, so fp16's loss scaling is not needed); fp32 for "no".
    public var requestedKernelFamily: KernelFamily { mixedPrecision == "no" ? .fp32 : .bf16 }

    /// Switches this process to the family mixed_precision asks for (before any model work) and returns the lines to
    /// say at start: what runs in which precision, and the fallback to fp32 where this machine cannot run bf16.
    public func useKernelFamily() -> [String] {
        var lines: [String] = []
        if mixedPrecision == "fp16" {
            lines.append("mixed_precision fp16: this CPU has no fast fp16 arithmetic; computing as bf16 (fp32's exponent range, no loss scaling)")
        }
        if let fallback = Kernels.use(requestedKernelFamily) {
            lines.append("mixed_precision \(mixedPrecision): \(fallback)")
        } else if requestedKernelFamily == .bf16 {
            lines.append("mixed_precision \(mixedPrecision): linear layers, convolutions, attention products and LoRA products in bf16 on oneDNN \(DNNL.version) (fp32 accumulation); norms, softmax, the loss, LoRA weights, gradients and optimizer state in fp32\(noHalfVAE ? "; no_half_vae: the VAE encodes in fp32" : "")")
        }
        return lines
    }
}
