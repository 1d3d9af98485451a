import ArgumentParser
import Distributed
import Foundation
import Logging

/// Hidden: a fake training loop that exercises the distributed runtime end to end without a model — launch
/// detection and the world-size check, rank-tagged logging, the stop protocol, and rank 0's atomic states.
/// The tests start it under `mpirun -np 3 --oversubscribe` and signal one rank.
struct DistributedCheck: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "distributed-check",
        abstract: "Run a fake training loop across the ranks (tests the launch, stop and checkpoint protocols).",
        discussion: """
            Every rank sleeps --sleep-ms per step and, at each step boundary, joins the one-float all-reduce of \
            the stop flag. SIGTERM or SIGUSR1 on any rank stops all ranks at the same step; rank 0 then writes \
            a state and every rank exits with status 0, or \(StopSignal.requeueExitCode) (EX_TEMPFAIL) with \
            --requeue-on-stop, which a job script turns into `scontrol requeue` / `qrerun`. A second SIGTERM \
            kills at once. Rank 0 writes state-<step>.ldstate into --out every --every steps, at a stop and at \
            the end (temporary + fsync + rename + directory fsync), keeping the newest --keep; a rerun resumes \
            after the newest state. Exit status 1: bad launch (e.g. the launcher started N tasks but MPI sees a \
            world of 1) or bad options.
            """,
        shouldDisplay: false)

    @Option(help: "Steps of the fake loop.") var steps = 100
    @Option(help: "Milliseconds of fake work per step.") var sleepMs = 20
    @Option(help: "Write a state every N steps (0: only at a stop and at the end).") var every = 10
    @Option(help: "Complete states to keep.") var keep = 2
    @Option(help: "Output directory (rank 0 alone writes here).") var out: String
    @Option(help: "Each rank writes its pid to <dir>/rank-<r>.pid once the stop handlers are installed.") var pidDir: String?
    @Flag(help: "Exit with \(StopSignal.requeueExitCode) (EX_TEMPFAIL) instead of 0 after a signal-requested stop.")
    var requeueOnStop = false

    func validate() throws {
        guard steps >= 0 else { throw ValidationError("--steps must be non-negative (got \(steps))") }
        guard sleepMs >= 0 else { throw ValidationError("--sleep-ms must be non-negative (got \(sleepMs))") }
        guard every >= 0 else { throw ValidationError("--every must be 0 or positive (got \(every))") }
        guard keep >= 1 else { throw ValidationError("--keep must be at least 1 (got \(keep))") }
    }

    func run() throws {
        RankLogging.bootstrap()
        let log = Logger(label: "distributed-check")
        let launch: Launch
        do {
            launch = try Launch.start()
        } catch {
            log.error("\(error)")
            throw ExitCode.failure
        }
        // After MPI_Init, so ours are the handlers in force for these signals.
        StopSignal.install()
        let comm = launch.communicator
        RankLogging.bootstrap(rank: comm.rank, size: comm.size)
        let progress = RankLogging.progress()

        if let pidDir {
            let tmp = URL(fileURLWithPath: pidDir).appendingPathComponent(".rank-\(comm.rank).pid.tmp")
            try "\(getpid())\n".write(to: tmp, atomically: false, encoding: .utf8)
            rename(tmp.path, URL(fileURLWithPath: pidDir).appendingPathComponent("rank-\(comm.rank).pid").path)
        }
        log.info("pid \(getpid()) launcher \(launch.environment.launcher.rawValue) threads \(launch.threadsPerRank())")

        let outURL = URL(fileURLWithPath: out)
        let writer = try CheckpointWriter(directory: outURL, rank: comm.rank, every: every, keep: keep)

        // Resume: rank 0 alone looks at the directory and tells the others where to start.
        var startBytes = [UInt8](repeating: 0, count: 8)
        if comm.rank == 0, let newest = try CheckpointWriter.newestState(in: outURL) {
            let blobs = try StateBlobs.read(newest.url)
            guard let s = blobs["step"], s.count == 8 else {
                throw ValidationError("\(newest.url.path) has no 8-byte 'step' entry; it is not a distributed-check state")
            }
            startBytes = s
        }
        try comm.broadcast(&startBytes, root: 0)
        let start = startBytes.enumerated().reduce(0) { $0 | (Int($1.element) << (8 * $1.offset)) }
        if start > 0 { progress.info("resuming after step \(start)") }

        func save(_ step: Int) throws {
            guard writer.lastWrittenStep != step else { return }
            var stepBytes = [UInt8](repeating: 0, count: 8)
            for i in 0..<8 { stepBytes[i] = UInt8(truncatingIfNeeded: step >> (8 * i)) }
            if let url = try writer.write(step: step, blobs: [("step", stepBytes), ("world", [UInt8(truncatingIfNeeded: comm.size)])]) {
                progress.info("state written: \(url.lastPathComponent)")
            }
        }

        var step = start
        var stopped = false
        while step < steps {
            usleep(UInt32(sleepMs) * 1000)  // the step's "work"
            step += 1
            if writer.isDue(step: step) { try save(step) }
            if try StopSignal.shouldStop(comm) {
                stopped = true
                break
            }
        }
        if stopped {
            let why = StopSignal.pendingSignal.map { "\(StopSignal.name($0)) received here" } ?? "requested by another rank"
            log.info("stopped at step \(step) (\(why))")
        } else {
            log.info("finished at step \(step)")
        }
        try save(step)
        try comm.barrier()
        try comm.finalize()
        if stopped { throw ExitCode(requeueOnStop ? StopSignal.requeueExitCode : StopSignal.cleanExitCode) }
    }
}
