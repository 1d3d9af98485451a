import Dataset
import Foundation
import SDXL
import Tensor

/// One rank's share of one micro-step, ready for the step.
public struct TrainingBatch {
    public let ids: [String]
    /// x0 (drawn from the cached VAE posterior, × the scaling factor), ε, and x_t [B, 4, h, w].
    public let latents: Tensor
    public let noise: Tensor
    public let noisyLatents: Tensor
    public let timesteps: [Int]
    /// Processed captions (shuffle, dropout, trigger …), one per sample.
    public let captions: [String]
    /// kohya's SDXL size conditioning per sample (original size, crop, target size).
    public let sizes: [SDXLSizeConditioning]
    /// Per-sample loss weights (prior_loss_weight for regularisation images).
    public let weights: [Float]
    public var count: Int { ids.count }
}

/// Stage 2 — sample ids → a batch: latents from the cache (a fresh posterior draw each use), noise and timesteps,
/// processed captions, kohya's size/crop conditioning, loss weights. Every draw is keyed by (seed, epoch, step,
/// image, occurrence), so a sample gets the same batch row whichever rank trains it.
final class BatchAssembler {
    let plan: TrainingPlan
    let latents: LatentCache
    /// Sample id → flip → its latent's key.
    let latentKeys: [String: [Bool: LatentKey]]
    let cacheFolder: URL
    let noiseSchedule: NoiseSchedule
    let noiseOptions: NoiseOptions
    let scalingFactor: Float
    let captionOptions: [CaptionOptions]

    init(plan: TrainingPlan, latents: LatentCache, latentKeys: [String: [Bool: LatentKey]], cacheFolder: URL,
         noiseSchedule: NoiseSchedule, noiseOptions: NoiseOptions, scalingFactor: Float, trigger: String?) {
        self.plan = plan
        self.latents = latents
        self.latentKeys = latentKeys
        self.cacheFolder = cacheFolder
        self.noiseSchedule = noiseSchedule
        self.noiseOptions = noiseOptions
        self.scalingFactor = scalingFactor
        captionOptions = plan.report.subsets.map { CaptionOptions(subset: $0, trigger: trigger) }
    }

    /// This rank's batch of micro-step `stepIndex` of `epochPlan` (nil: none this step).
    func batch(_ epochPlan: EpochPlan, stepIndex: Int, rank: Int) throws -> TrainingBatch? {
        let step = epochPlan.steps[stepIndex]
        let ids = step.batches[rank]
        guard !ids.isEmpty else { return nil }
        let seed = plan.seed, epoch = epochPlan.epoch
        // Occurrence of each id in this step counting earlier ranks' batches: a sample's random draws depend on
        // (epoch, step, image, occurrence), not on which rank trains it.
        var seen: [String: Int] = [:]
        for r in 0..<rank { for id in step.batches[r] { seen[id, default: 0] += 1 } }

        var x0s: [Tensor] = [], noises: [Tensor] = [], noisy: [Tensor] = [], timesteps: [Int] = []
        var captions: [String] = [], sizes: [SDXLSizeConditioning] = [], weights: [Float] = []
        for id in ids {
            let occurrence = seen[id, default: 0]
            seen[id] = occurrence + 1
            guard let entry = plan.samples[id], let keys = latentKeys[id] else { throw TrainingError("\(id): not in the dataset's latent jobs") }
            let subset = plan.report.subsets[entry.image.subset]
            var flipRNG = RunRandom.sample(seed: seed, .flip, epoch: epoch, step: stepIndex, image: id, occurrence: occurrence)
            let flip = keys[true] != nil && flipRNG.uniform() < 0.5
            let key = keys[flip]!
            guard let cached = latents.lookup(key) else {
                throw TrainingError("\(entry.image.path): latent \(key.fileName) is missing from \(cacheFolder.path) (another rank's cache folder not shared? use cache_mode = \"node_local\" or a shared cache_dir)")
            }
            // A fresh draw from the VAE posterior each use (diffusers' latent_dist.sample()), × scaling factor.
            var latentRNG = RunRandom.sample(seed: seed, .latent, epoch: epoch, step: stepIndex, image: id, occurrence: occurrence)
            let mean = cached.mean.fp32().scalars, logvar = cached.logvar.fp32().scalars
            let z = (0..<mean.count).map { i in (mean[i] + exp(0.5 * logvar[i]) * Float(latentRNG.normal())) * scalingFactor }
            let x0 = Tensor(shape: [1] + cached.mean.shape, z)
            var noiseRNG = RunRandom.sample(seed: seed, .noise, epoch: epoch, step: stepIndex, image: id, occurrence: occurrence)
            let noised = DiffusionNoise.sample(latents: x0, schedule: noiseSchedule, options: noiseOptions, rng: &noiseRNG)
            x0s.append(x0); noises.append(noised.noise); noisy.append(noised.noisyLatents); timesteps += noised.timesteps

            let raw = entry.image.caption ?? entry.image.classToken ?? ""
            // kohya's current_epoch counts from 1.
            captions.append(Captions.process(raw, options: captionOptions[entry.image.subset], seed: seed, epoch: epoch + 1,
                                             imageID: id + "#\(occurrence)"))
            // kohya's size/crop conditioning: BucketManager.get_crop_ltrb of the bucket and the resized image (for a
            // flipped image the left is the target width − the crop's right), not the centre-trim offsets.
            sizes.append(entry.placement.sdxlConditioning(flipped: flip))
            weights.append(subset.isReg ? Float(subset.priorLossWeight) : 1)
        }
        return TrainingBatch(ids: ids, latents: stackBatch(x0s), noise: stackBatch(noises), noisyLatents: stackBatch(noisy),
                             timesteps: timesteps, captions: captions, sizes: sizes, weights: weights)
    }
}

extension CaptionOptions {
    /// The caption processing a kohya subset asks for, plus AI Toolkit's trigger word.
    init(subset s: SubsetConfig, trigger: String?) {
        self.init(shuffle: s.shuffleCaption, keepTokens: s.keepTokens, keepTokensSeparator: s.keepTokensSeparator,
                  captionSeparator: s.captionSeparator, secondarySeparator: s.secondarySeparator,
                  enableWildcard: s.enableWildcard, captionDropoutRate: s.captionDropoutRate,
                  tagDropoutRate: s.captionTagDropoutRate, dropoutEveryNEpochs: s.captionDropoutEveryNEpochs,
                  prefix: s.captionPrefix, suffix: s.captionSuffix, trigger: trigger)
    }
}

/// Concatenates per-sample tensors [1, …] along the batch axis.
func stackBatch(_ parts: [Tensor]) -> Tensor {
    if parts.count == 1 { return parts[0] }
    return Tape(recording: false).concat(parts.map { Var($0) }, axis: 0).value
}
