import Distributed
import Foundation
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// The stop protocol and rank 0's atomic states: in process (signal flag, flag reduction, the writer), and
/// end to end through `lora-dist distributed-check` under `mpirun -np 3 --oversubscribe`.
final class StopProtocolTests: XCTestCase {
    // MARK: in process

    /// Sums what each simulated rank contributes, as MPI_Allreduce would.
    struct FakeWorld: FlagReducer {
        let others: [Float]
        func allReduceSum(_ buffer: inout [Float]) throws { buffer[0] += others.reduce(0, +) }
    }

    func testSignalSetsTheFlagAndRanksAgree() throws {
        StopSignal.install()
        defer { StopSignal.uninstall(); StopSignal.reset() }
        StopSignal.reset()
        XCTAssertNil(StopSignal.pendingSignal)
        XCTAssertFalse(try StopSignal.shouldStop(FakeWorld(others: [0, 0])))
        // Another rank was signalled: this one stops too.
        XCTAssertTrue(try StopSignal.shouldStop(FakeWorld(others: [0, 1])))
        // This process is signalled (the handler runs; the process survives SIGUSR1 and SIGTERM).
        raise(SIGUSR1)
        XCTAssertEqual(StopSignal.pendingSignal, SIGUSR1)
        XCTAssertTrue(try StopSignal.shouldStop(FakeWorld(others: [0, 0])))
        StopSignal.reset()
        raise(SIGTERM)
        XCTAssertEqual(StopSignal.pendingSignal, SIGTERM)
    }

    func tempDir() throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("stop-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(at: dir) }
        return dir
    }

