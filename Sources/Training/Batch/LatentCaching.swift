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
                vae: () throws -> VAE, family: KernelFamily = Kernels.family,
                progress: (Int, Int) -> Void = { _, _ in }) throws {
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
            let (mean, logvar) = Kernels.with(family) { model!.encode(Tape(recording: false), Var(x)) }
            return (mean.value, logvar.value)
        }, progress: progress)
        // Every file is complete before any rank reads the cache.
        try communicator.barrier()
        let totals = try communicator.allReduce([Int64(local.hits), Int64(local.misses), Int64(local.rebuilt.count)], op: .sum)
        (hits, misses, rebuilt) = (Int(totals[0]), Int(totals[1]), Int(totals[2]))
        self.keys = keys
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
