import ArgumentParser
import Distributed
import Foundation
import Tensor

@main
struct LoraDist: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "lora-dist",
        abstract: "Distributed LoRA training for SDXL-family models on CPU ranks.",
        subcommands: [Info.self, Demo.self])
}

/// Options every command that computes shares.
struct EngineOptions: ParsableArguments {
    @Option(help: ArgumentHelp(
        "Threads for this process (engine loops and OpenBLAS). Default: the node's cores divided by the ranks on this node.",
        valueName: "n"))
    var threads: Int?

    func validate() throws {
        if let t = threads, t < 1 { throw ValidationError("--threads must be at least 1 (got \(t))") }
    }

    /// Sets the thread count and loads OpenBLAS on its fastest kernel (see BLAS.chooseCore).
    func apply() {
        Threads.set(threads ?? EngineOptions.defaultThreads())
    }

    /// Cores on this node / ranks on this node (Open MPI tells the local rank count).
    static func defaultThreads() -> Int {
        let cores = ProcessInfo.processInfo.activeProcessorCount
        let env = ProcessInfo.processInfo.environment
        let local = Int(env["OMPI_COMM_WORLD_LOCAL_SIZE"] ?? env["MPI_LOCALNRANKS"] ?? env["SLURM_NTASKS_PER_NODE"] ?? "") ?? 1
        return max(1, cores / max(local, 1))
    }
}

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print what the engine runs on: OpenBLAS kernel, threads, CPU features, libraries.")

    @OptionGroup var engine: EngineOptions

    func run() throws {
        engine.apply()
        let env = ProcessInfo.processInfo.environment
        let override = env["OPENBLAS_CORETYPE"].map { " (OPENBLAS_CORETYPE=\($0))" } ?? ""
        print("OpenBLAS kernel:  \(BLAS.coreName)\(override); lora-dist's choice for this CPU: \(BLAS.chooseCore() ?? "OpenBLAS default")")
        print("threads:          \(Threads.count) engine, \(BLAS.threads) OpenBLAS")
        print("cores:            \(ProcessInfo.processInfo.activeProcessorCount)")
        print("zstd:             \(Zstd.version)")
    }
}
