import Dataset
import Distributed
import Foundation
import Logging
import SafeTensors
import SDXL
import Tensor

public struct TrainingError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// How a run ended.
public enum TrainingOutcome: Equatable {
    case finished
    /// A stop signal arrived; the state was saved (`signal` is the one this rank saw, if any).
    case stopped(signal: Int32?)
}

/// `lora-dist train`: dataset → latent cache → UNet + LoRA steps on every rank → gradient all-reduce → optimizer →
/// LoRA files and resumable states (rank 0 writes). Every rank runs the same code on its own share of each step.
public final class Trainer {
    public let config: TrainingConfig
    public let communicator: any Communicator
    public var rank: Int { communicator.rank }
    public var worldSize: Int { communicator.size }
    let log = Logger(label: "train")
    /// Rank 0's user-facing lines (stdout).
    let say: (String) -> Void

    // Set up by `prepare()`.
    var checkpoint: SDXLCheckpoint!
    var unet: UNet!
    var network: LoRANetwork!
    var optimizer: Optimizer!
    var layout: ParameterLayout!
    var schedule: LRSchedule!
    var noiseSchedule = NoiseSchedule()
    var noiseOptions = NoiseOptions()
    var lossOptions = LossOptions()
    var coordinator: Coordinator!
    /// The dataset at its first (or only) training resolution: subsets, captions, the batch size.
    var report: DatasetReport { reports[0].report }
    var latentCache: LatentCache!
    /// The dataset at each training resolution (nil: the dataset's own).
    var reports: [(resolution: Int?, report: DatasetReport)] = []
    /// Sample id (the image path, or `path@resolution` with several resolutions) → its dataset entry.
    var samples: [String: DatasetReport.Entry] = [:]
    var latentKeys: [String: [Bool: LatentKey]] = [:]   // sample id → flip → key
    var text: TextConditioner!
    var reducer: GradientAllReduce!
    var seed: UInt64 = 0
    var totalSteps = 0
    var totalEpochs = 0
    var baseLearningRates: [Double] = []
    var startedAt = Date()
    var filesWritten: [String] = []

    public init(config: TrainingConfig, communicator: any Communicator, say: @escaping (String) -> Void = { print($0) }) {
        self.config = config
        self.communicator = communicator
        self.say = communicator.rank == 0 ? say : { _ in }
    }

    var outputDirectory: URL { URL(fileURLWithPath: config.outputDir) }
    var cacheDirectory: URL {
        config.lora.cacheDir.map { URL(fileURLWithPath: $0) } ?? outputDirectory.appendingPathComponent("cache")
    }
    var stateDirectory: URL { outputDirectory.appendingPathComponent("\(config.outputName)-state") }

    // MARK: setup

