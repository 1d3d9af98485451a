import Foundation
import TOMLKit

/// One subset with every kohya subset and dataset key resolved through kohya's cascade
/// (subset < dataset < [general] < argparse defaults < dataclass defaults), as
/// `BlueprintGenerator.generate_params_by_fallbacks` / `search_value` do in library/config_util.py
/// (kohya-ss/sd-scripts 48d368fa557731ad0488c07304dfeba8c07910eb). Only DreamBooth-style subsets
/// (`image_dir`, optional `class_tokens`) are supported; fine-tuning (`metadata_file`) and ControlNet keys are
/// not in this schema and are rejected like any unknown key.
public struct SubsetConfig: Equatable, Sendable {
    // Dataset-level (DreamBoothDatasetParams + DATASET_ASCENDABLE_SCHEMA).
    /// nil: not set anywhere (kohya's argparse `--resolution` default is None; DreamBoothDataset then asserts).
    public var resolution: [Int]? = nil          // BaseDatasetParams.resolution = None; argparse default None
    public var batchSize = 1                     // DreamBoothDatasetParams.batch_size = 1; --train_batch_size default 1
    public var enableBucket = false              // dataclass False; --enable_bucket store_true
    public var minBucketReso = 256               // dataclass 256; --min_bucket_reso default 256
    public var maxBucketReso = 1024              // dataclass 1024; --max_bucket_reso default 1024
    public var bucketResoSteps = 64              // dataclass 64; --bucket_reso_steps default 64
    public var bucketNoUpscale = false           // dataclass False; --bucket_no_upscale store_true
    public var networkMultiplier = 1.0           // BaseDatasetParams.network_multiplier = 1.0
    public var validationSeed: Int? = nil        // BaseDatasetParams.validation_seed = None
    public var validationSplit = 0.0             // BaseDatasetParams.validation_split = 0.0
    // Subset-level (DreamBoothSubsetParams / BaseSubsetParams).
    public var imageDir: String? = nil           // BaseSubsetParams.image_dir = None (Required in a TOML subset)
    public var numRepeats = 1                    // dataclass 1; --dataset_repeats default 1
    public var shuffleCaption = false            // dataclass False; --shuffle_caption store_true
    public var captionSeparator = ","            // --caption_separator default "," (dataclass has the tuple (",",))
    public var keepTokens = 0                    // dataclass 0; --keep_tokens default 0
    public var keepTokensSeparator = ""          // --keep_tokens_separator default "" (dataclass has the tuple (None,))
    public var secondarySeparator: String? = nil // dataclass None; --secondary_separator default None
    public var enableWildcard = false            // dataclass False; --enable_wildcard store_true
    public var colorAug = false                  // dataclass False; --color_aug store_true
    public var flipAug = false                   // dataclass False; --flip_aug store_true
    public var faceCropAugRange: [Double]? = nil // dataclass None; --face_crop_aug_range default None
    public var randomCrop = false                // dataclass False; --random_crop store_true
    public var captionPrefix: String? = nil      // dataclass None; --caption_prefix default None
    public var captionSuffix: String? = nil      // dataclass None; --caption_suffix default None
    public var captionDropoutRate = 0.0          // dataclass 0.0; --caption_dropout_rate default 0.0
    public var captionDropoutEveryNEpochs = 0    // dataclass 0; --caption_dropout_every_n_epochs default 0
    public var captionTagDropoutRate = 0.0       // dataclass 0.0; --caption_tag_dropout_rate default 0.0
    public var tokenWarmupMin = 1                // dataclass 1; --token_warmup_min default 1
    public var tokenWarmupStep = 0.0             // dataclass 0; --token_warmup_step default 0
    public var resizeInterpolation: String? = nil // dataclass None; --resize_interpolation default None
    public var isReg = false                     // DreamBoothSubsetParams.is_reg = False
    public var classTokens: String? = nil        // DreamBoothSubsetParams.class_tokens = None
    public var captionExtension = ".caption"     // dataclass ".caption"; --caption_extension default ".caption"
    public var cacheInfo = false                 // dataclass False
    public var alphaMask = false                 // dataclass False; --alpha_mask store_true
    public var priorLossWeight = 1.0             // DreamBoothDatasetParams.prior_loss_weight = 1.0 (argparse only)
    /// kohya's fine-tuning subset (FineTuningSubsetParams.metadata_file; the training argument `in_json`): captions, tags
    /// and images come from this JSON (or JSONL) instead of caption files; relative image keys are under `imageDir`.
    public var metadataFile: String? = nil
    /// The keys a dataset TOML set for this subset at any of its levels (subset, its dataset, [general]): a training
    /// TOML's flat dataset arguments (kohya's argparse level) fill only the others.
    public var explicitKeys: Set<String> = []

