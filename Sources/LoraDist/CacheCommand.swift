import ArgumentParser
import Dataset
import Distributed
import Foundation
import Logging
import SDXL
import Tensor
import Training

/// Resolves a dataset argument for `lora-dist dataset` and `lora-dist cache`: a kohya TOML, a folder, or
/// `builtin:shapes` (generated into `builtinFolder`). Errors print one line and fail the command.
func resolveDatasetReport(_ config: String, builtinFolder: URL, resolution: Int, captionExtension: String,
                          batchSize: Int, writeBuiltin: Bool = true) throws -> DatasetReport {
    var url = URL(fileURLWithPath: config)
    if config == "builtin:shapes" {
        url = builtinFolder
        if writeBuiltin {
            try? FileManager.default.removeItem(at: url)
            try SyntheticShapes.write(to: url)
        }
    }
    var isDir: ObjCBool = false
    guard FileManager.default.fileExists(atPath: url.path, isDirectory: &isDir) else {
        throw ValidationError("\(config): no such file or folder")
    }
    let cfg = isDir.boolValue
        ? DatasetReport.folderConfig(url, resolution: resolution, captionExtension: captionExtension, batchSize: batchSize)
        : try DatasetConfig.load(toml: url)
    do { return try DatasetReport.make(cfg) } catch let e as DatasetError {
        FileHandle.standardError.write(Data("error: \(e.description)\n".utf8))
        throw ExitCode.failure
    }
}

