import ArgumentParser
import Distributed
import Foundation
import Logging
import Tensor
import Training

/// `lora-dist train [CONFIG]`: one rank alone, or every rank of `mpirun -np N` / `srun` / PBS `mpiexec`.
struct TrainCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "train",
        abstract: "Train a LoRA from a kohya-style training TOML (no file: the embedded demo).",
        discussion: """
            Run alone (one rank) or under mpirun/srun/mpiexec (data-parallel ranks). Rank 0 writes LoRA files and \
            resumable states into output_dir. SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 on rank 0 (mpirun and srun signal \
            every rank): the step in progress is abandoned and rank 0 saves the state of the last completed step \
            within seconds; on another rank alone: every rank stops at the next step boundary, saving. Exit 0 once \
            saved (or \(StopSignal.requeueExitCode) with --requeue-on-stop, also when the signal came before training \
            started).
            """)

    @OptionGroup var engine: EngineOptions
    @Argument(help: "A training TOML (kohya's training config, with an optional [lora_dist] section). Default: the demo.")
    var config: String?
    @Option(help: "Continue from a state file, or from the newest state in a state folder (<output_dir>/<output_name>-state); 'auto': this run's newest state if there is one, else start fresh (for requeued jobs).")
    var resume: String?
    @Option(help: "Override output_dir.") var outputDir: String?
    @Option(help: "Override max_train_steps.") var maxTrainSteps: Int?
    @Flag(help: "Exit with \(StopSignal.requeueExitCode) (EX_TEMPFAIL) after a signal-requested stop (job scripts requeue on it).")
    var requeueOnStop = false
    @Option(name: .customLong("set"), help: ArgumentHelp("Set a config key (a TOML value), overriding the file: --set max_train_steps=100 --set 'output_name=\"x\"'. kohya's own flag spellings work too: --dataset_config FILE, --optimizer_args weight_decay=0.1 betas=0.9,0.99, --zero_terminal_snr.", valueName: "key=value"))
    var set: [String] = []
    @Argument(parsing: .allUnrecognized, help: .hidden) var kohyaFlags: [String] = []
    @Flag(help: "Refuse the config if the loader had to ignore or reinterpret anything (unknown keys, off values of options lora-dist does not implement, aliases, coerced values); same as [lora_dist] strict = true.")
    var strict = false

    func run() throws {
        // First: a signal from here on (config, model load, latent caching, training) is honoured at once.
        let stop = ImmediateStop(requeue: requeueOnStop)
        RankLogging.bootstrap()
        let log = Logger(label: "train")
        var cfg: TrainingConfig
        do {
            let overrides = try TrainingConfig.commandLineOverrides(kohyaFlags: kohyaFlags, set: set)
            cfg = try config.map { try TrainingConfig.load(toml: URL(fileURLWithPath: $0), overrides: overrides) }
                ?? TrainingConfig.demo(overrides: overrides)
            if strict { cfg.lora.strict = true; try cfg.checkStrict() }
        } catch {
            FileHandle.standardError.write(Data("error: \(error)\n".utf8))
            throw ExitCode.failure
        }
        if let o = outputDir { cfg.outputDir = o }
        if let s = maxTrainSteps { cfg.maxTrainSteps = s; cfg.maxTrainEpochs = nil }
        let comm = try startRanks(log)
        stop.setRank(comm.rank)
        // Setup (model load, latent caching: ranks may encode unequal shares) waits 6× collective_timeout; the loop
        // then tightens it to collective_timeout beyond twice the slowest step.
        comm.timeout = cfg.lora.collectiveTimeout > 0 ? 6 * cfg.lora.collectiveTimeout : nil
        comm.waitingFor = "setup (model load, latent caching)"
        if engine.threads == nil, let t = cfg.lora.threadsPerRank { Threads.set(t) } else { engine.apply() }
        if comm.rank == 0 {
            print("lora-dist train: \(config ?? "embedded demo (configs/demo.toml)"), \(comm.size) rank\(comm.size == 1 ? "" : "s"), \(Threads.count) threads each, OpenBLAS \(BLAS.coreName)")
            for note in cfg.notes { print("note: \(note)") }
            for warning in cfg.warnings { print("warning: \(warning)") }
        }
        let trainer = Trainer(config: cfg, communicator: comm, stop: stop)
        let outcome: TrainingOutcome
        do {
            outcome = try trainer.run(resume: resume)
        } catch {
            // Every rank reports its own failure; rank 0's line is what a user sees first.
            FileHandle.standardError.write(Data("error (rank \(comm.rank)): \(error)\n".utf8))
            // A failure on one rank leaves the others in a collective: abort them rather than hang.
            if comm.size > 1 { comm.abort(code: 1) }
            throw ExitCode.failure
        }
        try comm.finalize()
        if case .stopped = outcome {
            if requeueOnStop && comm.rank == 0 { ImmediateStop.markRequeue() }
            throw ExitCode(requeueOnStop ? StopSignal.requeueExitCode : StopSignal.cleanExitCode)
        }
    }
}
