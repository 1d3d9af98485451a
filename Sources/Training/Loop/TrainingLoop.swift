import Dataset
import Distributed
import Foundation
import SafeTensors
import Tensor

/// Where a run is: optimizer steps done and the next micro-step of the epoch plan. Saved in every state.
public struct TrainingPosition: Codable, Equatable, Sendable {
    public var optimizerSteps = 0
    public var epoch = 0
    /// Index of the next micro-step in `plan(epoch:)`.
    public var nextStep = 0
    public var nonFiniteRun = 0
    public var skippedSteps = 0
    public var losses: [Double] = []      // the moving window behind the average shown
    public init() {}
}

/// The metadata blob of a resumable state.
struct StateInfo: Codable {
    var format = 1
    var position: TrainingPosition
    var worldSize: Int
    var fingerprint: String
    var seed: UInt64
    var optimizer: String
    var wireFormat: String
    var trainingStartedAt: Double
}

extension Trainer {
    /// Trains to the end (or to a stop signal), writing LoRA files and states from rank 0. Collective.
    @discardableResult
    public func run(resume: String? = nil) throws -> TrainingOutcome {
        let wallStart = Date()
        try prepare()
        var position = TrainingPosition()
        startedAt = Date()
        var from = resume ?? config.resume
        if from == "auto" {
            // Job scripts pass `--resume auto`: continue from this run's newest state when there is one (a requeued
            // job), start fresh otherwise. Rank 0 decides, so every rank takes the same branch.
            var found: [UInt8] = [rank == 0 && ((try? CheckpointWriter.newestState(in: stateDirectory)) ?? nil) != nil ? 1 : 0]
            try communicator.broadcast(&found, root: 0)
            from = found[0] == 1 ? stateDirectory.path : nil
        }
        if let from {
            position = try restore(from: from)
            say("resumed from \(from) at step \(position.optimizerSteps)/\(totalSteps) (epoch \(position.epoch + 1))")
        } else {
            // Every rank starts from rank 0's initial values (they are equal by construction; this makes it so).
            try ParameterSync(communicator: communicator).broadcastFromRankZero(&network.parameters)
        }
        for line in startLines() { say(line) }
        StopSignal.install()

        let metrics = rank == 0 ? try MetricsWriter(jsonl: metricsURL, tensorboardDirectory: tensorBoardDirectory) : nil
        defer { metrics?.close() }
        let progress = rank == 0 ? TrainingProgress(total: totalSteps, startStep: position.optimizerSteps,
                                                    logEvery: config.lora.logEvery) : nil
        let sync = ParameterSync(communicator: communicator, every: max(config.lora.parameterCheckEvery, 1))
        var average = MovingLossAverage(window: max(coordinator.optimizerStepsPerEpoch, 1))
        for l in position.losses { _ = average.add(l) }
        var gradients = [Float](repeating: 0, count: network.parameterCount)
        var windowLoss = 0.0, windowSamples = 0, windowStart = Date(), windowNonFinite = false
        var communication = 0.0, trainedSamples = 0
        var outcome = TrainingOutcome.finished

        training: while position.optimizerSteps < totalSteps {
            let plan = coordinator.plan(epoch: position.epoch)
            while position.nextStep < plan.steps.count && position.optimizerSteps < totalSteps {
                let index = position.nextStep
                let (lossSum, samples) = try microStep(plan: plan, stepIndex: index, gradients: &gradients)
                if !lossSum.isFinite { windowNonFinite = true }
                windowLoss += lossSum
                windowSamples += samples
                position.nextStep += 1
                guard plan.steps[index].applyOptimizer else { continue }

                // Loss, samples and the non-finite flag of every rank: one small all-reduce.
                var summary: [Float] = [Float(windowLoss.isFinite ? windowLoss : 0), Float(windowSamples), windowNonFinite ? 1 : 0]
                try communicator.allReduceSum(&summary)
                let totalSamples = Int(summary[1])
                // Per-rank mean gradient, weighted by samples in the all-reduce: Σ_ranks Σ_samples g / Σ samples.
                if windowSamples > 0 { let inv = 1 / Float(windowSamples); for i in gradients.indices { gradients[i] *= inv } }
                var stats: GradientAllReduce.Stats? = nil
                if totalSamples > 0 {
                    stats = try reducer.average(&gradients, samples: windowSamples)
                    communication += stats!.seconds
                }
                let finite = summary[2] == 0 && gradients.allSatisfy { $0.isFinite }
                let meanLoss = totalSamples > 0 ? Double(summary[0]) / Double(totalSamples) : .nan
                var gradNorm: Double? = nil
                let lrs = baseLearningRates.map { $0 * schedule.factor(step: position.optimizerSteps) }
                position.optimizerSteps += 1
                if finite && totalSamples > 0 {
                    position.nonFiniteRun = 0
                    gradNorm = config.maxGradNorm > 0 ? GradientClipping.clip(&gradients, maxNorm: config.maxGradNorm)
                        : GradientClipping.totalNorm(gradients)
                    optimizer.step(parameters: &network.parameters, gradients: gradients, learningRates: lrs)
                } else {
                    position.nonFiniteRun += 1
                    position.skippedSteps += 1
                    progress?.note("step \(position.optimizerSteps): non-finite loss or gradient — step skipped (\(position.nonFiniteRun) in a row)")
                    if position.nonFiniteRun >= config.lora.maxNonFiniteSteps {
                        let last = (try? CheckpointWriter.newestState(in: stateDirectory))??.url.path ?? "none written"
                        throw TrainingError("\(position.nonFiniteRun) steps in a row had a non-finite loss or gradient; stopped. "
                            + "Saved files are intact (last state: \(last)). Lower the learning rate or check the data.")
                    }
                }
                let lossAverage = meanLoss.isFinite ? average.add(meanLoss) : average.value
                position.losses = average.losses
                trainedSamples += totalSamples
                let seconds = Date().timeIntervalSince(windowStart)
                if let metrics {
                    try metrics.write(StepMetrics(
                        step: position.optimizerSteps, epoch: position.epoch + 1, loss: meanLoss, lossAverage: lossAverage,
                        learningRates: Dictionary(uniqueKeysWithValues: zip(layout.groupNames, optimizer.effectiveLearningRates(lrs))),
                        gradientNorm: gradNorm, stepSeconds: seconds, communicationSeconds: stats?.seconds ?? 0,
                        compressionRatio: stats.map(\.compressionRatio), imagesPerSecond: Double(totalSamples) / max(seconds, 1e-9),
                        skipped: !finite))
                }
                progress?.update(step: position.optimizerSteps, loss: lossAverage,
                                 extra: String(format: "lr=%.3g", optimizer.effectiveLearningRates(lrs)[0]))
                for i in gradients.indices { gradients[i] = 0 }
                (windowLoss, windowSamples, windowNonFinite, windowStart) = (0, 0, false, Date())

                if config.lora.parameterCheckEvery > 0 { try sync.check(network.parameters, step: position.optimizerSteps) }
                let done = position.optimizerSteps >= totalSteps
                if let n = config.saveEveryNSteps, n > 0, position.optimizerSteps % n == 0, !done {
                    try saveLoRA(SaveNames.step(config.outputName, position.optimizerSteps), position: position, progress: progress)
                    try removeOldStepFiles(current: position.optimizerSteps)
                    if config.saveState { try saveState(position) }
                }
                if let killAt = Trainer.testKillAtStep, killAt == position.optimizerSteps, rank == 0 {
                    // Test hook (LORA_DIST_TEST_KILL_AT_STEP): die here as a SIGKILLed job would, mid-run, after this
                    // step's files are written — the kill-and-resume tests need the kill at a known step.
                    kill(getpid(), SIGKILL)
                }
                if let signalAt = Trainer.testSignalAtStep, signalAt == position.optimizerSteps, rank == worldSize - 1 {
                    // Test hook (LORA_DIST_TEST_SIGNAL_AT_STEP): a real SIGUSR1 to the last rank only, as a user's
                    // `kill -USR1 <pid>` or Slurm's warning signal would arrive.
                    raise(SIGUSR1)
                }
                if try StopSignal.shouldStop(communicator) {
                    try saveState(position)
                    outcome = .stopped(signal: StopSignal.pendingSignal)
                    break training
                }
            }
            if position.nextStep >= plan.steps.count {
                position.epoch += 1
                position.nextStep = 0
                let epochDone = position.epoch
                if let n = config.saveEveryNEpochs, n > 0, epochDone % n == 0, position.optimizerSteps < totalSteps {
                    try saveLoRA(SaveNames.epoch(config.outputName, epochDone), position: position, progress: progress)
                    if rank == 0 {
                        for e in SaveNames.epochsToRemove(existing: SaveNames.existingEpochs(in: outputDirectory, outputName: config.outputName),
                                                          current: epochDone, lastNEpochs: config.saveLastNEpochs) {
                            try? FileManager.default.removeItem(at: outputDirectory.appendingPathComponent(SaveNames.epoch(config.outputName, e)))
                        }
                    }
                    if config.saveState { try saveState(position) }
                }
            }
        }
        progress?.finish()
        if outcome == .finished {
            try saveLoRA(SaveNames.final(config.outputName), position: position, progress: nil, final: true)
            if config.saveState || config.saveStateOnTrainEnd { try saveState(position) }
        }
        try communicator.barrier()
        let summary = TrainingSummary(filesWritten: filesWritten, seconds: Date().timeIntervalSince(wallStart),
                                      images: trainedSamples, steps: position.optimizerSteps, ranks: worldSize,
                                      communicationSeconds: communication, skippedSteps: position.skippedSteps)
        for line in summary.lines() { say(line) }
        if case .stopped(let signal) = outcome {
            say("stopped by \(signal.map(StopSignal.name) ?? "a signal on another rank") at step \(position.optimizerSteps); resume with --resume \(stateDirectory.path)")
        }
        return outcome
    }

