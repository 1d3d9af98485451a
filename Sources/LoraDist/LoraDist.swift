import ArgumentParser
import Base
import Distributed
import Foundation
import Logging
import Tensor

@main
struct LoraDist: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lora-dist",
        abstract: "Distributed LoRA training for SDXL-family models on CPU ranks.",
        subcommands: [Info.self, Demo.self, MakeModel.self, Inspect.self, Eval.self, DistributedCheck.self, DatasetCommand.self, CacheCommand.self, TrainCommand.self, ExportCommand.self, GenerateCommand.self])
}

/// Options every command that computes shares.
struct EngineOptions: ParsableArguments {
    @Option(help: ArgumentHelp(
        "Threads for this process (engine loops and OpenBLAS). Default: the node's cores divided by the ranks on this node.",
        valueName: "n"))
    var threads: Int?

    @Option(help: ArgumentHelp(
        "OpenBLAS kernel family (e.g. SkylakeX, Haswell), or 'inherit' to keep OPENBLAS_CORETYPE. Default: the fastest this CPU supports.",
        valueName: "name"))
    var blasCore: String?

    func validate() throws {
        if let t = threads, t < 1 { throw ValidationError("--threads must be at least 1 (got \(t))") }
    }

    /// Sets the thread count and loads OpenBLAS on its fastest kernel (see BLAS.chooseCore).
    func apply() {
        Memory.keepFreedBlocks()
        // Must happen before OpenBLAS is loaded (Threads.set loads it).
        if let core = blasCore { setenv(BLAS.overrideVariable, core, 1) }
        Threads.set(threads ?? EngineOptions.defaultThreads())
    }

    /// Cores on this node / ranks on this node (the launcher tells the local rank count).
    static func defaultThreads() -> Int { Launch.defaultThreadsPerRank() }
}

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print what the engine runs on: OpenBLAS kernel, threads, CPU features, libraries.")

    @OptionGroup var engine: EngineOptions

    func run() throws {
        engine.apply()
        let env = ProcessInfo.processInfo.environment
        let requested = BLAS.requestedCore()
        var how = env[BLAS.overrideVariable].map { "\(BLAS.overrideVariable)=\($0)" } ?? "chosen for this CPU"
        if let inherited = BLAS.inheritedCoreType, requested != nil, inherited != requested {
            how += "; replaced OPENBLAS_CORETYPE=\(inherited) from the environment"
        }
        print("OpenBLAS kernel:  \(BLAS.coreName) (\(how))")
        print("threads:          \(Threads.count) engine, \(BLAS.threads) OpenBLAS")
        print("cores:            \(ProcessInfo.processInfo.activeProcessorCount)")
        print("zstd:             \(Zstd.version)")
    }
}

/// Joins the MPI job (Launch.start: the world-size trap included) and tags this rank's log lines; a launch problem is
/// one logged line and a failure exit.
func startRanks(_ log: Logger) throws -> MPICommunicator {
    let launch: Launch
    do { launch = try Launch.start() } catch {
        log.error("\(error)")
        throw ExitCode.failure
    }
    RankLogging.bootstrap(rank: launch.communicator.rank, size: launch.communicator.size)
    return launch.communicator
}
