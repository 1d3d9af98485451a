import Dataset
import Foundation

/// Stage 1 — config → dataset index → data plan → totals. Built once per run, identically on every rank (and by
/// `lora-dist cache`, so the cache's owner ranks are training's): the dataset at each training resolution, every
/// sample's id, the coordinator (which rank trains and which encodes each sample, step by step), and the run's length.
public struct TrainingPlan {
    public let seed: UInt64
    /// The dataset at each training resolution (nil: the dataset's own; several with `[lora_dist] resolutions`, AI
    /// Toolkit's `resolution: [512, 768]`: every image at each).
    public let reports: [(resolution: Int?, report: DatasetReport)]
    /// Sample id → its dataset entry.
    public let samples: [String: DatasetReport.Entry]
    public let coordinator: Coordinator
    public let totalSteps: Int
    public let totalEpochs: Int
    /// What the dataset scan reported (images skipped, kept without a caption, upscaled), each once.
    public let issues: [String]
    /// The first resolution's report: subsets and the batch size (kohya: a dataset TOML's batch_size, else
    /// train_batch_size).
    public var report: DatasetReport { reports[0].report }

    /// `dataset`: the config's resolved dataset (`TrainingConfig.dataset`, or `datasetConfig(builtinFolder:)` once the
    /// built-in images exist).
    public init(config: TrainingConfig, dataset: DatasetConfig, worldSize: Int) throws {
        seed = UInt64(truncatingIfNeeded: config.seed ?? 42)
        let resolutions: [Int?] = (config.lora.resolutions ?? []).count > 1 ? config.lora.resolutions!.sorted() : [nil]
        var seen = Set<String>(), issues: [String] = []
        var samples: [String: DatasetReport.Entry] = [:]
        var reports: [(Int?, DatasetReport)] = []
        for r in resolutions {
            var cfg = dataset
            if let r {
                cfg.general.resolution = [r, r]
                cfg.datasets = cfg.datasets.map { $0.map { var s = $0; s.resolution = [r, r]; return s } }
            }
            let rep = try DatasetReport.make(cfg)
            let kept = Set(rep.entries.map(\.image.path))
            for line in rep.issues.map({ kept.contains($0.path) || !$0.skipped ? "\($0.path): \($0.reason)" : $0.description })
                + rep.upscaled.map({ "\($0.path): \($0.reason)" }) where seen.insert(line).inserted {
                issues.append(line)
            }
            for e in rep.entries { samples[Self.sampleID(e, subsets: rep.subsets, resolution: r)] = e }
            reports.append((r, rep))
        }
        self.reports = reports
        self.samples = samples
        self.issues = issues
        let manifest = samples.map { id, e in
            ManifestEntry(id: id, width: e.placement.bucket.width, height: e.placement.bucket.height, repeats: e.image.repeats)
        }
        coordinator = try Coordinator(manifest: manifest, seed: seed, worldSize: worldSize, batchSize: reports[0].1.batchSize,
                                      gradientAccumulation: config.gradientAccumulationSteps, cacheMode: config.lora.cacheMode)
        // Length: max_train_epochs wins over max_train_steps, as kohya.
        let perEpoch = coordinator.optimizerStepsPerEpoch
        totalSteps = config.maxTrainEpochs.map { $0 * perEpoch } ?? config.maxTrainSteps
        guard totalSteps > 0 else { throw TrainingError("nothing to train: max_train_steps/max_train_epochs give 0 steps") }
        totalEpochs = (totalSteps + perEpoch - 1) / perEpoch
    }

    /// A sample's id: `<subset>/<path below the subset's folder>` (+ `@<resolution>` with several resolutions). Not the
    /// absolute path: the plan, the shuffles and every random draw are keyed by ids, so a dataset moved to another
    /// folder (or the demo's generated one in another output_dir) trains identically.
    static func sampleID(_ e: DatasetReport.Entry, subsets: [SubsetConfig], resolution: Int?) -> String {
        let path = URL(fileURLWithPath: e.image.path).standardizedFileURL.path
        var relative = path
        if subsets.indices.contains(e.image.subset), let dir = subsets[e.image.subset].imageDir {
            let root = URL(fileURLWithPath: dir).standardizedFileURL.path
            if path.hasPrefix(root + "/") { relative = String(path.dropFirst(root.count + 1)) }
        }
        let id = "\(e.image.subset)/\(relative)"
        return resolution.map { "\(id)@\($0)" } ?? id
    }

    /// One latent the plan trains on: an (image, bucket, flip) job, the sample it belongs to, the rank that encodes it.
    public struct LatentJob {
        public let job: CacheJob
        public let sampleID: String
        public let owner: Int
    }

    /// Every latent of the plan (kohya: one per image at its bucket, and its mirror with flip_aug), with its owner.
    public func latentJobs(vaeIdentity: String) throws -> [LatentJob] {
        let owner = coordinator.owner
        return try reports.flatMap { r, rep in
            try CacheBuilder.jobs(rep, vaeIdentity: vaeIdentity).map { job in
                let id = Self.sampleID(job.entry, subsets: rep.subsets, resolution: r)
                return LatentJob(job: job, sampleID: id, owner: owner[id]!)
            }
        }
    }
}
