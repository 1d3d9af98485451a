import ArgumentParser
import Dataset
import Distributed
import Foundation
import Logging
import SDXL
import Tensor

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

/// `lora-dist cache CONFIG --model FILE --cache-dir DIR`: encode every latent the dataset trains on into a shared
/// cache folder before training, each (image, bucket, flip) by its coordinator owner rank, under mpirun.
struct CacheCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cache",
        abstract: "Build the latent cache ahead of training (in parallel under mpirun; --cache-dir must be shared).")

    @OptionGroup var engine: EngineOptions
    @Argument(help: "A kohya dataset TOML, a folder (flat, or kohya img/N_name/ subfolders), or builtin:shapes.")
    var config: String
    @Option(help: "The SDXL single-file checkpoint whose VAE encodes.") var model: String
    @Option(help: "The latent cache folder (shared by all ranks).") var cacheDir: String
    @Option(help: "Training resolution when CONFIG is a folder.") var resolution = 1024
    @Option(help: "Per-rank batch size when CONFIG is a folder (a TOML's own batch_size wins).") var batchSize = 1
    @Option(help: "Caption file extension when CONFIG is a folder.") var captionExtension = ".txt"
    @Flag(help: "Each rank logs every latent it encodes.") var verbose = false

    func run() throws {
        RankLogging.bootstrap()
        let log = Logger(label: "cache")
        let comm = try startRanks(log)
        engine.apply()
        let progress = RankLogging.progress()
        let cacheURL = URL(fileURLWithPath: cacheDir)

        // builtin:shapes goes into the shared cache folder, written by rank 0 alone, so every rank sees the
        // same paths (the coordinator's ownership is keyed by path).
        let builtin = cacheURL.appendingPathComponent("builtin-shapes")
        if config == "builtin:shapes" {
            if comm.rank == 0 {
                try FileManager.default.createDirectory(at: cacheURL, withIntermediateDirectories: true)
                try? FileManager.default.removeItem(at: builtin)
                try SyntheticShapes.write(to: builtin)
            }
            try comm.barrier()
        }
        let report = try resolveDatasetReport(config, builtinFolder: builtin, resolution: resolution,
                                              captionExtension: captionExtension, batchSize: batchSize,
                                              writeBuiltin: false)
        let jobs = try CacheBuilder.jobs(report, vaeIdentity: try LatentCache.vaeIdentity(weightsPath: model))
        let manifest = report.entries.map {
            ManifestEntry(id: $0.image.path, width: $0.placement.bucket.width, height: $0.placement.bucket.height,
                          repeats: $0.image.repeats)
        }
        let coord = try Coordinator(manifest: manifest, seed: 0, worldSize: comm.size, batchSize: report.batchSize,
                                    cacheMode: .shared)
        let rank = comm.rank
        let isMine: (CacheJob) -> Bool = { coord.owner[$0.entry.image.path] == rank }

        let ckpt = try SDXLCheckpoint(path: model)
        // fp32 activations; each op widens the checkpoint's (possibly fp16) weights as it reads them.
        let vae = try ckpt.vae()
        // LatentKey's latent shape is [4, H/8, W/8] (SDXL's VAE); refuse any other VAE before encoding anything.
        guard vae.config.downsamplingFactor == 8, vae.config.zChannels == 4 else {
            if rank == 0 {
                FileHandle.standardError.write(Data(("error: \(model): the VAE downsamples by \(vae.config.downsamplingFactor) with "
                    + "\(vae.config.zChannels) latent channels; the latent cache stores SDXL's [4, H/8, W/8]\n").utf8))
            }
            try? comm.finalize()
            throw ExitCode.failure
        }
        let cache = try LatentCache(storage: .disk(cacheURL))
        let start = Date()
        let local = try CacheBuilder.build(jobs, cache: cache, isAssigned: isMine, encode: { x in
            let (mean, logvar) = vae.encode(Tape(recording: false), Var(x))
            return (mean.value, logvar.value)
        }, progress: { n, total in
            let rate = Double(n) / max(Date().timeIntervalSince(start), 1e-9)
            progress.info("encoded \(n)/\(total) (rank 0's share of \(jobs.count)), \(String(format: "%.2f", rate)) images/s")
        })
        if verbose {
            for job in jobs where isMine(job) { log.info("owns \(job.key.fileName) \(job.key)") }
        }
        for issue in local.rebuilt { log.warning("\(issue.path): \(issue.reason)") }
        log.info("this rank: \(local.hits) hits, \(local.misses) misses, \(local.rebuilt.count) rebuilt")
        // Every file is complete before any rank reads the cache.
        try comm.barrier()
        let totals = try comm.allReduce([Int64(local.hits), Int64(local.misses), Int64(local.rebuilt.count)], op: .sum)
        let seconds = Date().timeIntervalSince(start)
        if rank == 0 {
            let encoded = totals[1] + totals[2]
            print("latent cache \(cacheURL.path): \(totals[0] + encoded) latents, \(totals[0]) hits, \(totals[1]) misses, "
                  + "\(totals[2]) rebuilt (reasons logged by their owner ranks); \(comm.size) ranks, "
                  + String(format: "%.1f s, %.2f images/s", seconds, Double(encoded) / max(seconds, 1e-9)))
        }
        try comm.finalize()
    }
}