    static let testKillAtStep = ProcessInfo.processInfo.environment["LORA_DIST_TEST_KILL_AT_STEP"].flatMap { Int($0) }
    static let testSignalAtStep = ProcessInfo.processInfo.environment["LORA_DIST_TEST_SIGNAL_AT_STEP"].flatMap { Int($0) }

    var metricsURL: URL {
        config.lora.metricsFile.map { URL(fileURLWithPath: $0) }
            ?? outputDirectory.appendingPathComponent("\(config.outputName)-metrics.jsonl")
    }

    var tensorBoardDirectory: URL? {
        guard let with = config.logWith, with == "tensorboard" || with == "all" else { return nil }
        let base = config.loggingDir.map { URL(fileURLWithPath: $0) } ?? outputDirectory.appendingPathComponent("logs")
        return base.appendingPathComponent((config.logPrefix ?? "") + config.outputName)
    }

    func startLines() -> [String] {
        var lines = coordinator.summary(epochs: totalEpochs)
        lines.append("global batch \(coordinator.globalBatch) = \(config.trainBatchSize) per rank × \(config.gradientAccumulationSteps) accumulation × \(worldSize) ranks; "
            + "\(totalSteps) optimizer steps (\(coordinator.optimizerStepsPerEpoch) per epoch, \(totalEpochs) epochs)")
        lines.append("LoRA: \(network.modules.count) modules, \(network.parameterCount) parameters (rank \(network.spec.linearRank), alpha \(network.spec.linearAlpha)"
            + (network.spec.convRank.map { ", conv rank \($0)" } ?? "") + "); optimizer \(optimizer.name), lr "
            + zip(layout.groupNames, baseLearningRates).map { "\($0) \($1)" }.joined(separator: ", ") + ", schedule \(config.lrScheduler)")
        lines.append("wire format \(config.lora.wireFormat.rawValue); gradient checkpointing \(config.gradientCheckpointing ? "on" : "off"); computing in fp32")
        return lines
    }