    func names(_ dir: URL) -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []).sorted()
    }

    func testWriterCadenceKeepAndResume() throws {
        let dir = try tempDir().appendingPathComponent("out")
        // Another rank never touches the directory, not even to create it.
        let other = try CheckpointWriter(directory: dir, rank: 1, every: 2)
        XCTAssertNil(try other.write(step: 2, blobs: [("w", [1])]))
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir.path))

        let writer = try CheckpointWriter(directory: dir, rank: 0, every: 3, keep: 2)
        XCTAssertEqual((1...10).filter { writer.isDue(step: $0) }, [3, 6, 9])
        for step in [3, 6, 9] {
            try writer.write(step: step, blobs: [("step", [UInt8(step)]), ("lora", Array(repeating: 7, count: 100))])
        }
        XCTAssertEqual(names(dir), ["state-00000006.ldstate", "state-00000009.ldstate"], "keeps the newest 2")
        XCTAssertEqual(writer.lastWrittenStep, 9)

        // A crashed write leaves a hidden temporary and maybe junk: resume ignores both.
        try Data([1, 2, 3]).write(to: dir.appendingPathComponent(".state-00000012.tmp-4242"))
        try Data([1]).write(to: dir.appendingPathComponent("state-0000001x.ldstate"))
        let newest = try XCTUnwrap(CheckpointWriter.newestState(in: dir))
        XCTAssertEqual(newest.step, 9)
        let blobs = try StateBlobs.read(newest.url)
        XCTAssertEqual(blobs["step"], [9])
        XCTAssertEqual(blobs["lora"]?.count, 100)

        // A new writer (the resumed job) drops the dead temporary; a closure can write any format.
        let resumed = try CheckpointWriter(directory: dir, rank: 0, every: 0, keep: 1)
        XCTAssertFalse(names(dir).contains { $0.hasPrefix(".state-") })
        XCTAssertFalse(resumed.isDue(step: 3))
        let url = try XCTUnwrap(resumed.write(step: 10) { path in try Data("raw".utf8).write(to: path) })
        XCTAssertEqual(try String(contentsOf: url, encoding: .utf8), "raw")
        XCTAssertEqual(try CheckpointWriter.completeStates(in: dir).map(\.step), [10])

        // A closure that fails leaves nothing behind and the previous state intact.
        XCTAssertThrowsError(try resumed.write(step: 11) { path in
            try Data("half".utf8).write(to: path)
            throw CheckpointError("disk full")
        })
        XCTAssertEqual(names(dir), ["state-00000010.ldstate", "state-0000001x.ldstate"])
        XCTAssertNil(try CheckpointWriter.newestState(in: dir.appendingPathComponent("missing")))
        XCTAssertThrowsError(try CheckpointWriter(directory: dir, rank: 0, every: -1))
    }

    func testStateBlobsRejectTruncation() throws {
        let data = try StateBlobs.encode([("a", [1, 2, 3]), ("b", [])])
        XCTAssertEqual(try StateBlobs.decode(data), ["a": [1, 2, 3], "b": []])
        for cut in [1, 5, data.count / 2] {
            XCTAssertThrowsError(try StateBlobs.decode(data.prefix(data.count - cut))) { error in
                XCTAssertTrue("\(error)".contains("not a complete lora-dist state"), "\(error)")
            }
        }
        var flipped = [UInt8](data); flipped[14] ^= 1
        XCTAssertThrowsError(try StateBlobs.decode(Data(flipped)))
        XCTAssertThrowsError(try StateBlobs.encode([("a", []), ("a", [])]))
    }

    // MARK: end to end

    /// `.build/<config>/lora-dist`, next to this test bundle (swift build --build-tests builds it).
    var executable: URL {
        get throws {
            var candidates = [Bundle(for: Self.self).bundleURL.deletingLastPathComponent().appendingPathComponent("lora-dist")]
            let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            candidates.append(root.appendingPathComponent(".build/debug/lora-dist"))
            guard let found = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0.path) }) else {
                throw CheckpointError("lora-dist is not built (looked at \(candidates.map(\.path))); run `swift build --build-tests`")
            }
            return found
        }
    }

    struct Run { let status: Int32; let output: String }

    /// Runs `arguments` with extra environment; `whileRunning` is called (on this thread) once started.
    func run(_ arguments: [String], environment extra: [String: String] = [:], removing: [String] = [],
             whileRunning: (() throws -> Void)? = nil) throws -> Run {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = arguments
        var env = ProcessInfo.processInfo.environment
        // This test may itself run under a launcher (CI inside Slurm): start from a clean slate.
        for key in env.keys where key.hasPrefix("OMPI_COMM_WORLD") || key.hasPrefix("SLURM_") || key.hasPrefix("PMIX_")
            || key.hasPrefix("PMI_") || key.hasPrefix("PBS_") { env[key] = nil }
        env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
        env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
        for (k, v) in extra { env[k] = v }
        p.environment = env
        let log = try tempDir().appendingPathComponent("log")
        FileManager.default.createFile(atPath: log.path, contents: nil)
        let handle = try FileHandle(forWritingTo: log)
        p.standardOutput = handle
        p.standardError = handle
        try p.run()
        // A broken protocol hangs (a rank left in a collective): fail instead of blocking CI.
        let watchdog = DispatchWorkItem { if p.isRunning { kill(p.processIdentifier, SIGKILL) } }
        DispatchQueue.global().asyncAfter(deadline: .now() + 60, execute: watchdog)
        defer { watchdog.cancel() }
        do { try whileRunning?() } catch { p.terminate(); p.waitUntilExit(); throw error }
        p.waitUntilExit()
        try handle.close()
        return Run(status: p.terminationStatus, output: try String(contentsOf: log, encoding: .utf8))
    }

    /// Waits for the pid files of `count` ranks (each written once its stop handler is installed).
    func pids(in dir: URL, count: Int) throws -> [Int32] {
        for _ in 0..<300 {  // up to 30 s: mpirun's start is slow on a loaded machine
            let files = names(dir).filter { $0.hasPrefix("rank-") && $0.hasSuffix(".pid") }
            if files.count == count {
                return try (0..<count).map { r in
                    let text = try String(contentsOf: dir.appendingPathComponent("rank-\(r).pid"), encoding: .utf8)
                    return try XCTUnwrap(Int32(text.trimmingCharacters(in: .whitespacesAndNewlines)))
                }
            }
            usleep(100_000)
        }
        throw CheckpointError("the ranks did not write their pid files into \(dir.path)")
    }

    /// "[rank r/3] stopped at step N" for every rank → N per rank.
    func stopSteps(_ output: String, world: Int) -> [Int: Int] {
        var steps: [Int: Int] = [:]
        for line in output.split(separator: "\n") {
            for r in 0..<world where line.hasPrefix("[rank \(r)/\(world)] stopped at step ") {
                let rest = line.dropFirst("[rank \(r)/\(world)] stopped at step ".count)
                steps[r] = Int(rest.prefix { $0.isNumber })
            }
        }
        return steps
    }

    /// A signal to one non-zero rank stops all three at the same step; rank 0 writes that step's state; every
    /// rank exits with the requested code; the directory holds only complete states.
    func checkSignalStopsAll(signal: Int32, rank: Int, requeue: Bool) throws {
        let dir = try tempDir()
        let out = dir.appendingPathComponent("out"), pidDir = dir.appendingPathComponent("pids")
        try FileManager.default.createDirectory(at: pidDir, withIntermediateDirectories: true)
        // 600 steps × 20 ms = 12 s if the signal were ignored; it comes after a few steps.
        var args = ["mpirun", "-np", "3", "--oversubscribe", try executable.path, "distributed-check",
                    "--steps", "600", "--sleep-ms", "20", "--every", "5", "--keep", "2",
                    "--out", out.path, "--pid-dir", pidDir.path]
        if requeue { args.append("--requeue-on-stop") }
        let result = try run(args) {
            let pids = try self.pids(in: pidDir, count: 3)
            usleep(300_000)  // let a few steps (and states) happen first
            XCTAssertEqual(kill(pids[rank], signal), 0)
        }
        let steps = stopSteps(result.output, world: 3)
        XCTAssertEqual(steps.count, 3, "every rank reports its stop:\n\(result.output)")
        let step = try XCTUnwrap(steps[0])
        XCTAssertEqual(Set(steps.values), [step], "all ranks stop at the same step:\n\(result.output)")
        XCTAssertLessThan(step, 600)
        XCTAssertTrue(result.output.contains("[rank \(rank)/3] stopped at step \(step) (\(StopSignal.name(signal)) received here)"),
                      result.output)
        XCTAssertEqual(result.status, requeue ? StopSignal.requeueExitCode : 0, result.output)

        // Only complete files, the newest being the stop step's, readable, at most --keep of them.
        let files = names(out)
        XCTAssertTrue(files.allSatisfy { $0.hasPrefix("state-") && $0.hasSuffix(".ldstate") }, "\(files)")
        XCTAssertLessThanOrEqual(files.count, 2)
        let newest = try XCTUnwrap(CheckpointWriter.newestState(in: out))
        XCTAssertEqual(newest.step, step)
        let blobs = try StateBlobs.read(newest.url)
        XCTAssertEqual(blobs["step"], (0..<8).map { UInt8(truncatingIfNeeded: step >> (8 * $0)) })
        XCTAssertEqual(blobs["world"], [3])
    }

    func testSIGUSR1ToOneRankStopsAllWithRequeueCode() throws {
        try checkSignalStopsAll(signal: SIGUSR1, rank: 1, requeue: true)
    }

    func testSIGTERMToOneRankStopsAllCleanly() throws {
        try checkSignalStopsAll(signal: SIGTERM, rank: 2, requeue: false)
    }

    /// The Open MPI/PMIx trap: the environment says 2 tasks, MPI sees a world of 1 → a clear error, no training.
    func testWorldSizeTrapRefusesToTrain() throws {
        for env in [["OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"], ["SLURM_NTASKS": "2", "SLURM_PROCID": "1"]] {
            let out = try tempDir().appendingPathComponent("out")
            let result = try run([try executable.path, "distributed-check", "--steps", "3", "--sleep-ms", "1", "--out", out.path],
                                 environment: env)
            XCTAssertNotEqual(result.status, 0, result.output)
            XCTAssertTrue(result.output.contains("started 2 tasks but MPI reports a world of 1"), result.output)
            XCTAssertFalse(result.output.contains("finished at step"), result.output)
            XCTAssertFalse(FileManager.default.fileExists(atPath: out.path), "nothing written")
        }
    }

    /// No launcher: a world of 1 runs to the end, then a rerun resumes after the newest state.
    func testStandaloneRunsAndResumes() throws {
        let out = try tempDir().appendingPathComponent("out")
        let args = [try executable.path, "distributed-check", "--sleep-ms", "1", "--every", "4", "--keep", "3", "--out", out.path]
        let first = try run(args + ["--steps", "10"])
        XCTAssertEqual(first.status, 0, first.output)
        XCTAssertTrue(first.output.contains("[rank 0/1] finished at step 10"), first.output)
        XCTAssertEqual(try CheckpointWriter.completeStates(in: out).map(\.step), [4, 8, 10])
        let second = try run(args + ["--steps", "13"])
        XCTAssertEqual(second.status, 0, second.output)
        XCTAssertTrue(second.output.contains("resuming after step 10"), second.output)
        XCTAssertTrue(second.output.contains("[rank 0/1] finished at step 13"), second.output)
        XCTAssertEqual(try CheckpointWriter.completeStates(in: out).map(\.step), [10, 12, 13])
    }
}
