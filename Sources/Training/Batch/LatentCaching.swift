import Dataset
import Distributed
import Foundation
import SDXL
import Tensor

/// The latent cache of a plan: every (image, bucket, flip) latent, each encoded by its coordinator owner into the
/// shared cache folder (`lora-dist train` before its first step, `lora-dist cache` ahead of training — the same plan,
/// so the same owners). Collective: returns once every rank's latents are on disk.
public struct LatentCaching {
    /// Sample id → flip → its latent's key.
    public let keys: [String: [Bool: LatentKey]]
    /// What this rank did.
    public let local: CacheReport
    /// Over all ranks: reused, encoded (new), re-encoded (stale or corrupt).
    public let hits: Int, misses: Int, rebuilt: Int

    /// Message tag of the progress counts the ranks send rank 0.
    static let progressTag = 41

    /// `vae` is made only if this rank has something to encode. `progress(encoded, latents)`, on rank 0 only, while
    /// the ranks encode: latents encoded so far by all ranks, out of the plan's latents (hits included). Every rank
    /// passes a `progress` or none (with one, the other ranks send rank 0 their counts as they go).
    public init(plan: TrainingPlan, cache: LatentCache, vaeIdentity: String, communicator: any Communicator,
                vae: () throws -> VAE, family: KernelFamily = Kernels.family,
                progress: ((Int, Int) -> Void)? = nil) throws {
        let jobs = try plan.latentJobs(vaeIdentity: vaeIdentity)
        var keys: [String: [Bool: LatentKey]] = [:]
        var owner: [LatentKey: Int] = [:]
        for j in jobs {
            keys[j.sampleID, default: [:]][j.job.flip] = j.job.key
            owner[j.job.key] = j.owner
        }
        let rank = communicator.rank
        var model: VAE? = nil
        let board = progress.map { ProgressBoard(communicator: communicator, total: owner.count, report: $0) }
        local = try CacheBuilder.build(jobs.map(\.job), cache: cache, isAssigned: { owner[$0.key] == rank }, encode: { x in
            if model == nil { model = try vae() }
            let (mean, logvar) = Kernels.with(family) { model!.encode(Tape(recording: false), Var(x)) }
            return (mean.value, logvar.value)
        }, progress: { done, _ in try? board?.encoded(done) })
        try board?.finish()
        // Every file is complete before any rank reads the cache.
        try communicator.barrier()
        let totals = try communicator.allReduce([Int64(local.hits), Int64(local.misses), Int64(local.rebuilt.count)], op: .sum)
        (hits, misses, rebuilt) = (Int(totals[0]), Int(totals[1]), Int(totals[2]))
        self.keys = keys
    }
}

/// All ranks' encode counts on rank 0 (`lora-dist cache` progress): each other rank sends its running count (8 bytes,
/// eager) after each encode and a last message when it is done; rank 0 reads what has arrived after each of its own
/// encodes, then until every rank is done.
private final class ProgressBoard {
    let communicator: any Communicator
    let total: Int
    let report: (Int, Int) -> Void
    private var counts: [Int]
    private var finished: Set<Int> = []
    private var sends: [any PendingSendRequest] = []
    private var shown = -1

    init(communicator: any Communicator, total: Int, report: @escaping (Int, Int) -> Void) {
        self.communicator = communicator
        self.total = total
        self.report = report
        counts = [Int](repeating: 0, count: communicator.size)
    }

    private static func message(_ count: Int, done: Bool) -> [UInt8] {
        withUnsafeBytes(of: Int64(count).littleEndian, Array.init) + [done ? 1 : 0]
    }

    func encoded(_ done: Int) throws {
        counts[communicator.rank] = done
        if communicator.rank == 0 { try drain(); show() } else {
            sends.append(try communicator.isend(Self.message(done, done: false), to: 0, tag: LatentCaching.progressTag))
        }
    }

    private func drain() throws {
        while let (from, bytes) = try communicator.poll(tag: LatentCaching.progressTag), bytes.count == 9 {
            var v: Int64 = 0
            for k in 0..<8 { v |= Int64(bytes[k]) << (8 * k) }
            counts[from] = Int(v)
            if bytes[8] == 1 { finished.insert(from) }
        }
    }

    private func show() {
        let sum = counts.reduce(0, +)
        if sum != shown { shown = sum; report(sum, total) }
    }

    /// Rank 0: waits (polling every 50 ms) until every other rank said it is done; the others: says so.
    func finish() throws {
        if communicator.rank == 0 {
            while finished.count < communicator.size - 1 {
                try drain()
                show()
                if finished.count < communicator.size - 1 { usleep(50_000) }
            }
        } else {
            sends.append(try communicator.isend(Self.message(counts[communicator.rank], done: true), to: 0, tag: LatentCaching.progressTag))
            for s in sends { try s.wait() }
        }
    }
}

/// The VAE that encodes a run's latents: kohya's `--vae` file when given, else the checkpoint's own — its shape
/// (read from the file, nothing loaded) and its identity (what the latent cache keys carry, so a latent encoded by
/// another VAE is never reused).
public struct LatentEncoder {
    public let config: VAEConfig
    public let identity: String
    public let load: () throws -> VAE
    /// The kernel family it encodes on; a bf16 latent's identity ends in "/bf16" (fp32 ones keep the plain identity).
    public let family: KernelFamily

    /// `family`: the run's (Kernels.family), or fp32 where kohya's no_half_vae asks for it.
    public init(checkpoint: SDXLCheckpoint, vaeFile: String?, family: KernelFamily = Kernels.family) throws {
        self.family = family
        let suffix = family == .bf16 ? "/bf16" : ""
        if let vaeFile {
            guard FileManager.default.fileExists(atPath: vaeFile) else {
                throw TrainingError("vae: \(vaeFile) does not exist (a VAE .safetensors — single-file or diffusers names — or a diffusers vae/ folder)")
            }
            let file = try VAEFile(path: vaeFile)
            var config: VAEConfig
            do { config = try VAEConfig.infer(shapes: file.shapes) } catch {
                throw TrainingError("vae: \(vaeFile) is not an SDXL VAE: \(error)")
            }
            if let s = file.scalingFactor { config.scalingFactor = s }
            self.config = config
            identity = try LatentCache.vaeIdentity(weightsPath: file.sourceName) + suffix
            load = { try file.vae() }
        } else {
            guard let config = checkpoint.vaeConfig else {
                throw TrainingError("\(checkpoint.path) has no VAE (first_stage_model.*): give one with vae = FILE")
            }
            self.config = config
            identity = try LatentCache.vaeIdentity(weightsPath: checkpoint.path) + suffix
            load = { try checkpoint.vae() }
        }
        // LatentKey's latent shape is [4, H/8, W/8] (SDXL's VAE).
        guard config.downsamplingFactor == 8, config.zChannels == 4 else {
            throw TrainingError("the VAE downsamples by \(config.downsamplingFactor) with \(config.zChannels) latent channels; SDXL's latents are [4, H/8, W/8]")
        }
    }
}
