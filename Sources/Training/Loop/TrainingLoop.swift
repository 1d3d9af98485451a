import Distributed
import Foundation

/// The loop: batch → step (per micro-step) → update (per optimizer step) → events (metrics, saves, the stop
/// protocol). Collective: every rank runs it in lock-step.
final class TrainingLoop {
    let stages: TrainingStages
    let say: (String) -> Void
    /// The CLI's immediate stop (nil in-process: the step-boundary protocol alone).
    let stop: ImmediateStop?
    var config: TrainingConfig { stages.config }
    var communicator: any Communicator { stages.communicator }
    var rank: Int { communicator.rank }

    /// What the run has done so far in this process (the end summary).
    private var communicationSeconds = 0.0, trainedSamples = 0
    /// Whether the next step's all-reduce runs during backward (`overlap_reduction`; `auto` per `autoOverlap`).
    private var overlapping = false, overlappedSteps = 0, overlappedCommunication = 0.0, overlappedExposed = 0.0
    private var autoOverlap: AutoOverlap?

    /// `overlap_reduction = "auto"`: this process's steps 2–3 reduce after backward, 4–5 during it (step 1 warms up:
    /// lazy allocations, first-touch pages); then the way with the shorter mean step, the same on every rank (the
    /// slowest rank's means decide). A run of fewer steps stays after backward.
    struct AutoOverlap {
        private(set) var after: [Double] = [], during: [Double] = []
        private(set) var decided = false
        /// Whether step `n` (1-based, this process's count) overlaps, before the decision.
        func overlaps(step n: Int) -> Bool { n == 4 || n == 5 }
        /// Records step `n`'s wall time; after step 5 returns the two means (not yet reduced over ranks).
        mutating func record(step n: Int, seconds: Double) -> (after: Double, during: Double)? {
            switch n {
            case 2, 3: after.append(seconds)
            case 4, 5: during.append(seconds)
            default: break
            }
            guard n == 5 else { return nil }
            decided = true
            return (after.reduce(0, +) / 2, during.reduce(0, +) / 2)
        }
    }
    /// Optimizer steps done before this process started (a resume), and the state it resumed from.
    private var startSteps = 0, resumedFrom: String?
    /// kohya's avr_loss window, carried in the state.
    private var average: MovingLossAverage

    init(stages: TrainingStages, stop: ImmediateStop?, say: @escaping (String) -> Void) {
        self.stages = stages
        self.stop = stop
        self.say = say
        average = MovingLossAverage(window: max(stages.plan.coordinator.optimizerStepsPerEpoch, 1))
    }