/// `lora-dist cache CONFIG`: encode every latent a training run will use into its shared cache folder before
/// training, under mpirun each (image, bucket, flip) by its owner rank. CONFIG is the training TOML itself (the plan
/// `lora-dist train` makes from it: the same samples and owner ranks, the same `<cache_dir>/latents` folder), or a
/// dataset alone (a kohya dataset TOML, a folder, builtin:shapes) with --model and --cache-dir.
struct CacheCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cache",
        abstract: "Build the latent cache ahead of training (in parallel under mpirun; the cache folder must be shared).")

    @OptionGroup var engine: EngineOptions
    @Argument(help: "A training TOML (what `lora-dist train` takes), or a kohya dataset TOML, a folder (flat, or kohya img/N_name/ subfolders), or builtin:shapes.")
    var config: String
    @Option(help: "The SDXL checkpoint whose VAE encodes (default: the training TOML's pretrained_model_name_or_path; its `vae` key, when set, names the VAE).") var model: String?
    @Option(help: "The cache folder: latents go to DIR/latents, where `lora-dist train` with [lora_dist] cache_dir = DIR reads them (default: the training TOML's cache_dir, else output_dir/cache).")
    var cacheDir: String?
    @Option(help: "Training resolution when CONFIG is a folder.") var resolution = 1024
    @Option(help: "Per-rank batch size when CONFIG is a folder (a TOML's own batch_size wins).") var batchSize = 1
    @Option(help: "Caption file extension when CONFIG is a folder.") var captionExtension = ".txt"
    @Option(help: "shared (one cache folder every rank reads; the default) or node_local (each rank caches, on its own node, the latents of the images it trains on), as [lora_dist] cache_mode; default: the training TOML's.")
    var cacheMode: String?
    @Flag(help: "Each rank logs every latent it encodes.") var verbose = false

    /// CONFIG as a training config: read as is, or made from a dataset argument (seed and everything else at
    /// `lora-dist train`'s defaults).
    func trainingConfig() throws -> TrainingConfig {
        let url = URL(fileURLWithPath: config)
        var isDir: ObjCBool = false
        let exists = FileManager.default.fileExists(atPath: config, isDirectory: &isDir)
        var cfg: TrainingConfig
        if exists && !isDir.boolValue && !TrainingConfig.isDatasetTOML(url) {
            cfg = try TrainingConfig.load(toml: url)
        } else {
            guard exists || config == "builtin:shapes" else { throw ValidationError("\(config): no such file or folder") }
            guard model != nil, cacheDir != nil else {
                throw ValidationError("with a dataset (not a training TOML) as CONFIG, give --model FILE and --cache-dir DIR")
            }
            cfg = TrainingConfig()
            cfg.pretrainedModelNameOrPath = model!
            cfg.trainBatchSize = batchSize
            cfg.datasetSource = config
            if exists && !isDir.boolValue {
                cfg.datasetConfigPath = config
                cfg.dataset = try DatasetConfig.load(toml: url)
            } else if config != "builtin:shapes" {
                cfg.dataset = DatasetReport.folderConfig(url, resolution: resolution, captionExtension: captionExtension, batchSize: batchSize)
            } else {
                cfg.trainDataDir = config
                cfg.datasetArguments.resolution = [resolution, resolution]
                cfg.datasetArguments.captionExtension = captionExtension
                cfg.datasetArguments.enableBucket = true
            }
        }
        if let model { cfg.pretrainedModelNameOrPath = model }
        if let cacheDir { cfg.lora.cacheDir = cacheDir }
        switch cacheMode {
        case nil: break
        case "shared": cfg.lora.cacheMode = .shared
        case "node_local", "node-local": cfg.lora.cacheMode = .nodeLocal
        case let other?: throw ValidationError("--cache-mode \(other): give shared or node_local")
        }
        return cfg
    }

    func run() throws {
        RankLogging.bootstrap()
        let log = Logger(label: "cache")
        let cfg: TrainingConfig
        do { cfg = try trainingConfig() } catch let e as ValidationError { throw e } catch {
            FileHandle.standardError.write(Data("error: \(error)\n".utf8))
            throw ExitCode.failure
        }
        let comm = try startRanks(log)
        engine.apply()
        let progress = RankLogging.progress()
        let rank = comm.rank
        let familyLines = cfg.useKernelFamily()
        if rank == 0 { for line in familyLines { print(line) } }
        do {
            let inputs = try RunInputs(config: cfg, communicator: comm)
            // The plan `lora-dist train` makes: the same sample ids, seed and world size give the same owner ranks.
            let plan = try TrainingPlan(config: cfg, dataset: inputs.dataset, worldSize: comm.size)
            let ckpt = try SDXLCheckpoint(path: inputs.modelPath)
            let encoder = try LatentEncoder(checkpoint: ckpt, vaeFile: cfg.vae, family: cfg.noHalfVAE ? .fp32 : Kernels.family)
            let cache = try LatentCache(storage: .disk(inputs.latentFolder))
            let start = Date()
            let caching = try LatentCaching(plan: plan, cache: cache, vaeIdentity: encoder.identity,
                                            communicator: comm, vae: encoder.load, family: encoder.family, progress: { n, latents in
                let rate = Double(n) / max(Date().timeIntervalSince(start), 1e-9)
                progress.info("encoded \(n) (all \(comm.size) ranks; \(latents) latents in the plan, cached ones are reused), \(String(format: "%.2f", rate)) images/s")
            })
            if verbose {
                for j in try plan.latentJobs(vaeIdentity: encoder.identity) where j.owner == rank {
                    log.info("owns \(j.job.key.fileName) \(j.job.key)")
                }
            }
            for issue in caching.local.rebuilt { log.warning("\(issue.path): \(issue.reason)") }
            log.info("this rank: \(caching.local.hits) hits, \(caching.local.misses) misses, \(caching.local.rebuilt.count) rebuilt")
            let seconds = Date().timeIntervalSince(start)
            if rank == 0 {
                for issue in plan.issues { print("dataset: \(issue)") }
                let encoded = caching.misses + caching.rebuilt
                print("latent cache \(inputs.latentFolder.path): \(caching.hits + encoded) latents, \(caching.hits) hits, \(caching.misses) misses, "
                      + "\(caching.rebuilt) rebuilt (reasons logged by their owner ranks); \(comm.size) ranks, "
                      + (cfg.lora.cacheMode == .nodeLocal ? "cache_mode node_local (each rank's latents in its node's folder), " : "")
                      + String(format: "%.1f s, %.2f images/s", seconds, Double(encoded) / max(seconds, 1e-9)))
            }
        } catch {
            FileHandle.standardError.write(Data("error (rank \(rank)): \(error)\n".utf8))
            if comm.size > 1 { comm.abort(code: 1) }
            throw ExitCode.failure
        }
        try comm.finalize()
    }
}
