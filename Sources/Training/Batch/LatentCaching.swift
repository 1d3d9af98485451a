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

    /// `vae` is made only if this rank has something to encode. `progress(done, mine)` after each encoded latent.
    public init(plan: TrainingPlan, cache: LatentCache, vaeIdentity: String, communicator: any Communicator,
                vae: () throws -> VAE, progress: (Int, Int) -> Void = { _, _ in }) throws {
        let jobs = try plan.latentJobs(vaeIdentity: vaeIdentity)
        var keys: [String: [Bool: LatentKey]] = [:]
        var owner: [LatentKey: Int] = [:]
        for j in jobs {
            keys[j.sampleID, default: [:]][j.job.flip] = j.job.key
            owner[j.job.key] = j.owner
        }
        let rank = communicator.rank
        var model: VAE? = nil
        local = try CacheBuilder.build(jobs.map(\.job), cache: cache, isAssigned: { owner[$0.key] == rank }, encode: { x in
            if model == nil { model = try vae() }
            let (mean, logvar) = model!.encode(Tape(recording: false), Var(x))
            return (mean.value, logvar.value)
        }, progress: progress)
        // Every file is complete before any rank reads the cache.
        try communicator.barrier()
        let totals = try communicator.allReduce([Int64(local.hits), Int64(local.misses), Int64(local.rebuilt.count)], op: .sum)
        (hits, misses, rebuilt) = (Int(totals[0]), Int(totals[1]), Int(totals[2]))
        self.keys = keys
    }
}
