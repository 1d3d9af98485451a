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

/// `lora-dist train`: builds the stages once (`TrainingStages`), then runs the loop (TrainingLoop.swift). Every rank
/// runs the same code on its own share of each step.
public final class Trainer {
    public let config: TrainingConfig
    public let communicator: any Communicator
    /// Rank 0's user-facing lines (stdout).
    let say: (String) -> Void
    /// The CLI's immediate stop on a signal (ImmediateStop); nil: signals act at step boundaries only.
    let stop: ImmediateStop?

    public init(config: TrainingConfig, communicator: any Communicator, stop: ImmediateStop? = nil,
                say: @escaping (String) -> Void = { print($0) }) {
        self.config = config
        self.communicator = communicator
        self.stop = stop
        self.say = communicator.rank == 0 ? say : { _ in }
    }

    /// Trains to the end (or to a stop signal), writing LoRA files and states from rank 0. Collective.
    @discardableResult
    public func run(resume: String? = nil) throws -> TrainingOutcome {
        let wallStart = Date()
        // The stages switch the process to the config's kernel family; a run in a process that does more (tests, an
        // embedding application) leaves it as it found it.
        let family = Kernels.family
        defer { Kernels.use(family) }
        let resume = resume ?? config.resume
        let stages = try TrainingStages(config: config, communicator: communicator, resume: resume, say: say)
        return try TrainingLoop(stages: stages, stop: stop, say: say).run(resume: resume, wallStart: wallStart)
    }
}

/// Every stage of a run, built once, in the order the data flows:
///   Plan (config → dataset → data plan → totals) → Batch (ids → latents, noise, captions, sizes) → Step (conditioning
///   + UNet + adapters + loss + backward on one tape → gradient sums) → Update (all-reduce → ÷ total → clip →
///   optimizer) → Checkpoint (LoRA files, states).
/// Everything that can be wrong with the config, the model or the network is found before the latent cache is built
/// (the first expensive work).
final class TrainingStages {
    let config: TrainingConfig
    let communicator: any Communicator
    let log = Logger(label: "train")
    let plan: TrainingPlan
    let checkpoint: SDXLCheckpoint
    let unet: UNet
    let text: TextConditioner
    let network: LoRANetwork
    let layout: ParameterLayout
    let noiseSchedule: NoiseSchedule
    let lossOptions: LossOptions
    let batches: BatchAssembler
    let update: GradientUpdate
    /// The overlapped all-reduce's buckets ([lora_dist] overlap_reduction; nil on one rank, where nothing is reduced,
    /// and when it is off).
    let buckets: GradientBuckets?
    let checkpointer: Checkpointer
    /// Sample images during training (kohya's sample_* keys); nil when the config asks for none.
    let sampler: TrainingSampler?
    let outputDirectory: URL
    /// Rank 0's hold on output_dir for the run (released at the end; the kernel drops it if the process dies).
    let outputLock: OutputLock?

    var rank: Int { communicator.rank }

    /// Test hooks (LORA_DIST_TEST_SETUP_DELAY / LORA_DIST_TEST_STEP_DELAY, seconds): a slow latent cache build and slow
    /// micro-steps on the tiny model, so that the stop tests can signal a rank while it is busy there.
    static let testSetupDelay = ProcessInfo.processInfo.environment["LORA_DIST_TEST_SETUP_DELAY"].flatMap { Double($0) }
    static let testStepDelay = ProcessInfo.processInfo.environment["LORA_DIST_TEST_STEP_DELAY"].flatMap { Double($0) }