    public init() {}
}

/// A dataset configuration: kohya's `[general]` / `[[datasets]]` / `[[datasets.subsets]]`, or a folder (layouts
/// 1 and 2) expressed as one dataset of subsets.
public struct DatasetConfig: Sendable {
    /// `[general]` resolved against the defaults (its `imageDir` is always nil).
    public var general: SubsetConfig
    public var datasets: [[SubsetConfig]]
    /// Folder problems found while building the config (layout 2's folders without an `N_` prefix...).
    public var issues: [DatasetIssue]
    /// Where the config came from, for messages.
    public var source: String

    public init(general: SubsetConfig = SubsetConfig(), datasets: [[SubsetConfig]], issues: [DatasetIssue] = [],
                source: String) {
        self.general = general; self.datasets = datasets; self.issues = issues; self.source = source
    }

    /// All subsets in order; `DatasetImage.subset` indexes this.
    public var subsets: [SubsetConfig] { datasets.flatMap { $0 } }

    // MARK: TOML

    enum Kind { case int, bool, string, float, intOrFloat, intOrPair, floatPair, table }

    // ConfigSanitizer's schemas (DreamBooth with dropout support, as train_network.py builds it).
    static let datasetAscendable: [String: Kind] = [   // DATASET_ASCENDABLE_SCHEMA
        "batch_size": .int, "bucket_no_upscale": .bool, "bucket_reso_steps": .int, "enable_bucket": .bool,
        "max_bucket_reso": .int, "min_bucket_reso": .int, "validation_seed": .int, "validation_split": .float,
        "resolution": .intOrPair, "network_multiplier": .float, "resize_interpolation": .string,
    ]
    static let subsetAscendable: [String: Kind] = [    // SUBSET_ASCENDABLE_SCHEMA + DO_ + DB_SUBSET_ASCENDABLE_SCHEMA
        "color_aug": .bool, "face_crop_aug_range": .floatPair, "flip_aug": .bool, "num_repeats": .int,
        "random_crop": .bool, "shuffle_caption": .bool, "keep_tokens": .int, "keep_tokens_separator": .string,
        "secondary_separator": .string, "caption_separator": .string, "enable_wildcard": .bool,
        "token_warmup_min": .int, "token_warmup_step": .intOrFloat, "caption_prefix": .string,
        "caption_suffix": .string, "custom_attributes": .table, "resize_interpolation": .string,
        "caption_dropout_every_n_epochs": .int, "caption_dropout_rate": .intOrFloat,
        "caption_tag_dropout_rate": .intOrFloat,
        "caption_extension": .string, "class_tokens": .string, "cache_info": .bool,
    ]
    static let subsetDistinct: [String: Kind] = [      // DB_SUBSET_DISTINCT_SCHEMA (+ FT_SUBSET_DISTINCT_SCHEMA's metadata_file)
        "image_dir": .string, "is_reg": .bool, "alpha_mask": .bool, "metadata_file": .string,
    ]
    static let generalSchema = datasetAscendable.merging(subsetAscendable) { a, _ in a }
    static let subsetSchema = subsetAscendable.merging(subsetDistinct) { a, _ in a }

    enum Value { case int(Int), bool(Bool), string(String), float(Double), ints([Int]), floats([Double]), table }
    typealias Level = [String: Value]

