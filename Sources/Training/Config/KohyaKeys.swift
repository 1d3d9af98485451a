import Foundation

/// How lora-dist treats one of kohya's sdxl_train_network.py arguments when it appears in a training TOML.
/// Every argument kohya's parser defines (Tests/Fixtures/training/kohya_args.json, read from kohya's source by
/// make_kohya_args.py) has exactly one entry in `TrainingConfig.kohyaKeys`; TrainingConfigTests checks that.
public enum KohyaKeyHandling: Sendable, Equatable {
    /// Implemented: its entry in `TrainingConfig.fields` (named by the key) reads it.
    case field(String)
    /// A flat dataset argument: it goes into `datasetArguments` (a `SubsetConfig`), the `[general]` level of the
    /// dataset, as kohya's argparse level does in `BlueprintGenerator.generate`.
    case dataset
    /// Accepted; it only tunes kohya's own runtime and lora-dist does the equivalent or better by itself. The
    /// string is the one-line note shown at start.
    case note(String)
    /// A kohya feature lora-dist does not implement: the key is refused. The string says what it does in kohya.
    case unsupported(String)
}

/// The value kinds a key accepts in a TOML (kohya parses a TOML's values as TOML types; argparse `type=` is not
/// applied to them, so an integer is accepted where kohya declares `type=float`, as Python arithmetic would).
enum ValueKind: Sendable {
    case int, float, bool, string, strings
    /// kohya `int_or_float`: an integer, or a float.
    case intOrFloat
    /// kohya `--resolution`: "W,H" or "N" as a string, an integer N, or [W, H].
    case resolution
    /// kohya `--text_encoder_lr` (nargs="*"): a number or a list of numbers.
    case floatOrFloats
    /// Checked by the key's own code (`[lora_dist] resolutions`).
    case any

    var expected: String {
        switch self {
        case .int: return "an integer"
        case .float: return "a number"
        case .bool: return "true or false"
        case .string: return "a string"
        case .strings: return "an array of strings"
        case .intOrFloat: return "an integer (steps) or a float (a ratio)"
        case .resolution: return "an integer, \"W,H\" or [W, H]"
        case .floatOrFloats: return "a number or an array of numbers"
        case .any: return "any value"
        }
    }
}

extension TrainingConfig {
    /// Every kohya sdxl_train_network.py argument and how lora-dist treats it.
    public static let kohyaKeys: [String: KohyaKeyHandling] = {
        var table: [String: KohyaKeyHandling] = [:]
        for key in fields.keys { table[key] = .field(key) }
        for key in datasetArgumentFields.keys { table[key] = .dataset }
        for (key, note) in acceptedWithNote { table[key] = .note(note) }
        for (key, what) in unsupported { table[key] = .unsupported(what) }
        return table
    }()

