import Crypto
import Dataset
import Foundation

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
            applyArgparseLevel(to: &cfg)
        } else if let metadata = inJSON {
            // kohya train_network.py without a dataset_config: one fine-tuning subset {image_dir: train_data_dir,
            // metadata_file: in_json} under the flat dataset arguments.
            var subset = datasetArguments
            subset.imageDir = trainDataDir
            subset.metadataFile = metadata
            cfg = DatasetConfig(general: datasetArguments, datasets: [[subset]], source: metadata)
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
    func applyArgparseLevel(to cfg: inout DatasetConfig) {
        for name in datasetArgumentKeys where !cfg.general.explicitKeys.contains(name) {
            copyDatasetArgument(name, into: &cfg.general)
        }
        for di in cfg.datasets.indices {
            for si in cfg.datasets[di].indices {
                for name in datasetArgumentKeys where !cfg.datasets[di][si].explicitKeys.contains(name) {
                    copyDatasetArgument(name, into: &cfg.datasets[di][si])
                }
            }
        }
    }

    func copyDatasetArgument(_ name: String, into s: inout SubsetConfig) {
        guard let copy = Self.datasetArgumentCopies[name] else { preconditionFailure("dataset argument \(name) has no copy rule") }
        copy(datasetArguments, &s)
    }

    // MARK: Resume fingerprint

    /// SHA-256 (hex) of every setting that must not change across `--resume`: model, dataset (source and
    /// settings), network, optimizer and its arguments, learning rates and schedule shape, seed, batch size,
    /// accumulation, noise and loss settings, wire format, cache mode, trigger, resolutions. Not in it: output
    /// paths and names, save cadence and keep rules, logging, `resume` itself, max_train_steps / max_train_epochs
    /// (a run may be extended), caching switches, gradient checkpointing, mixed_precision (a run may resume in
    /// another precision; the LoRA and optimizer state are fp32 either way), threads per rank. A saved state records it; `--resume` must refuse a state whose fingerprint differs.
    public var fingerprint: String {
        let digest = SHA256.hash(data: Data(fingerprintParts.map { "\($0.key)=\($0.value)" }.joined(separator: "\n").utf8))
        return digest.map { String(format: "%02x", $0) }.joined()
    }

    /// What the fingerprint hashes, key by key (a state records them, so a refused resume can say which changed).
    public var fingerprintParts: [(key: String, value: String)] {
        var parts: [(key: String, value: String)] = []
        func add(_ k: String, _ v: Any?) { parts.append((k, v.map { String(reflecting: $0) } ?? "nil")) }
        for (key, field) in Self.fields.sorted(by: { $0.key < $1.key }) where field.fingerprinted {
            add(key, field.read(self).description)
        }
        add("dataset_arguments", datasetArguments)
        add("dataset_argument_keys", datasetArgumentKeys.sorted())
        // The dataset TOML's text (its settings), not the resolved `dataset`.
        add("dataset_config_text", datasetConfigPath.flatMap { try? String(contentsOfFile: $0, encoding: .utf8) })
        add("lora_dist.wire_format", lora.wireFormat.rawValue)
        add("lora_dist.cache_mode", lora.cacheMode.rawValue)
        add("lora_dist.trigger", lora.trigger)
        add("lora_dist.resolutions", lora.resolutions)
        return parts
    }

    // MARK: kohya view

    /// The current value of an implemented kohya key (a `.field` or `.dataset` entry of `kohyaKeys`), in kohya's
    /// terms: what kohya's argparse namespace would hold. nil for keys that are not implemented. Used for the
    /// defaults test and for `ss_*` metadata.
    public func kohyaValue(of key: String) -> KohyaValue? {
        Self.fields[key]?.read(self) ?? Self.datasetArgumentFields[key]?.read(datasetArguments)
    }
}