    /// Reads a kohya dataset config. Unknown keys and wrong types are errors naming the file, the key and the
    /// value, as voluptuous rejects them in `ConfigSanitizer.sanitize_user_config`. Relative `image_dir`s are
    /// taken relative to the current directory, as kohya's `os.path` calls do.
    public static func load(toml url: URL) throws -> DatasetConfig {
        let file = url.path
        let text: String
        do { text = try String(contentsOf: url, encoding: .utf8) } catch {
            throw DatasetError("\(file): cannot read dataset config: \(error.localizedDescription)")
        }
        let root: TOMLTable
        do { root = try TOMLTable(string: text) } catch let e as TOMLParseError {
            throw DatasetError("\(file):\(e.source.begin.line):\(e.source.begin.column): TOML syntax error: \(e.description)")
        }
        for key in root.keys where key != "general" && key != "datasets" {
            throw DatasetError("\(file): unknown key '\(key)' at the top level (kohya accepts only [general] and [[datasets]])")
        }
        var generalLevel: Level = [:]
        if let g = root["general"] {
            guard let t = g.table else { throw DatasetError("\(file): 'general' must be a table, got \(g)") }
            generalLevel = try parseLevel(t, schema: generalSchema, where: "[general]", file: file)
        }
        var datasets: [[SubsetConfig]] = []
        if let d = root["datasets"] {
            guard let arr = d.array else { throw DatasetError("\(file): 'datasets' must be an array of tables ([[datasets]]), got \(d)") }
            for (di, dv) in arr.enumerated() {
                guard let dt = dv.table else { throw DatasetError("\(file): datasets[\(di)] must be a table, got \(dv)") }
                var dschema = generalSchema; dschema["subsets"] = nil
                let dsLevel = try parseLevel(dt, schema: dschema, where: "[[datasets]] #\(di + 1)", file: file,
                                             allowing: ["subsets"])
                var subsets: [SubsetConfig] = []
                if let sv = dt["subsets"] {
                    guard let sa = sv.array else { throw DatasetError("\(file): datasets[\(di)].subsets must be an array of tables, got \(sv)") }
                    for (si, s) in sa.enumerated() {
                        let at = "[[datasets.subsets]] #\(si + 1) of dataset #\(di + 1)"
                        guard let st = s.table else { throw DatasetError("\(file): \(at) must be a table, got \(s)") }
                        let sLevel = try parseLevel(st, schema: subsetSchema, where: at, file: file)
                        // DB_SUBSET_DISTINCT_SCHEMA: Required("image_dir").
                        // DB_SUBSET_DISTINCT_SCHEMA: Required("image_dir"); a fine-tuning subset has metadata_file instead.
                        guard sLevel["image_dir"] != nil || sLevel["metadata_file"] != nil else {
                            throw DatasetError("\(file): \(at) has no 'image_dir' (required by kohya for a DreamBooth subset) and no 'metadata_file' (a fine-tuning subset)")
                        }
                        // Subset fields fall back subset < dataset < general < defaults; dataset fields (batch size,
                        // resolution, buckets) never come from a subset (not in the subset schema).
                        var c = resolve([sLevel, dsLevel, generalLevel])
                        c.applyDatasetLevel(resolve([dsLevel, generalLevel]))
                        c.explicitKeys = Set(sLevel.keys).union(dsLevel.keys).union(generalLevel.keys)
                        subsets.append(c)
                    }
                }
                datasets.append(subsets)
            }
        }
        var general = resolve([generalLevel])
        general.explicitKeys = Set(generalLevel.keys)
        return DatasetConfig(general: general, datasets: datasets, source: file)
    }

    static func parseLevel(_ t: TOMLTable, schema: [String: Kind], where at: String, file: String,
                           allowing extra: Set<String> = []) throws -> Level {
        var out: Level = [:]
        for key in t.keys where !extra.contains(key) {
            guard let kind = schema[key] else {
                throw DatasetError("\(file): unknown key '\(key)' in \(at) (kohya's config schema rejects it)")
            }
            let v = t[key]!
            func bad(_ want: String) -> DatasetError {
                DatasetError("\(file): key '\(key)' in \(at) must be \(want), got \(v.debugDescription)")
            }
            switch kind {
            case .int: guard let i = v.int else { throw bad("an integer") }; out[key] = .int(i)
            case .bool: guard let b = v.bool else { throw bad("true or false") }; out[key] = .bool(b)
            case .string: guard let s = v.string else { throw bad("a string") }; out[key] = .string(s)
            // voluptuous `float` is isinstance(value, float): an integer is rejected (validation_split, network_multiplier).
            case .float: guard let d = v.double else { throw bad("a float (written with a decimal point)") }; out[key] = .float(d)
            case .intOrFloat:
                if let i = v.int { out[key] = .float(Double(i)) } else if let d = v.double { out[key] = .float(d) } else { throw bad("a number") }
            case .intOrPair:  // __validate_and_convert_scalar_or_twodim(int): n -> (n, n); [w, h] -> (w, h)
                if let i = v.int { out[key] = .ints([i, i]) }
                else if let a = v.array, a.count == 2, let w = a[0].int, let h = a[1].int { out[key] = .ints([w, h]) }
                else { throw bad("an integer or [width, height]") }
            case .floatPair:  // __validate_and_convert_twodim(float)
                if let a = v.array, a.count == 2, let x = a[0].double, let y = a[1].double { out[key] = .floats([x, y]) }
                else { throw bad("[float, float]") }
            case .table: guard v.table != nil else { throw bad("a table") }; out[key] = .table
            }
        }
        return out
    }