    // MARK: saving

    func saveLoRA(_ name: String, position: TrainingPosition, progress: TrainingProgress?, final: Bool = false) throws {
        let url = outputDirectory.appendingPathComponent(name)
        if rank == 0 {
            let dtype: DType = config.savePrecision == "fp16" ? .f16 : config.savePrecision == "bf16" ? .bf16 : .f32
            let meta = loraMetadata(position: position, final: final)
            try LoRAFile.save(network, to: url.path, dtype: dtype, metadata: meta)
            filesWritten.append(url.path)
            progress?.note("saved \(url.path)")
        }
    }

    func removeOldStepFiles(current: Int) throws {
        guard rank == 0 else { return }
        let existing = SaveNames.existingSteps(in: outputDirectory, outputName: config.outputName)
        for step in SaveNames.stepsToRemove(existing: existing, current: current, lastNSteps: config.saveLastNSteps,
                                            keepCount: config.lora.keepStepSaves) {
            try? FileManager.default.removeItem(at: outputDirectory.appendingPathComponent(SaveNames.step(config.outputName, step)))
        }
    }

    /// Everything to continue bit-identically: LoRA values, optimizer state, position, and (bf16 wire) every rank's
    /// error-feedback residual. Collective (residuals are gathered); rank 0 writes atomically.
    func saveState(_ position: TrainingPosition) throws {
        var blobs: [(name: String, bytes: [UInt8])] = []
        var residualBlobs: [[UInt8]] = []
        if config.lora.wireFormat == .bf16 {
            residualBlobs = try communicator.allGather(reducer.residual.withUnsafeBytes { Array($0) })
        }
        guard rank == 0 else { try communicator.barrier(); return }
        let info = StateInfo(position: position, worldSize: worldSize, fingerprint: config.fingerprint, seed: seed,
                             optimizer: optimizer.name, wireFormat: config.lora.wireFormat.rawValue,
                             trainingStartedAt: startedAt.timeIntervalSince1970)
        blobs.append(("info.json", Array(try JSONEncoder().encode(info))))
        blobs.append(("lora", network.parameters.withUnsafeBytes { Array($0) }))
        for (name, bytes) in optimizer.stateBlobs() { blobs.append(("optimizer." + name, bytes)) }
        for (r, bytes) in residualBlobs.enumerated() { blobs.append(("residual.\(r)", bytes)) }
        let writer = try CheckpointWriter(directory: stateDirectory, rank: rank, every: 1, keep: config.lora.keepStates)
        if let url = try writer.write(step: position.optimizerSteps, blobs: blobs) { filesWritten.append(url.path) }
        try communicator.barrier()
    }

