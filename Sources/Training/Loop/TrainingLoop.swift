import Distributed
import Foundation

/// The loop: batch → step (per micro-step) → update (per optimizer step) → events (metrics, saves, the stop
/// protocol). Collective: every rank runs it in lock-step.
final class TrainingLoop {
    let stages: TrainingStages
    let say: (String) -> Void
    var config: TrainingConfig { stages.config }
    var communicator: any Communicator { stages.communicator }
    var rank: Int { communicator.rank }

    init(stages: TrainingStages, say: @escaping (String) -> Void) {
        self.stages = stages
        self.say = say
    }

    static let testKillAtStep = ProcessInfo.processInfo.environment["LORA_DIST_TEST_KILL_AT_STEP"].flatMap { Int($0) }
    static let testSignalAtStep = ProcessInfo.processInfo.environment["LORA_DIST_TEST_SIGNAL_AT_STEP"].flatMap { Int($0) }

    func run(resume: String?, wallStart: Date) throws -> TrainingOutcome {
        let plan = stages.plan, network = stages.network, update = stages.update, checkpointer = stages.checkpointer
        var position = TrainingPosition()
        checkpointer.startedAt = Date()
        var from = resume
        // Job scripts pass `--resume auto`: continue from this run's newest state when there is one (a requeued job),
        // start fresh otherwise.
        if from == "auto" { from = try checkpointer.hasState() ? checkpointer.stateDirectory.path : nil }
        if let from {
            position = try checkpointer.restore(from: from)
            say("resumed from \(from) at step \(position.optimizerSteps)/\(plan.totalSteps) (epoch \(position.epoch + 1))")
        } else {
            // Every rank starts from rank 0's initial values (they are equal by construction; this makes it so).
            try ParameterSync(communicator: communicator).broadcastFromRankZero(&network.parameters)
        }
        for line in stages.startLines() { say(line) }
        StopSignal.install()

        let metrics = rank == 0 ? try MetricsWriter(jsonl: metricsURL, tensorboardDirectory: tensorBoardDirectory) : nil
        defer { metrics?.close() }
        let progress = rank == 0 ? TrainingProgress(total: plan.totalSteps, startStep: position.optimizerSteps,
                                                    logEvery: config.lora.logEvery) : nil
        let sync = ParameterSync(communicator: communicator, every: max(config.lora.parameterCheckEvery, 1))
        var average = MovingLossAverage(window: max(plan.coordinator.optimizerStepsPerEpoch, 1))
        for l in position.losses { _ = average.add(l) }
        var gradients = [Float](repeating: 0, count: network.parameterCount)
        var windowLoss = 0.0, windowSamples = 0, windowStart = Date(), windowNonFinite = false
        var communication = 0.0, trainedSamples = 0
        var outcome = TrainingOutcome.finished

        training: while position.optimizerSteps < plan.totalSteps {
            let epochPlan = plan.coordinator.plan(epoch: position.epoch)
            while position.nextStep < epochPlan.steps.count && position.optimizerSteps < plan.totalSteps {
                let index = position.nextStep
                let (lossSum, samples) = try stages.microStep(epochPlan, stepIndex: index, gradients: &gradients)
                if !lossSum.isFinite { windowNonFinite = true }
                windowLoss += lossSum
                windowSamples += samples
                position.nextStep += 1
                guard epochPlan.steps[index].applyOptimizer else { continue }

                let step = try update.apply(gradients: &gradients, lossSum: windowLoss, samples: windowSamples,
                                            nonFinite: windowNonFinite, parameters: &network.parameters,
                                            step: position.optimizerSteps)
                communication += step.reduce?.seconds ?? 0
                position.optimizerSteps += 1
                if step.applied {
                    position.nonFiniteRun = 0
                } else if step.samples > 0 {
                    position.nonFiniteRun += 1
                    position.skippedSteps += 1
                    progress?.note("step \(position.optimizerSteps): non-finite loss or gradient — step skipped (\(position.nonFiniteRun) in a row)")
                    if position.nonFiniteRun >= config.lora.maxNonFiniteSteps {
                        throw TrainingError("\(position.nonFiniteRun) steps in a row had a non-finite loss or gradient; stopped. "
                            + "Saved files are intact (last state: \(checkpointer.newestStatePath)). Lower the learning rate or check the data.")
                    }
                }
                let lossAverage = step.meanLoss.isFinite ? average.add(step.meanLoss) : average.value
                position.losses = average.losses
                trainedSamples += step.samples
                let seconds = Date().timeIntervalSince(windowStart)
                let effective = update.optimizer.effectiveLearningRates(step.learningRates)
                if let metrics {
                    try metrics.write(StepMetrics(
                        step: position.optimizerSteps, epoch: position.epoch + 1, loss: step.meanLoss, lossAverage: lossAverage,
                        learningRates: Dictionary(uniqueKeysWithValues: zip(stages.layout.groupNames, effective)),
                        gradientNorm: step.gradientNorm, stepSeconds: seconds, communicationSeconds: step.reduce?.seconds ?? 0,
                        compressionRatio: step.reduce.map(\.compressionRatio), imagesPerSecond: Double(step.samples) / max(seconds, 1e-9),
                        skipped: !step.applied))
                }
                progress?.update(step: position.optimizerSteps, loss: lossAverage, extra: String(format: "lr=%.3g", effective[0]))
                for i in gradients.indices { gradients[i] = 0 }
                (windowLoss, windowSamples, windowNonFinite, windowStart) = (0, 0, false, Date())

                if config.lora.parameterCheckEvery > 0 { try sync.check(network.parameters, step: position.optimizerSteps) }
                if let n = config.saveEveryNSteps, n > 0, position.optimizerSteps % n == 0, position.optimizerSteps < plan.totalSteps {
                    try checkpointer.saveStep(position, progress: progress)
                }
                if let killAt = Self.testKillAtStep, killAt == position.optimizerSteps, rank == 0 {
                    // Test hook (LORA_DIST_TEST_KILL_AT_STEP): die here as a SIGKILLed job would, mid-run, after this
                    // step's files are written — the kill-and-resume tests need the kill at a known step.
                    kill(getpid(), SIGKILL)
                }
                if let signalAt = Self.testSignalAtStep, signalAt == position.optimizerSteps, rank == communicator.size - 1 {
                    // Test hook (LORA_DIST_TEST_SIGNAL_AT_STEP): a real SIGUSR1 to the last rank only, as a user's
                    // `kill -USR1 <pid>` or Slurm's warning signal would arrive.
                    raise(SIGUSR1)
                }
                if try StopSignal.shouldStop(communicator) {
                    try checkpointer.saveState(position)
                    outcome = .stopped(signal: StopSignal.pendingSignal)
                    break training
                }
            }
            if position.nextStep >= epochPlan.steps.count {
                position.epoch += 1
                position.nextStep = 0
                if let n = config.saveEveryNEpochs, n > 0, position.epoch % n == 0, position.optimizerSteps < plan.totalSteps {
                    try checkpointer.saveEpoch(position.epoch, position: position, progress: progress)
                }
            }
        }
        progress?.finish()
        if outcome == .finished {
            try checkpointer.saveLoRA(SaveNames.final(config.outputName), position: position, progress: nil, final: true)
            if config.saveState || config.saveStateOnTrainEnd { try checkpointer.saveState(position) }
        }
        try communicator.barrier()
        let summary = TrainingSummary(filesWritten: checkpointer.filesWritten, seconds: Date().timeIntervalSince(wallStart),
                                      images: trainedSamples, steps: position.optimizerSteps, ranks: communicator.size,
                                      communicationSeconds: communication, skippedSteps: position.skippedSteps)
        for line in summary.lines() { say(line) }
        if case .stopped(let signal) = outcome {
            say("stopped by \(signal.map(StopSignal.name) ?? "a signal on another rank") at step \(position.optimizerSteps); resume with --resume \(checkpointer.stateDirectory.path)")
        }
        return outcome
    }

    var metricsURL: URL {
        config.lora.metricsFile.map { URL(fileURLWithPath: $0) }
            ?? stages.outputDirectory.appendingPathComponent("\(config.outputName)-metrics.jsonl")
    }

    var tensorBoardDirectory: URL? {
        guard let with = config.logWith, with == "tensorboard" || with == "all" else { return nil }
        let base = config.loggingDir.map { URL(fileURLWithPath: $0) } ?? stages.outputDirectory.appendingPathComponent("logs")
        return base.appendingPathComponent((config.logPrefix ?? "") + config.outputName)
    }
}