    static let testKillAtStep = ProcessInfo.processInfo.environment["LORA_DIST_TEST_KILL_AT_STEP"].flatMap { Int($0) }
    static let testSignalAtStep = ProcessInfo.processInfo.environment["LORA_DIST_TEST_SIGNAL_AT_STEP"].flatMap { Int($0) }
    static let testStallAtStep = ProcessInfo.processInfo.environment["LORA_DIST_TEST_STALL_AT_STEP"].flatMap { Int($0) }
    /// Bench hook (LORA_DIST_BENCH_DUMP_GRADIENTS=DIR, LORA_DIST_BENCH_DUMP_STEPS=1,5): every rank writes its own
    /// gradient sums of those optimizer steps, before the all-reduce, as raw little-endian fp32
    /// (DIR/rank<r>-step<s>.f32), so that the all-reduce benchmark runs on real LoRA gradients (bench/allreduce).
    static let benchDumpDirectory = ProcessInfo.processInfo.environment["LORA_DIST_BENCH_DUMP_GRADIENTS"]
    static let benchDumpSteps = Set((ProcessInfo.processInfo.environment["LORA_DIST_BENCH_DUMP_STEPS"] ?? "1")
        .split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) })
    /// The slowest optimizer step so far (seconds): collectives wait `collective_timeout` beyond twice it.
    private var slowestStep = 0.0

    /// One accumulation window's sums on this rank.
    private struct Window {
        var loss = 0.0, samples = 0, nonFinite = false, start = Date()
    }

    func run(resume: String?, wallStart: Date) throws -> TrainingOutcome {
        let plan = stages.plan, network = stages.network, checkpointer = stages.checkpointer
        var position = try start(resume: resume)
        for l in position.losses { _ = average.add(l) }
        for line in stages.startLines() { say(line) }
        StopSignal.install()
        checkpointer.stop = stop
        // The resumed state counts as this run's save only when it is the newest one in this run's state folder
        // (`--resume` may name another folder, or have fallen back past a corrupt newer file).
        let newest = try? CheckpointWriter.newestState(in: checkpointer.stateDirectory)
        let onDisk = resumedFrom != nil && newest?.url.standardizedFileURL.path == resumedFrom.map { URL(fileURLWithPath: $0).standardizedFileURL.path }
        stop?.beginTraining(rank: rank, position: position, stateFolder: checkpointer.stateDirectory.path,
                            startIsSaved: onDisk) { [checkpointer] p in
            try checkpointer.writeState(p, residualBlobs: [])
        }

        overlapping = stages.buckets != nil && config.lora.overlapReduction == .on
        if stages.buckets != nil && config.lora.overlapReduction == .auto { autoOverlap = AutoOverlap() }
        let metrics = rank == 0 ? try MetricsWriter(jsonl: metricsURL, tensorboardDirectory: tensorBoardDirectory) : nil
        defer { metrics?.close() }
        try metrics?.writeRunStart(ranks: communicator.size, startStep: position.optimizerSteps,
                                   resumedFrom: position.optimizerSteps > 0 ? resumedFrom : nil)
        startSteps = position.optimizerSteps
        let progress = rank == 0 ? TrainingProgress(total: plan.totalSteps, startStep: position.optimizerSteps,
                                                    logEvery: config.lora.logEvery) : nil
        // kohya's sample_at_first: before the first step of a run that starts at step 0.
        if let sampler = stages.sampler, position.optimizerSteps == 0, sampler.due(steps: 0, epoch: 0) {
            try sampler.sample(steps: 0, epoch: 0, network: network, communicator: communicator, metrics: metrics, say: say)
        }
        var gradients = [Float](repeating: 0, count: network.parameterCount)
        var window = Window()
        var outcome = TrainingOutcome.finished

        training: while position.optimizerSteps < plan.totalSteps {
            let epochPlan = plan.coordinator.plan(epoch: position.epoch)
            while position.nextStep < epochPlan.steps.count && position.optimizerSteps < plan.totalSteps {
                let index = position.nextStep
                communicator.waitingFor = "step \(position.optimizerSteps + 1)"
                // The window's last micro-step reduces its gradient during backward (overlap_reduction).
                let last = epochPlan.steps[index].applyOptimizer
                let stream = last && overlapping ? stages.buckets.map { GradientBuckets.Stream($0) } : nil
                do {
                    let (lossSum, samples) = try stages.microStep(epochPlan, stepIndex: index, gradients: &gradients, stream: stream)
                    window.nonFinite = window.nonFinite || !lossSum.isFinite
                    window.loss += lossSum
                    window.samples += samples
                    position.nextStep += 1
                    guard last else { continue }
                    try dumpForBench(gradients, step: position.optimizerSteps + 1)
                    try optimizerStep(&gradients, window: window, position: &position, metrics: metrics, progress: progress,
                                      stream: stream)
                } catch {
                    stream?.abandon()   // no bucket reaches MPI while this thread unwinds to MPI_Abort
                    throw error
                }
                if try events(position, progress: progress, metrics: metrics) {
                    outcome = .stopped(signal: StopSignal.pendingSignal)
                    break training
                }
                // After the checks and saves: a step's time is its own (the auto overlap choice compares them).
                window = Window()
            }
            if position.nextStep >= epochPlan.steps.count {
                position.epoch += 1
                position.nextStep = 0
                if let sampler = stages.sampler, sampler.due(steps: position.optimizerSteps, epoch: position.epoch) {
                    try sampler.sample(steps: position.optimizerSteps, epoch: position.epoch, network: network, communicator: communicator,
                                       metrics: metrics, say: { line in progress?.note(line) ?? say(line) })
                }
                if let n = config.saveEveryNEpochs, n > 0, position.epoch % n == 0, position.optimizerSteps < plan.totalSteps {
                    try checkpointer.saveEpoch(position.epoch, position: position, progress: progress)
                }
            }
        }
        // kohya samples at the end of the last epoch even when max_train_steps ends it early (its epoch loop runs the
        // end-of-epoch block after the step loop's break).
        if outcome == .finished, position.nextStep > 0, let sampler = stages.sampler,
           sampler.due(steps: position.optimizerSteps, epoch: position.epoch + 1) {
            try sampler.sample(steps: position.optimizerSteps, epoch: position.epoch + 1, network: network, communicator: communicator,
                               metrics: metrics, say: { line in progress?.note(line) ?? say(line) })
        }
        stop?.finishing()
        communicator.waitingFor = "the final save"
        progress?.finish()
        try finish(outcome, position: position, wallStart: wallStart)
        return outcome
    }

    /// Where the run starts: a restored state (`--resume FILE|FOLDER`, or `auto`: this run's newest state when there is
    /// one, as job scripts pass for requeued jobs), or rank 0's initial LoRA on every rank.
    private func start(resume: String?) throws -> TrainingPosition {
        let checkpointer = stages.checkpointer
        checkpointer.startedAt = Date()
        var from = resume
        if from == "auto" { from = try checkpointer.hasState() ? checkpointer.stateDirectory.path : nil }
        guard let from else {
            // Every rank starts from rank 0's initial values (they are equal by construction; this makes it so).
            try ParameterSync(communicator: communicator).broadcastFromRankZero(&stages.network.parameters)
            return TrainingPosition()
        }
        let restored = try checkpointer.restore(from: from)
        for note in restored.notes { say("resume: \(note)") }
        let position = restored.position
        resumedFrom = restored.url.path
        say("resumed from \(restored.url.path) at step \(position.optimizerSteps)/\(stages.plan.totalSteps) (epoch \(position.epoch + 1))")
        return position
    }

    /// The bench hook's dump of this rank's local gradient sums of optimizer step `step` (1-based). They are still in
    /// `gradients` here: an overlapped stream copied them out, and `finish` writes the reduced values back later.
    private func dumpForBench(_ gradients: [Float], step: Int) throws {
        guard let dir = Self.benchDumpDirectory, Self.benchDumpSteps.contains(step) else { return }
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let url = URL(fileURLWithPath: dir).appendingPathComponent("rank\(rank)-step\(step).f32")
        try gradients.withUnsafeBytes { Data($0) }.write(to: url)
    }

    /// Stage 4 on the window's gradient sums, then its bookkeeping: the non-finite rule, metrics, progress.
    private func optimizerStep(_ gradients: inout [Float], window: Window, position: inout TrainingPosition,
                               metrics: MetricsWriter?, progress: TrainingProgress?, stream: GradientBuckets.Stream?) throws {
        let update = stages.update
        var lossAverage = average.value
        let overlapped = try stream?.finish(gradients: &gradients)

        let step = try update.apply(gradients: &gradients, lossSum: window.loss, samples: window.samples,
                                    nonFinite: window.nonFinite, parameters: &stages.network.parameters,
                                    step: position.optimizerSteps, reduced: overlapped?.stats, lock: stop?.lock) { step in
            // The position that goes with the parameters just updated, published with them (ImmediateStop).
            position.optimizerSteps += 1
            if step.applied {
                position.nonFiniteRun = 0
            } else if step.samples > 0 {
                position.nonFiniteRun += 1
                position.skippedSteps += 1
            }
            if step.meanLoss.isFinite { lossAverage = average.add(step.meanLoss) }
            position.losses = average.losses
            stop?.stepCompleted(position)
        }
        for i in gradients.indices { gradients[i] = 0 }
        communicationSeconds += step.reduce?.seconds ?? 0
        let exposed = overlapped?.exposedSeconds ?? step.reduce?.seconds ?? 0
        if let overlapped {
            overlappedSteps += 1
            overlappedCommunication += overlapped.stats.seconds
            overlappedExposed += overlapped.exposedSeconds
        }
        trainedSamples += step.samples
        if !step.applied && step.samples > 0 {
            progress?.note("step \(position.optimizerSteps): non-finite loss or gradient — step skipped (\(position.nonFiniteRun) in a row)")
            if position.nonFiniteRun >= config.lora.maxNonFiniteSteps {
                throw TrainingError("\(position.nonFiniteRun) steps in a row had a non-finite loss or gradient; stopped. "
                    + "Saved files are intact (last state: \(stages.checkpointer.newestStatePath)). Lower the learning rate, check the data, or check the model: "
                    + "a checkpoint with NaN/Inf weights (a broken fp16 conversion, a bad merge: \(config.pretrainedModelNameOrPath)) makes every step non-finite from the first one")
            }
        }
        let seconds = Date().timeIntervalSince(window.start)
        slowestStep = max(slowestStep, seconds)
        let base = config.lora.collectiveTimeout
        communicator.timeout = base > 0 ? base + 2 * slowestStep : nil
        if var auto = autoOverlap, !auto.decided {
            let n = position.optimizerSteps - startSteps
            if let (after, during) = auto.record(step: n, seconds: seconds) {
                // Rank-identical: the slowest rank's means (one small collective, once).
                let m = try communicator.allReduce([Int64(after * 1e6), Int64(during * 1e6)], op: .max)
                let (a, d) = (Double(m[0]) / 1e6, Double(m[1]) / 1e6)
                overlapping = d < a
                progress?.note(String(format: "overlap_reduction auto: %.4g s/step with the all-reduce after backward, %.4g s during it; ", a, d)
                    + (overlapping ? "overlapping from here on" : "after backward from here on"))
            } else {
                overlapping = auto.overlaps(step: n + 1)
            }
            autoOverlap = auto
        }
        let effective = update.optimizer.effectiveLearningRates(step.learningRates)
        try metrics?.write(StepMetrics(
            step: position.optimizerSteps, epoch: position.epoch + 1, loss: step.meanLoss, lossAverage: lossAverage,
            learningRates: Dictionary(uniqueKeysWithValues: zip(stages.layout.groupNames, effective)),
            gradientNorm: step.gradientNorm, stepSeconds: seconds, communicationSeconds: step.reduce?.seconds ?? 0,
            exposedCommunicationSeconds: exposed,
            compressionRatio: step.reduce.map(\.compressionRatio), imagesPerSecond: Double(step.samples) / max(seconds, 1e-9),
            skipped: !step.applied))
        progress?.update(step: position.optimizerSteps, loss: lossAverage, extra: String(format: "lr=%.3g", effective[0]))
    }

    /// After an optimizer step: the divergence check, step saves, the test hooks, and the stop protocol (a signal on
    /// any rank stops every rank here, after saving a state). Returns whether to stop.
    private func events(_ position: TrainingPosition, progress: TrainingProgress?, metrics: MetricsWriter?) throws -> Bool {
        let step = position.optimizerSteps
        communicator.waitingFor = "the checks and saves after step \(step)"
        if config.lora.parameterCheckEvery > 0 {
            try ParameterSync(communicator: communicator, every: config.lora.parameterCheckEvery).check(stages.network.parameters, step: step)
        }
        if let n = config.saveEveryNSteps, n > 0, step % n == 0, step < stages.plan.totalSteps {
            try stages.checkpointer.saveStep(position, progress: progress)
        }
        if let sampler = stages.sampler, sampler.due(steps: step, epoch: nil) {
            try sampler.sample(steps: step, epoch: nil, network: stages.network, communicator: communicator, metrics: metrics,
                               say: { line in progress?.note(line) ?? say(line) })
        }
        if let killAt = Self.testKillAtStep, killAt == step, rank == 0 {
            // Test hook (LORA_DIST_TEST_KILL_AT_STEP): die here as a SIGKILLed job would, mid-run, after this
            // step's files are written — the kill-and-resume tests need the kill at a known step.
            kill(getpid(), SIGKILL)
        }
        if let stallAt = Self.testStallAtStep, stallAt == step, rank == communicator.size - 1 {
            // Test hook (LORA_DIST_TEST_STALL_AT_STEP): the last rank stops itself (SIGSTOP), as a suspended or hung
            // process would; the others must not wait for it forever.
            raise(SIGSTOP)
        }
        if let signalAt = Self.testSignalAtStep, signalAt == step, rank == communicator.size - 1 {
            // Test hook (LORA_DIST_TEST_SIGNAL_AT_STEP): a real SIGUSR1 to the last rank only, as a user's
            // `kill -USR1 <pid>` or Slurm's warning signal would arrive.
            raise(SIGUSR1)
        }
        guard try StopSignal.shouldStop(communicator) else { return false }
        try stages.checkpointer.saveState(position)
        return true
    }

    /// The final LoRA (and state), then the summary.
    private func finish(_ outcome: TrainingOutcome, position: TrainingPosition, wallStart: Date) throws {
        let checkpointer = stages.checkpointer
        if outcome == .finished {
            try checkpointer.saveLoRA(SaveNames.final(config.outputName), position: position, progress: nil, final: true)
            if config.saveState || config.saveStateOnTrainEnd { try checkpointer.saveState(position) }
        }
        try communicator.barrier()
        stages.outputLock?.release()
        let sampling = stages.sampler.map { s in
            TrainingSummary.Sampling(images: s.requests.count * s.rounds, seconds: s.seconds, folder: s.folder.path)
        }
        let summary = TrainingSummary(filesWritten: checkpointer.filesWritten,
                                      seconds: Date().timeIntervalSince(wallStart) - (stages.sampler?.seconds ?? 0),
                                      images: trainedSamples, steps: position.optimizerSteps - startSteps, ranks: communicator.size,
                                      communicationSeconds: communicationSeconds,
                                      overlapped: overlappedSteps > 0 ? .init(steps: overlappedSteps, communicationSeconds: overlappedCommunication,
                                                                                   exposedSeconds: overlappedExposed) : nil,
                                      skippedSteps: position.skippedSteps, sampling: sampling)
        for line in summary.lines() { say(line) }
        if case .stopped(let signal) = outcome {
            say("stopped by \(signal.map(StopSignal.name) ?? "a signal on another rank") at step \(position.optimizerSteps); resume with --resume \(checkpointer.stateDirectory.path)")
        }
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