    /// Keys accepted with a one-line note: each only tunes kohya's PyTorch runtime, and lora-dist's own behaviour
    /// (fp32 compute on its own engine, MPI data parallelism, a self-validating latent cache) covers it.
    static let acceptedWithNote: [String: String] = [
        "clip_skip": "clip_skip: ignored for SDXL (kohya warns the same and trains with SDXL's fixed penultimate layers)",
        "xformers": "xformers: lora-dist's attention is its own tiled (FlashAttention-2 style) kernel, memory O(N) not O(N²)",
        "sdpa": "sdpa: lora-dist's attention is its own tiled (FlashAttention-2 style) kernel, memory O(N) not O(N²)",
        "mem_eff_attn": "mem_eff_attn: lora-dist's attention is always tiled with an online softmax (no full score matrix)",
        "torch_compile": "torch_compile: lora-dist does not use PyTorch; its kernels are compiled ahead of time",
        "dynamo_backend": "dynamo_backend: lora-dist does not use PyTorch/TorchDynamo",
        "max_data_loader_n_workers": "max_data_loader_n_workers: lora-dist decodes images once into its latent cache; no loader workers",
        "persistent_data_loader_workers": "persistent_data_loader_workers: lora-dist has no data-loader worker processes",
        "lowram": "lowram: lora-dist memory-maps the checkpoint file instead of reading it into memory",
        "highvram": "highvram: lora-dist runs on the CPU; there is no VRAM to keep latents in",
        "full_fp16": "full_fp16: lora-dist keeps LoRA weights, gradients and optimizer state in fp32",
        "full_bf16": "full_bf16: lora-dist keeps LoRA weights, gradients and optimizer state in fp32",
        "fp8_base": "fp8_base: lora-dist keeps the base model in 16-bit or wider and computes in fp32 (no fp8 rounding)",
        "fp8_base_unet": "fp8_base_unet: lora-dist keeps the base UNet in 16-bit or wider and computes in fp32 (no fp8 rounding)",
        "vae_batch_size": "vae_batch_size: lora-dist encodes latents once per image into its cache (`lora-dist cache` spreads them over ranks)",
        "skip_cache_check": "skip_cache_check: lora-dist's cache entries validate themselves cheaply on read",
        "cache_info": "cache_info: lora-dist reads image sizes from file headers only; there is no metadata cache to keep",
        "tokenizer_cache_dir": "tokenizer_cache_dir: the CLIP tokenizer is built into lora-dist (nothing is downloaded)",
        "disable_mmap_load_safetensors": "disable_mmap_load_safetensors: lora-dist reads checkpoints through its own safetensors reader",
        "cpu_offload_checkpointing": "cpu_offload_checkpointing: lora-dist trains on the CPU; gradient_checkpointing alone saves memory here",
        "fused_backward_pass": "fused_backward_pass: lora-dist's LoRA gradients are small; it steps the optimizer after the all-reduce as usual (same result)",
        "ddp_timeout": "ddp_timeout: lora-dist distributes with MPI (mpirun), not torch DDP",
        "ddp_gradient_as_bucket_view": "ddp_gradient_as_bucket_view: lora-dist distributes with MPI, not torch DDP",
        "ddp_static_graph": "ddp_static_graph: lora-dist distributes with MPI, not torch DDP",
        "deepspeed": "deepspeed: lora-dist distributes with MPI data parallelism (LoRA state is small; no ZeRO sharding needed)",
        "zero_stage": "zero_stage: lora-dist distributes with MPI data parallelism, not DeepSpeed ZeRO",
        "offload_optimizer_device": "offload_optimizer_device: lora-dist's optimizer state already lives in CPU memory",
        "offload_optimizer_nvme_path": "offload_optimizer_nvme_path: lora-dist's optimizer state lives in CPU memory",
        "offload_param_device": "offload_param_device: lora-dist's parameters already live in CPU memory",
        "offload_param_nvme_path": "offload_param_nvme_path: lora-dist's parameters live in CPU memory",
        "zero3_init_flag": "zero3_init_flag: lora-dist does not use DeepSpeed",
        "zero3_save_16bit_model": "zero3_save_16bit_model: lora-dist does not use DeepSpeed; save_precision picks the file dtype",
        "fp16_master_weights_and_gradients": "fp16_master_weights_and_gradients: lora-dist keeps weights and gradients in fp32",
        "console_log_level": "console_log_level: lora-dist prints its own progress (rank 0 only); [lora_dist] log_every sets the cadence",
        "console_log_file": "console_log_file: redirect lora-dist's output instead (metrics go to [lora_dist] metrics_file)",
        "console_log_simple": "console_log_simple: lora-dist prints plain lines whenever stdout is not a terminal",
    ]