    /// `resume`: checked against the config before the latent cache is built (a refused resume costs nothing).
    init(config: TrainingConfig, communicator: any Communicator, resume: String? = nil, say: (String) -> Void) throws {
        self.config = config
        self.communicator = communicator
        // The kernel family first: frozen weights are bound for it (WeightBinder) and latents are keyed by it.
        for line in config.useKernelFamily() { say(line) }
        let inputs = try RunInputs(config: config, communicator: communicator, lockOutput: true)
        outputDirectory = inputs.outputDirectory
        outputLock = inputs.outputLock
        if let stale = outputLock?.staleHolder {
            say("output_dir: the previous run here (\(stale)) did not finish (stopped, failed or killed); this run takes the folder over")
        }
        if let lock = outputLock {
            let removed = lock.removeLeftovers(in: [outputDirectory, outputDirectory.appendingPathComponent("\(config.outputName)-state")])
            if !removed.isEmpty { say("output_dir: removed \(removed.count) incomplete file(s) a killed writer left: \(removed.joined(separator: ", "))") }
        }
        checkpoint = try SDXLCheckpoint(path: inputs.modelPath)

        // Stage 1: the plan (the dataset resolved once: at config load, or here for the built-in one).
        plan = try TrainingPlan(config: config, dataset: inputs.dataset, worldSize: communicator.size)
        for issue in plan.issues { say("dataset: \(issue)") }

        // Models and the network: the text encoders feed every step; their LoRA modules exist when they are trained.
        let net = try config.networkOptions
        // sgm's pooled projection (what ComfyUI/A1111/diffusers use at inference); kohya's single-file loader leaves
        // bigG's text_projection untransposed, which gives another pooled vector — we train with the inference one.
        let encoders = try checkpoint.textEncoders(pooledProjection: .openCLIP)
        unet = try checkpoint.unet()
        if WeightBinder.bf16CopyBytes > 0 {
            say(String(format: "mixed_precision: the UNet's frozen matrices and kernels (%@ does not store them in bf16) were rounded to bf16 once: %.1f MB", inputs.modelPath, Double(WeightBinder.bf16CopyBytes) / 1e6))
        }
        let spec = LoRASpec(linearRank: net.linearDim, linearAlpha: Float(net.linearAlpha), convRank: net.convDim,
                            convAlpha: net.convAlpha.map(Float.init), dropout: net.dropout.map(Float.init),
                            rankDropout: net.rankDropout.map(Float.init), moduleDropout: net.moduleDropout.map(Float.init))
        network = try LoRANetwork(unet: net.trainUNet ? unet : nil, textEncoders: net.trainTextEncoder ? encoders : nil,
                                  spec: spec, seed: RunRandom.mix([plan.seed, RunRandom.Stream.lora.rawValue]))
        if let weights = config.networkWeights {
            try network.load(try LoRAFile.read(weights))
            say("network_weights: started from \(weights)")
        }

        // Stage 4's parts: kohya's parameter groups (prepare_optimizer_params_with_multiple_te_lrs) — each text
        // encoder at text_encoder_lr (one value for both, or [te1, te2]; learning_rate when unset), the UNet at
        // unet_lr (else learning_rate).
        layout = network.parameterLayout
        let rates = network.models.map { model -> Double in
            switch model {
            case .unet: return config.unetLR ?? config.learningRate
            case .textEncoder1: return config.textEncoderLR?.first ?? config.learningRate
            case .textEncoder2: return config.textEncoderLR?.last ?? config.learningRate
            }
        }
        let optimizer = try Optimizers.make(type: config.optimizerType, args: config.optimizerArgs, layout: layout,
                                            baseLearningRate: config.learningRate)
        try optimizer.validate(learningRates: rates)
        // One rank's schedule over max_train_steps, as a single-GPU kohya run has it (kohya on N processes steps its
        // scheduler N times per optimizer step, which shortens an integer warmup N-fold; lora-dist's ranks stand in
        // for one device, so the schedule a user wrote is the one applied). transformers' polynomial schedule decays
        // from optimizer.defaults["lr"], which kohya sets to learning_rate.
        let schedule = try LRSchedule(name: config.lrScheduler, warmupSteps: LRSchedule.warmupSteps(config.lrWarmupSteps, totalSteps: plan.totalSteps),
                                      totalSteps: plan.totalSteps, numCycles: config.lrSchedulerNumCycles,
                                      power: config.lrSchedulerPower, baseLearningRate: config.learningRate)

        // Stage 3's options.
        noiseSchedule = NoiseSchedule(zeroTerminalSNR: config.zeroTerminalSNR)
        let noiseOptions = NoiseOptions(noiseOffset: config.noiseOffset, noiseOffsetRandomStrength: config.noiseOffsetRandomStrength,
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
        let reducer = try GradientAllReduce(communicator: communicator, count: network.parameterCount, format: config.lora.wireFormat)
        update = GradientUpdate(communicator: communicator, reducer: reducer, optimizer: optimizer, schedule: schedule,
                                baseLearningRates: rates, maxGradNorm: config.maxGradNorm)
        // Built for `true` and `auto` (the loop measures both ways and keeps the faster: TrainingLoop.AutoOverlap).
        var overlap = communicator.size > 1 && config.lora.overlapReduction != .off
        if communicator.size > 1 {
            // Every rank must take the same path (per-bucket collectives or one): agreed, one small collective.
            let threadsOK = try communicator.allReduce([communicator.callsFromAnyThread ? 0 : 1], op: .max)[0] == 0
            if overlap && !threadsOK {
                say("overlap_reduction: this MPI library does not allow calls from a second thread (MPI_THREAD_SERIALIZED); the gradient is reduced after backward")
                overlap = false
            }
        }
        buckets = overlap ? GradientBuckets(network: network, reducer: reducer, bucketFloats: Int(config.lora.bucketMB * 1e6 / 4)) : nil
        checkpointer = Checkpointer(config: config, communicator: communicator, plan: plan, network: network,
                                    optimizer: optimizer, reducer: reducer, outputDirectory: outputDirectory)

        try checkpointer.preflight(resume: resume)

        // Sampling's prompts are read and checked now; its VAE is loaded at the first round.
        let (unet, checkpoint, config) = (self.unet, self.checkpoint, config)
        sampler = try TrainingSampler.make(config: config, seed: plan.seed, outputDirectory: outputDirectory) {
            let decoder = try LatentEncoder(checkpoint: checkpoint, vaeFile: config.vae, family: config.noHalfVAE ? .fp32 : Kernels.family)
            let g = try ImageGenerator(unet: unet, vae: try decoder.load(), textL: encoders.0, textG: encoders.1,
                                       sizeEmbedDim: checkpoint.sizeEmbedDim ?? 256,
                                       prediction: config.vParameterization ? .vPrediction : .epsilon,
                                       zeroTerminalSNR: config.zeroTerminalSNR)
            g.promptWindows = max(1, min(PromptEncoding.maxWindows, config.maxTokenLength / 75))
            g.vaeFamily = decoder.family
            return g
        }

        // Stage 2: the latent cache (the first expensive work), then the batch assembler over it. The VAE: kohya's --vae
        // file, else the checkpoint's; its shape is checked here, before anything is encoded.
        let latentFolder = inputs.latentFolder
        if let seconds = Self.testSetupDelay { Thread.sleep(forTimeInterval: seconds) }
        let cache = try LatentCache(storage: .disk(latentFolder))
        let encoder = try LatentEncoder(checkpoint: checkpoint, vaeFile: config.vae, family: config.noHalfVAE ? .fp32 : Kernels.family)
        let caching = try LatentCaching(plan: plan, cache: cache, vaeIdentity: encoder.identity,
                                        communicator: communicator, vae: encoder.load, family: encoder.family)
        for issue in caching.local.rebuilt { log.warning("\(issue.path): \(issue.reason)") }
        say("latent cache \(latentFolder.path): \(caching.hits) reused, \(caching.misses + caching.rebuilt) encoded")
        batches = BatchAssembler(plan: plan, latents: cache, latentKeys: caching.keys, cacheFolder: latentFolder,
                                 noiseSchedule: noiseSchedule, noiseOptions: noiseOptions,
                                 scalingFactor: encoder.config.scalingFactor, trigger: config.lora.trigger)
        let memoize = !net.trainTextEncoder && batches.captionOptions.allSatisfy { TextCache.isStatic(options: $0) }
        text = try TextConditioner(encoders: encoders, maxTokenLength: config.maxTokenLength, memoize: memoize)
    }

    /// Stages 2 and 3 for this rank's share of micro-step `stepIndex`: (Σ per-sample losses, samples), the gradient
    /// sums added into `gradients`.
    /// `stream`: the overlapped all-reduce, on the window's last micro-step (completed here unless this throws; the
    /// caller then abandons it).
    func microStep(_ epochPlan: EpochPlan, stepIndex: Int, gradients: inout [Float],
                   stream: GradientBuckets.Stream? = nil) throws -> (lossSum: Double, samples: Int) {
        guard let batch = try batches.batch(epochPlan, stepIndex: stepIndex, rank: rank) else {
            stream?.complete(grads: nil, gradients: &gradients)
            return (0, 0)
        }
        if let seconds = Self.testStepDelay { Thread.sleep(forTimeInterval: seconds) }
        network.training = true
        network.dropoutSeed = RunRandom.mix([plan.seed, RunRandom.Stream.dropout.rawValue, UInt64(epochPlan.epoch),
                                             UInt64(stepIndex), UInt64(rank)])
        let result = TrainingStep.run(batch, unet: unet, network: network, text: text, sizeEmbedDim: checkpoint.sizeEmbedDim ?? 256,
                                      schedule: noiseSchedule, loss: lossOptions, checkpointing: config.gradientCheckpointing,
                                      gradients: &gradients, stream: stream)
        stream?.complete(grads: nil, gradients: &gradients)
        return result
    }

    /// The start-up lines rank 0 prints.
    func startLines() -> [String] {
        let c = plan.coordinator
        var lines = c.summary(epochs: plan.totalEpochs)
        lines.append("global batch \(c.globalBatch) = \(config.trainBatchSize) per rank × \(config.gradientAccumulationSteps) accumulation × \(communicator.size) ranks; "
            + "\(plan.totalSteps) optimizer steps (\(c.optimizerStepsPerEpoch) per epoch, \(plan.totalEpochs) epochs)")
        let counts = network.models.map { m in "\(m.groupName) \(network.modules.filter { $0.model == m }.count)" }.joined(separator: ", ")
        lines.append("LoRA: \(network.modules.count) modules (\(counts)), \(network.parameterCount) parameters (rank \(network.spec.linearRank), alpha \(network.spec.linearAlpha)"
            + (network.spec.convRank.map { ", conv rank \($0)" } ?? "") + "); optimizer \(update.optimizer.name), lr "
            + zip(layout.groupNames, update.baseLearningRates).map { "\($0) \($1)" }.joined(separator: ", ") + ", schedule \(config.lrScheduler)")
        lines.append("wire format \(config.lora.wireFormat.rawValue); gradient checkpointing \(config.gradientCheckpointing ? "on" : "off"); computing in \(Kernels.family == .bf16 ? "bf16 (oneDNN; fp32 accumulation)" : "fp32")")
        return lines
    }
}