    /// Rank 0 creates what must exist before anyone reads it (generated model and dataset); then everyone loads.
    func prepare() throws {
        let fm = FileManager.default
        seed = UInt64(truncatingIfNeeded: config.seed ?? 42)
        if rank == 0 {
            try fm.createDirectory(at: outputDirectory, withIntermediateDirectories: true)
            try fm.createDirectory(at: cacheDirectory, withIntermediateDirectories: true)
        }
        try communicator.barrier()

        // The model. builtin:tiny is the demo's generated checkpoint (deterministic: the same file on every run).
        var modelPath = config.pretrainedModelNameOrPath
        if modelPath == "builtin:tiny" {
            modelPath = cacheDirectory.appendingPathComponent("builtin-tiny.safetensors").path
            if rank == 0 && !fm.fileExists(atPath: modelPath) {
                var meta = SDXLPreset.tiny.metadata
                meta["lora_dist.seed"] = "0"
                try writeSafeTensors(SDXLPreset.tiny.randomWeights(seed: 0, dtype: .f32), metadata: meta, to: modelPath)
            }
        } else if modelPath.isEmpty {
            throw TrainingError("pretrained_model_name_or_path is not set: name an SDXL checkpoint (.safetensors or a diffusers folder), or builtin:tiny")
        }
        // The dataset. builtin:shapes is drawn into the cache folder by rank 0.
        let builtinFolder = cacheDirectory.appendingPathComponent("builtin-shapes")
        if config.datasetSource == "builtin:shapes" && rank == 0 {
            try? fm.removeItem(at: builtinFolder)
            _ = try SyntheticShapes.write(to: builtinFolder)
        }
        try communicator.barrier()

        guard fm.fileExists(atPath: modelPath) else {
            throw TrainingError("pretrained_model_name_or_path: \(modelPath) does not exist (run `lora-dist make-model --preset sdxl --out FILE` for a random-weight stand-in)")
        }
        checkpoint = try SDXLCheckpoint(path: modelPath)

        let datasetConfig = try config.datasetConfig(builtinFolder: builtinFolder)
        // One report per training resolution (AI Toolkit's `resolution: [512, 768]`: every image at each). With one
        // resolution a sample's id is its path; with several, `path@resolution`.
        let resolutions: [Int?] = (config.lora.resolutions ?? []).count > 1 ? config.lora.resolutions!.sorted() : [nil]
        var issues = Set<String>()
        samples = [:]
        reports = []
        for r in resolutions {
            var cfg = datasetConfig
            if let r {
                cfg.general.resolution = [r, r]
                cfg.datasets = cfg.datasets.map { $0.map { var s = $0; s.resolution = [r, r]; return s } }
            }
            let rep = try DatasetReport.make(cfg)
            for issue in rep.issues where issues.insert(issue.description).inserted { say("skipped \(issue)") }
            for e in rep.entries { samples[Self.sampleID(e, subsets: rep.subsets, resolution: r)] = e }
            reports.append((r, rep))
        }
        let manifest = samples.map { id, e in
            ManifestEntry(id: id, width: e.placement.bucket.width, height: e.placement.bucket.height, repeats: e.image.repeats)
        }
        // The batch size is the dataset's (kohya: a dataset TOML's batch_size, else train_batch_size).
        coordinator = try Coordinator(manifest: manifest, seed: seed, worldSize: worldSize, batchSize: report.batchSize,
                                      gradientAccumulation: config.gradientAccumulationSteps, cacheMode: config.lora.cacheMode)

        // Length: max_train_epochs wins over max_train_steps, as kohya.
        let perEpoch = coordinator.optimizerStepsPerEpoch
        if let epochs = config.maxTrainEpochs {
            totalSteps = epochs * perEpoch
        } else {
            totalSteps = config.maxTrainSteps
        }
        guard totalSteps > 0 else { throw TrainingError("nothing to train: max_train_steps/max_train_epochs give 0 steps") }
        totalEpochs = (totalSteps + perEpoch - 1) / perEpoch

        try buildLatentCache()
        let net = try config.networkOptions
        let memoize = !net.trainTextEncoder && report.subsets.allSatisfy { TextCache.isStatic(options: captionOptions(for: $0)) }
        // sgm's pooled projection (what ComfyUI/A1111/diffusers use at inference); kohya's single-file loader leaves
        // bigG's text_projection untransposed, which gives another pooled vector — we train with the inference one.
        let encoders = try checkpoint.textEncoders(pooledProjection: .openCLIP)
        text = try TextConditioner(encoders: encoders, maxTokenLength: config.maxTokenLength, memoize: memoize)
        unet = try checkpoint.unet()

        let spec = LoRASpec(linearRank: net.linearDim, linearAlpha: Float(net.linearAlpha), convRank: net.convDim,
                            convAlpha: net.convAlpha.map(Float.init), dropout: net.dropout.map(Float.init),
                            rankDropout: net.rankDropout.map(Float.init), moduleDropout: net.moduleDropout.map(Float.init))
        network = try LoRANetwork(unet: net.trainUNet ? unet : nil, textEncoders: net.trainTextEncoder ? encoders : nil,
                                  spec: spec, seed: RunRandom.mix([seed, RunRandom.Stream.lora.rawValue]))
        if let weights = config.networkWeights {
            try network.load(try LoRAFile.read(weights))
            say("network_weights: started from \(weights)")
        }
        // kohya's parameter groups (prepare_optimizer_params_with_multiple_te_lrs): text encoder 1 and 2 at
        // text_encoder_lr (one value for both, or [te1, te2]; learning_rate when unset), the UNet at unet_lr
        // (else learning_rate).
        layout = network.parameterLayout
        baseLearningRates = network.models.map { model in
            switch model {
            case .unet: return config.unetLR ?? config.learningRate
            case .textEncoder1: return config.textEncoderLR?.first ?? config.learningRate
            case .textEncoder2: return config.textEncoderLR?.last ?? config.learningRate
            }
        }
        optimizer = try Optimizers.make(type: config.optimizerType, args: config.optimizerArgs, layout: layout,
                                        baseLearningRate: config.learningRate)
        let warmup = LRSchedule.warmupSteps(config.lrWarmupSteps, totalSteps: totalSteps)
        // One rank's schedule over max_train_steps, as a single-GPU kohya run has it (kohya on N processes steps its
        // scheduler N times per optimizer step, which shortens an integer warmup N-fold; lora-dist's ranks stand in
        // for one device, so the schedule a user wrote is the one applied).
        schedule = try LRSchedule(name: config.lrScheduler, warmupSteps: warmup, totalSteps: totalSteps,
                                  numCycles: config.lrSchedulerNumCycles, power: config.lrSchedulerPower,
                                  // transformers' polynomial schedule decays from optimizer.defaults["lr"], which kohya
                                  // sets to learning_rate (not a group's rate).
                                  baseLearningRate: config.learningRate)
        try optimizer.validate(learningRates: baseLearningRates)

        noiseSchedule = NoiseSchedule(zeroTerminalSNR: config.zeroTerminalSNR)
        noiseOptions = NoiseOptions(noiseOffset: config.noiseOffset, noiseOffsetRandomStrength: config.noiseOffsetRandomStrength,
                                    adaptiveNoiseScale: config.adaptiveNoiseScale,
                                    multiresNoiseIterations: config.multiresNoiseIterations,
                                    multiresNoiseDiscount: config.multiresNoiseDiscount, ipNoiseGamma: config.ipNoiseGamma,
                                    ipNoiseGammaRandomStrength: config.ipNoiseGammaRandomStrength,
                                    minTimestep: config.minTimestep, maxTimestep: config.maxTimestep)
        try noiseOptions.validate(trainSteps: noiseSchedule.trainSteps)
        lossOptions = LossOptions(type: try LossType(kohyaName: config.lossType),
                                  huberSchedule: try HuberSchedule(kohyaName: config.huberSchedule),
                                  huberC: config.huberC, huberScale: config.huberScale, minSNRGamma: config.minSNRGamma,
                                  vPrediction: config.vParameterization,
                                  scaleVPredLossLikeNoisePred: config.scaleVPredLossLikeNoisePred,
                                  vPredLikeLoss: config.vPredLikeLoss, debiasedEstimation: config.debiasedEstimationLoss)
        try lossOptions.validate()
        reducer = try GradientAllReduce(communicator: communicator, count: network.parameterCount, format: config.lora.wireFormat)
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

    func captionOptions(for subset: SubsetConfig) -> CaptionOptions {
        CaptionOptions(subset: subset, trigger: config.lora.trigger)
    }

    /// Every (image, bucket, flip) latent, each encoded by its coordinator owner into the shared cache folder.
    func buildLatentCache() throws {
        let vaeIdentity = try LatentCache.vaeIdentity(weightsPath: checkpoint.path)
        var jobs: [CacheJob] = []
        var jobOwner: [LatentKey: Int] = [:]
        for (r, rep) in reports {
            for job in try CacheBuilder.jobs(rep, vaeIdentity: vaeIdentity) {
                let id = Self.sampleID(job.entry, subsets: rep.subsets, resolution: r)
                latentKeys[id, default: [:]][job.flip] = job.key
                jobOwner[job.key] = coordinator.owner[id]
                jobs.append(job)
            }
        }
        latentCache = try LatentCache(storage: .disk(cacheDirectory.appendingPathComponent("latents")))
        let mine: (CacheJob) -> Bool = { jobOwner[$0.key] == self.rank }
        var vae: VAE? = nil
        let local = try CacheBuilder.build(jobs, cache: latentCache, isAssigned: mine, encode: { x in
            if vae == nil { vae = try self.checkpoint.vae() }
            let (mean, logvar) = vae!.encode(Tape(recording: false), Var(x))
            return (mean.value, logvar.value)
        })
        for issue in local.rebuilt { log.warning("\(issue.path): \(issue.reason)") }
        try communicator.barrier()
        let totals = try communicator.allReduce([Int64(local.hits), Int64(local.encoded)], op: .sum)
        say("latent cache \(cacheDirectory.appendingPathComponent("latents").path): \(totals[0]) reused, \(totals[1]) encoded")
    }

    // MARK: one micro-step

    /// This rank's batch of step `stepIndex` of `plan`: forward, loss, backward into `gradients` (sum over samples of
    /// each sample's gradient). Returns (sum of per-sample losses, samples).
    func microStep(plan: EpochPlan, stepIndex: Int, gradients: inout [Float]) throws -> (lossSum: Double, samples: Int) {
        let step = plan.steps[stepIndex]
        let ids = step.batches[rank]
        guard !ids.isEmpty else { return (0, 0) }
        // Occurrence of each id in this step counting earlier ranks' batches: a sample's random draws depend on
        // (epoch, step, image, occurrence), not on which rank trains it.
        var seen: [String: Int] = [:]
        for r in 0..<rank { for id in step.batches[r] { seen[id, default: 0] += 1 } }

        var latents: [Tensor] = [], noise: [Tensor] = [], noisy: [Tensor] = [], timesteps: [Int] = []
        var captions: [String] = [], weights: [Float] = []
        var original: [(h: Int, w: Int)] = [], crops: [(top: Int, left: Int)] = [], targets: [(h: Int, w: Int)] = []
        for id in ids {
            let occurrence = seen[id, default: 0]
            seen[id] = occurrence + 1
            guard let entry = samples[id], let keys = latentKeys[id] else { throw TrainingError("\(id): not in the dataset's latent jobs") }
            let subset = report.subsets[entry.image.subset]
            var flipRNG = RunRandom.sample(seed: seed, .flip, epoch: plan.epoch, step: stepIndex, image: id, occurrence: occurrence)
            let flip = keys[true] != nil && flipRNG.uniform() < 0.5
            let key = keys[flip]!
            guard let cached = latentCache.lookup(key) else {
                throw TrainingError("\(entry.image.path): latent \(key.fileName) is missing from \(cacheDirectory.path)/latents (another rank's cache folder not shared? use cache_mode = \"node_local\" or a shared cache_dir)")
            }
            // A fresh draw from the VAE posterior each use (diffusers' latent_dist.sample()), × scaling factor.
            var latentRNG = RunRandom.sample(seed: seed, .latent, epoch: plan.epoch, step: stepIndex, image: id, occurrence: occurrence)
            let mean = cached.mean.fp32().scalars, logvar = cached.logvar.fp32().scalars
            let scale = checkpoint.vaeConfig?.scalingFactor ?? 0.13025
            let z = (0..<mean.count).map { i in (mean[i] + exp(0.5 * logvar[i]) * Float(latentRNG.normal())) * scale }
            let x0 = Tensor(shape: [1] + cached.mean.shape, z)
            var noiseRNG = RunRandom.sample(seed: seed, .noise, epoch: plan.epoch, step: stepIndex, image: id, occurrence: occurrence)
            let noised = DiffusionNoise.sample(latents: x0, schedule: noiseSchedule, options: noiseOptions, rng: &noiseRNG)
            latents.append(x0); noise.append(noised.noise); noisy.append(noised.noisyLatents); timesteps += noised.timesteps

            let raw = entry.image.caption ?? entry.image.classToken ?? ""
            // kohya's current_epoch counts from 1.
            let caption = Captions.process(raw, options: captionOptions(for: subset), seed: seed, epoch: plan.epoch + 1,
                                           imageID: id + "#\(occurrence)")
            captions.append(caption)
            weights.append(subset.isReg ? Float(subset.priorLossWeight) : 1)
            // kohya's size/crop conditioning: BucketManager.get_crop_ltrb of the bucket and the resized image (for a
            // flipped image the left is the target width − the crop's right), not the centre-trim offsets.
            let size = entry.placement.sdxlConditioning(flipped: flip)
            original.append((size.originalHeight, size.originalWidth))
            crops.append((size.cropTop, size.cropLeft))
            targets.append((size.targetHeight, size.targetWidth))
        }
        let b = ids.count
        let x0 = stackBatch(latents), eps = stackBatch(noise), xt = stackBatch(noisy)
        // Captions of different lengths (kohya max_token_length chunks) are the same length here: one max_token_length.
        let embedDim = checkpoint.sizeEmbedDim ?? 256
        let conditioning: (Tape) -> (context: Var, y: Var) = { [text = text!, checkpointing = config.gradientCheckpointing] t in
            let (context, pooled) = text.encode(t, captions, checkpointing: checkpointing)
            return (context, Conditioning.y(t, pooled: pooled, originalSize: original, cropTopLeft: crops,
                                            targetSize: targets, embedDim: embedDim))
        }
        network.training = true
        network.dropoutSeed = RunRandom.mix([seed, RunRandom.Stream.dropout.rawValue, UInt64(plan.epoch), UInt64(stepIndex), UInt64(rank)])
        let loss = TrainingStep.run(unet: unet, network: network, latents: x0, noise: eps, noisyLatents: xt, timesteps: timesteps,
                                    conditioning: conditioning, sampleWeights: weights, schedule: noiseSchedule, loss: lossOptions,
                                    checkpointing: config.gradientCheckpointing, gradients: &gradients)
        guard loss.loss.isFinite else { return (Double.nan, b) }
        return (Double(loss.loss) * Double(b), b)
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

/// The text encoders + UNet + LoRA step on one batch: conditioning, forward, kohya's loss, backward — one tape.
public enum TrainingStep {
    /// latents x0, noise ε, noisy latents x_t [B, 4, h, w]; timesteps B; `conditioning` puts context [B, T, 2048] and
    /// y [B, adm] on the step's tape (through the text encoders when their LoRA trains). The target is ε, or
    /// v = √ᾱ·ε − √(1−ᾱ)·x0 with `loss.vPrediction`. Adds Σ over samples of each sample's loss gradient (B × the
    /// gradient of the batch-mean loss) to `gradients` (the network's flat layout) unless the loss is not finite.
    public static func run(unet: UNet, network: LoRANetwork, latents x0: Tensor, noise: Tensor, noisyLatents: Tensor,
                           timesteps: [Int], conditioning: (Tape) -> (context: Var, y: Var), sampleWeights: [Float],
                           schedule: NoiseSchedule, loss options: LossOptions, checkpointing: Bool, gradients: inout [Float])
        -> (loss: Float, perSample: [Float]) {
        let b = timesteps.count
        let target = options.vPrediction ? schedule.velocity(x0, noise: noise, timesteps: timesteps) : noise
        network.bind(trainable: true)
        let tape = Tape(adapters: network)
        let (context, y) = conditioning(tape)
        let prediction = unet(tape, x: Var(noisyLatents), timesteps: Var(Tensor(shape: [b], timesteps.map(Float.init))),
                              context: context, y: y, checkpointing: checkpointing)
        let loss = DiffusionLoss.evaluate(prediction: prediction.value, target: target, timesteps: timesteps,
                                          sampleWeights: sampleWeights, schedule: schedule, options: options)
        guard loss.loss.isFinite else { return (loss.loss, loss.perSample) }
        // d(Σ per-sample losses)/d(prediction) = B · d(batch mean)/d(prediction).
        let grads = tape.backward(from: prediction, seed: Elementwise.scale(loss.gradient, Float(b)))
        network.accumulateGradients(grads, into: &gradients)
        return (loss.loss, loss.perSample)
    }

    /// The step on given conditioning tensors (frozen text encoders).
    public static func run(unet: UNet, network: LoRANetwork, latents x0: Tensor, noise: Tensor, noisyLatents: Tensor,
                           timesteps: [Int], context: Tensor, y: Tensor, sampleWeights: [Float], schedule: NoiseSchedule,
                           loss options: LossOptions, checkpointing: Bool, gradients: inout [Float])
        -> (loss: Float, perSample: [Float]) {
        run(unet: unet, network: network, latents: x0, noise: noise, noisyLatents: noisyLatents, timesteps: timesteps,
            conditioning: { _ in (Var(context), Var(y)) }, sampleWeights: sampleWeights, schedule: schedule, loss: options,
            checkpointing: checkpointing, gradients: &gradients)
    }
}