    /// kohya features lora-dist does not implement: a TOML that sets one is refused, naming it.
    static let unsupported: [String: String] = [
        "v2": "trains Stable Diffusion 2.x; lora-dist trains SDXL only",
        "color_aug": "randomly shifts image colours; it cannot be combined with cached latents (kohya refuses that too)",
        "face_crop_aug_range": "crops around faces by a random factor; it cannot be combined with cached latents",
        "random_crop": "crops images at random positions; it cannot be combined with cached latents (kohya refuses that too)",
        "token_warmup_min": "grows the number of caption tags over the first steps",
        "token_warmup_step": "grows the number of caption tags over the first steps",
        "alpha_mask": "uses the image's alpha channel as a loss mask",
        "masked_loss": "weights the loss by a mask image",
        "resize_interpolation": "picks the resize filter; lora-dist always resizes with Lanczos3",
        "debug_dataset": "shows the dataset's images instead of training; run `lora-dist dataset` for a dataset report",
        "dataset_class": "loads a user-written Python dataset class",
        "conditioning_data_dir": "trains ControlNet-style conditioning images",
        "huggingface_repo_id": "uploads to the Hugging Face Hub", "huggingface_repo_type": "uploads to the Hugging Face Hub",
        "huggingface_path_in_repo": "uploads to the Hugging Face Hub", "huggingface_token": "uploads to the Hugging Face Hub",
        "huggingface_repo_visibility": "uploads to the Hugging Face Hub",
        "save_state_to_huggingface": "uploads states to the Hugging Face Hub",
        "resume_from_huggingface": "resumes from a state on the Hugging Face Hub",
        "async_upload": "uploads to the Hugging Face Hub in the background",
        "save_n_epoch_ratio": "saves a fixed number of times over the run; use save_every_n_epochs",
        "save_last_n_epochs_state": "keeps the last N epoch states; use [lora_dist] keep_states",
        "save_last_n_steps_state": "keeps the states of the last N steps; use [lora_dist] keep_states",
        "log_tracker_name": "names the run in the tracker (wandb)", "wandb_run_name": "names the wandb run",
        "log_tracker_config": "configures the wandb tracker", "wandb_api_key": "logs in to wandb",
        "log_config": "uploads the config to wandb",
        "config_file": "names the training TOML; give it on the command line (`lora-dist train FILE`) instead",
        "output_config": "writes the parsed arguments to a TOML instead of training",
        "lr_scheduler_type": "loads a custom scheduler class by Python name; use lr_scheduler",
        "lr_scheduler_args": "passes arguments to a custom scheduler class",
        "lr_decay_steps": "sets the decay phase of warmup_stable_decay, which lora-dist does not implement",
        "lr_scheduler_timescale": "sets inverse_sqrt's timescale, which lora-dist does not implement",
        "lr_scheduler_min_lr_ratio": "sets cosine_with_min_lr's floor, which lora-dist does not implement",
        "weighted_captions": "reads (token:weight) emphasis in captions",
        "dim_from_weights": "takes the rank from network_weights; set network_dim to the file's rank",
        "scale_weight_norms": "max-norm regularises LoRA weights",
        "base_weights": "merges other LoRAs into the base model before training",
        "base_weights_multiplier": "merges other LoRAs into the base model before training",
        "skip_until_initial_step": "skips the data of steps before initial_step; use --resume",
        "initial_epoch": "starts counting at a given epoch; use --resume", "initial_step": "starts counting at a given step; use --resume",
        "validation_seed": "splits off a validation set", "validation_split": "splits off a validation set",
        "validate_every_n_steps": "computes a validation loss", "validate_every_n_epochs": "computes a validation loss",
        "max_validation_steps": "limits validation steps",
    ]

    /// kohya's defaults of unsupported keys that are neither off nor empty (kohya_args.json): a config that writes the
    /// default asks for nothing.
    static let unsupportedDefaults: [String: TOMLDefault] = [
        "token_warmup_min": .number(1), "token_warmup_step": .number(0),
        "lr_scheduler_type": .string(""), "lr_decay_steps": .number(0), "validation_split": .number(0),
    ]

    /// Keys GUIs and guides write under another name, read as the kohya key (with a note). kohya itself ignores the
    /// alias (it is no argument of sdxl_train_network.py) and would train, e.g., at network_dim's default rank 4.
    static let aliases: [String: String] = ["network_rank": "network_dim"]