    /// Reads a state (a state file, or the state folder: its newest complete state) and checks it belongs to this run.
    func restore(from path: String) throws -> TrainingPosition {
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
            throw TrainingError("--resume \(path): no such state file or folder")
        }
        let url: URL
        if isDir.boolValue {
            guard let newest = try CheckpointWriter.newestState(in: URL(fileURLWithPath: path)) else {
                throw TrainingError("--resume \(path): the folder holds no complete state")
            }
            url = newest.url
        } else {
            url = URL(fileURLWithPath: path)
        }
        let blobs = try StateBlobs.read(url)
        guard let infoBytes = blobs["info.json"], let info = try? JSONDecoder().decode(StateInfo.self, from: Data(infoBytes)) else {
            throw TrainingError("\(url.path): not a lora-dist training state (no info.json blob)")
        }
        guard info.worldSize == worldSize else {
            throw TrainingError("\(url.path) was written by a run with \(info.worldSize) ranks; this run has \(worldSize). Resume with the same number of ranks (the data plan depends on it)")
        }
        guard info.fingerprint == config.fingerprint else {
            throw TrainingError("\(url.path): the configuration changed since this state was written (model, dataset, network, optimizer, schedule, seed, batch or loss settings). Resume with the same settings, or start a new run")
        }
        guard let lora = blobs["lora"], lora.count == network.parameterCount * 4 else {
            throw TrainingError("\(url.path): the LoRA blob is missing or has the wrong size for this network")
        }
        lora.withUnsafeBytes { raw in
            network.parameters = Array(raw.bindMemory(to: Float.self))
        }
        var optimizerBlobs: [String: [UInt8]] = [:]
        for (k, v) in blobs where k.hasPrefix("optimizer.") { optimizerBlobs[String(k.dropFirst("optimizer.".count))] = v }
        try optimizer.restore(optimizerBlobs)
        if config.lora.wireFormat == .bf16, let residual = blobs["residual.\(rank)"] {
            try reducer.restoreResidual(residual.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) })
        }
        startedAt = Date(timeIntervalSince1970: info.trainingStartedAt)
        return info.position
    }
}