    /// `BlueprintGenerator.search_value`: the first level that has the key wins, else the default.
    static func resolve(_ levels: [Level]) -> SubsetConfig {
        func find(_ k: String) -> Value? { for l in levels { if let v = l[k] { return v } }; return nil }
        func int(_ k: String) -> Int? { if case .int(let i)? = find(k) { return i }; return nil }
        func bool(_ k: String) -> Bool? { if case .bool(let b)? = find(k) { return b }; return nil }
        func str(_ k: String) -> String? { if case .string(let s)? = find(k) { return s }; return nil }
        func dbl(_ k: String) -> Double? { if case .float(let d)? = find(k) { return d }; return nil }
        var c = SubsetConfig()
        if case .ints(let r)? = find("resolution") { c.resolution = r }
        c.batchSize = int("batch_size") ?? c.batchSize
        c.enableBucket = bool("enable_bucket") ?? c.enableBucket
        c.minBucketReso = int("min_bucket_reso") ?? c.minBucketReso
        c.maxBucketReso = int("max_bucket_reso") ?? c.maxBucketReso
        c.bucketResoSteps = int("bucket_reso_steps") ?? c.bucketResoSteps
        c.bucketNoUpscale = bool("bucket_no_upscale") ?? c.bucketNoUpscale
        c.networkMultiplier = dbl("network_multiplier") ?? c.networkMultiplier
        c.validationSeed = int("validation_seed") ?? c.validationSeed
        c.validationSplit = dbl("validation_split") ?? c.validationSplit
        c.imageDir = str("image_dir")
        c.metadataFile = str("metadata_file")
        c.numRepeats = int("num_repeats") ?? c.numRepeats
        c.shuffleCaption = bool("shuffle_caption") ?? c.shuffleCaption
        c.captionSeparator = str("caption_separator") ?? c.captionSeparator
        c.keepTokens = int("keep_tokens") ?? c.keepTokens
        c.keepTokensSeparator = str("keep_tokens_separator") ?? c.keepTokensSeparator
        c.secondarySeparator = str("secondary_separator") ?? c.secondarySeparator
        c.enableWildcard = bool("enable_wildcard") ?? c.enableWildcard
        c.colorAug = bool("color_aug") ?? c.colorAug
        c.flipAug = bool("flip_aug") ?? c.flipAug
        if case .floats(let f)? = find("face_crop_aug_range") { c.faceCropAugRange = f }
        c.randomCrop = bool("random_crop") ?? c.randomCrop
        c.captionPrefix = str("caption_prefix") ?? c.captionPrefix
        c.captionSuffix = str("caption_suffix") ?? c.captionSuffix
        c.captionDropoutRate = dbl("caption_dropout_rate") ?? c.captionDropoutRate
        c.captionDropoutEveryNEpochs = int("caption_dropout_every_n_epochs") ?? c.captionDropoutEveryNEpochs
        c.captionTagDropoutRate = dbl("caption_tag_dropout_rate") ?? c.captionTagDropoutRate
        c.tokenWarmupMin = int("token_warmup_min") ?? c.tokenWarmupMin
        c.tokenWarmupStep = dbl("token_warmup_step") ?? c.tokenWarmupStep
        c.resizeInterpolation = str("resize_interpolation") ?? c.resizeInterpolation
        c.isReg = bool("is_reg") ?? c.isReg
        c.classTokens = str("class_tokens") ?? c.classTokens
        c.captionExtension = str("caption_extension") ?? c.captionExtension
        c.cacheInfo = bool("cache_info") ?? c.cacheInfo
        c.alphaMask = bool("alpha_mask") ?? c.alphaMask
        return c
    }
}

extension SubsetConfig {
    /// Dataset params are resolved from [dataset, general] only (kohya builds DreamBoothDatasetParams without the
    /// subset level); `resize_interpolation` exists at both levels and stays the subset's.
    mutating func applyDatasetLevel(_ d: SubsetConfig) {
        resolution = d.resolution; batchSize = d.batchSize; enableBucket = d.enableBucket
        minBucketReso = d.minBucketReso; maxBucketReso = d.maxBucketReso; bucketResoSteps = d.bucketResoSteps
        bucketNoUpscale = d.bucketNoUpscale; networkMultiplier = d.networkMultiplier
        validationSeed = d.validationSeed; validationSplit = d.validationSplit; priorLossWeight = d.priorLossWeight
    }
}