    /// sdxl_train.py's per-encoder learning rates (full fine-tuning), which guides also write into LoRA configs.
    static let textEncoderRateKeys = ["learning_rate_te1", "learning_rate_te2"]

    /// Accepted-with-note keys whose note is a warning (kohya warns too): `strict` refuses them.
    static let warningKeys: Set<String> = ["clip_skip"]

    /// Keys that GUIs and front-ends write into the TOML they hand to kohya, which kohya's parser does not define (and so
    /// ignores): listed in one line, not one warning each. The value says where they come from, when useful.
    static let guiKeys: [String: String] = [
        "sdxl": "kohya_ss GUI's model-type switch", "sdxl_cache_text_encoder_outputs": "kohya_ss GUI",
        "sdxl_no_half_vae": "kohya_ss GUI", "epoch": "kohya_ss GUI's epoch count (max_train_epochs is kohya's)",
        "num_cpu_threads_per_process": "accelerate launch option", "stop_text_encoder_training": "kohya_ss GUI",
        "model_train_type": "lora-scripts", "noise_offset_type": "kohya_ss GUI", "LoRA_type": "kohya_ss GUI",
        "LyCORIS_preset": "kohya_ss GUI", "additional_parameters": "kohya_ss GUI", "save_every_n_steps_state": "",
        "use_wandb": "kohya_ss GUI", "wandb_api_key_file": "", "gpu_ids": "accelerate launch option",
        "multi_gpu": "accelerate launch option", "num_processes": "accelerate launch option",
        "num_machines": "accelerate launch option", "main_process_port": "accelerate launch option",
        "dynamo_mode": "accelerate", "dynamo_use_fullgraph": "accelerate", "dynamo_use_dynamic": "accelerate",
        "extra_accelerate_launch_args": "kohya_ss GUI", "save_as_bool": "kohya_ss GUI",
        "sample_every_n_steps_state": "", "train_on_input": "kohya_ss GUI", "trainer_type": "",
        "model_list": "kohya_ss GUI", "flux1_checkbox": "kohya_ss GUI", "sd3_checkbox": "kohya_ss GUI",
        "v_pred_like_loss_checkbox": "", "mixed_precision_type": "",
    ]

    /// lora-dist's own `[lora_dist]` keys.
    static let loraDistKinds: [String: ValueKind] = [
        "wire_format": .string, "threads_per_rank": .int, "cache_dir": .string, "cache_mode": .string,
        "trigger": .string, "resolutions": .any, "keep_step_saves": .int, "log_every": .int,
        "metrics_file": .string, "max_nonfinite_steps": .int, "parameter_check_every": .int, "keep_states": .int,
        "strict": .bool, "collective_timeout": .any, "overlap_reduction": .any, "bucket_mb": .any,
    ]
}

/// A default value of a kohya argument, for comparing with what a TOML wrote.
enum TOMLDefault: Sendable, Equatable {
    /// A number, written as an integer or a float.
    case number(Double)
    case string(String)
}

extension TrainingConfig {
    /// configs/README.md's table of every kohya sdxl_train_network.py option and what lora-dist does with it, made from
    /// `kohyaKeys` (a test keeps the README's copy equal to this, so the table cannot drift from the code).
    public static var keyTableMarkdown: String {
        func row(_ key: String) -> String {
            switch kohyaKeys[key]! {
            case .field, .dataset: return "| `\(key)` | honoured |  |"
            case .note(let n):
                let why = n.hasPrefix(key + ": ") ? String(n.dropFirst(key.count + 2)) : n
                return "| `\(key)` | \(warningKeys.contains(key) ? "ignored, with a warning" : "accepted, with a note") | \(why) |"
            case .unsupported(let what):
                return "| `\(key)` | refused unless off / default | lora-dist does not implement it: it \(what) |"
            }
        }
        return (["| kohya option | lora-dist | why |", "|---|---|---|"] + kohyaKeys.keys.sorted().map(row)).joined(separator: "\n")
    }
}
