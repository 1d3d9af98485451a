import Distributed
import Foundation
import SafeTensors
import TestSupport
import XCTest

#if canImport(Glibc)
import Glibc
#endif

/// Stops as clusters and users send them (issue 13): real signals to `mpirun` itself and to a lone rank, mid-step
/// (LORA_DIST_TEST_STEP_DELAY makes each micro-step of the tiny model take seconds) and during the latent cache
/// build (LORA_DIST_TEST_SETUP_DELAY).
extension TrainCommandTests {
    /// Blocks until the metrics file holds `steps` step lines (rank 0 writes one per optimizer step).
    static func waitForSteps(_ metrics: URL, _ steps: Int, timeout: Double = 120) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if let text = try? String(contentsOf: metrics, encoding: .utf8),
               text.split(separator: "\n").filter({ $0.contains("\"step\"") }).count >= steps { return true }
            usleep(50_000)
        }
        return false
    }

    /// Holds the seconds from a signal to the process's exit.
    final class Clock: @unchecked Sendable {
        private let lock = NSLock()
        private var sent: Date?
        func mark() { lock.lock(); sent = Date(); lock.unlock() }
        var sinceMark: Double? { lock.lock(); defer { lock.unlock() }; return sent.map { Date().timeIntervalSince($0) } }
    }

    // SIGTERM to mpirun while step 3 is in progress (each micro-step takes ≥ 6 s): Open MPI sends the ranks SIGTERM
    // one odls_base_sigkill_timeout (1 s) later and SIGKILL one more later, so the state must be on disk within about
    // a second. Rank 0 saves step 2's state mid-step; `--resume auto` then ends bit-identical to a run never stopped.
    func testSIGTERMToMpirunMidStepSavesTheLastCompletedStep() throws {
        let images = try squareImages(3)
        let straight = try run(["train", try config("straight", images: images, batch: 1, steps: 4)], ranks: 2)
        XCTAssertEqual(straight.status, 0, straight.output)
        let cfg = try config("stopped", images: images, batch: 1, steps: 4)
        let dir = work.appendingPathComponent("stopped")
        let clock = Clock()
        let stopped = try TestProcesses.run(try TestProcesses.executable("lora-dist"), ["train", cfg, "--requeue-on-stop"],
                                            ranks: 2, environment: ["LORA_DIST_TEST_STEP_DELAY": "6"]) { pid in
            guard Self.waitForSteps(dir.appendingPathComponent("t-metrics.jsonl"), 2) else { return }
            clock.mark()
            kill(pid, SIGTERM)
        }
        let seconds = try XCTUnwrap(clock.sinceMark, "step 2 never completed: \(stopped.output)")
        XCTAssertNotEqual(stopped.status, 0, stopped.output)
        XCTAssertTrue(stopped.output.contains("stopped by SIGTERM during step 3: saved the state of step 2"), stopped.output)
        XCTAssertLessThan(seconds, 5, "the stop waited for the step to end (6 s): \(stopped.output)")
        XCTAssertEqual(try CheckpointWriter.completeStates(in: dir.appendingPathComponent("t-state")).map(\.step), [2])
        let resumed = try run(["train", cfg, "--resume", "auto"], ranks: 2)
        XCTAssertEqual(resumed.status, 0, resumed.output)
        XCTAssertTrue(resumed.output.contains("resumed from"), resumed.output)
        XCTAssertEqual(try loraTensors(dir.appendingPathComponent("t.safetensors").path),
                       try loraTensors(work.appendingPathComponent("straight/t.safetensors").path),
                       "the resumed LoRA differs from the uninterrupted run")
    }

    // Ctrl-C (SIGINT) on a one-rank run mid-step saves the last completed step and exits 0.
    func testCtrlCOnOneRankSaves() throws {
        let images = try squareImages(2)
        let cfg = try config("ctrlc", images: images, batch: 1, steps: 5)
        let dir = work.appendingPathComponent("ctrlc")
        let clock = Clock()
        let r = try TestProcesses.run(try TestProcesses.executable("lora-dist"), ["train", cfg],
                                      environment: ["LORA_DIST_TEST_STEP_DELAY": "6"]) { pid in
            guard Self.waitForSteps(dir.appendingPathComponent("t-metrics.jsonl"), 1) else { return }
            clock.mark()
            kill(pid, SIGINT)
        }
        let seconds = try XCTUnwrap(clock.sinceMark, r.output)
        XCTAssertEqual(r.status, 0, r.output)
        XCTAssertLessThan(seconds, 3, r.output)
        XCTAssertTrue(r.output.contains("stopped by SIGINT during step 2: saved the state of step 1"), r.output)
        XCTAssertEqual(try CheckpointWriter.completeStates(in: dir.appendingPathComponent("t-state")).map(\.step), [1])
    }

    // A run resumed from another run's state (`--resume PATH`) has nothing of its own on disk: a stop during its first
    // step writes the resumed step's state into this run's folder (it used to say "already saved" and write nothing).
    func testStopRightAfterResumingFromAnotherFolderSaves() throws {
        let images = try squareImages(2)
        let first = try config("origin", images: images, batch: 1, steps: 4, extra: "save_every_n_steps = 2\nsave_state = true\n")
        XCTAssertEqual(try run(["train", first, "--max-train-steps", "2"]).status, 0)
        let origin = work.appendingPathComponent("origin/t-state")
        let cfg = try config("moved", images: images, batch: 1, steps: 4)
        let dir = work.appendingPathComponent("moved")
        let r = try TestProcesses.run(try TestProcesses.executable("lora-dist"), ["train", cfg, "--resume", origin.path],
                                      environment: ["LORA_DIST_TEST_STEP_DELAY": "6"]) { pid in
            let deadline = Date().addingTimeInterval(120)
            while Date() < deadline {
                if let text = try? String(contentsOf: dir.appendingPathComponent("t-metrics.jsonl"), encoding: .utf8),
                   text.contains("run_start") { break }
                usleep(50_000)
            }
            sleep(1)   // inside step 3
            kill(pid, SIGINT)
        }
        XCTAssertEqual(r.status, 0, r.output)
        XCTAssertTrue(r.output.contains("stopped by SIGINT during step 3: saved the state of step 2"), r.output)
        XCTAssertEqual(try CheckpointWriter.completeStates(in: dir.appendingPathComponent("t-state")).map(\.step), [2])
    }

    // A signal while the latent cache is being built (before any step) ends every rank at once with the requeue status,
    // which is what the Slurm/PBS scripts requeue on (it used to be 138/143, and the job was not requeued).
    func testSignalDuringSetupExitsWithTheRequeueCode() throws {
        let images = try squareImages(2)
        let cfg = try config("setup", images: images, batch: 1, steps: 3)
        let clock = Clock()
        let r = try TestProcesses.run(try TestProcesses.executable("lora-dist"), ["train", cfg, "--requeue-on-stop"],
                                      ranks: 2, environment: ["LORA_DIST_TEST_SETUP_DELAY": "60"]) { pid in
            sleep(4)   // ranks started, model built, inside the (delayed) latent cache build
            clock.mark()
            kill(pid, SIGUSR1)   // what Slurm's --signal=B:USR1@… reaches mpirun with; mpirun forwards it at once
        }
        let seconds = try XCTUnwrap(clock.sinceMark)
        XCTAssertEqual(r.status, StopSignal.requeueExitCode, r.output)
        XCTAssertLessThan(seconds, 10, r.output)
        XCTAssertTrue(r.output.contains("stopped by SIGUSR1 before training started"), r.output)
    }

    // A rank that stops (SIGSTOP after step 2) does not hang the job: after [lora_dist] collective_timeout (+ twice the
    // slowest step) rank 0 stops with an error naming it, and the job ends (it used to spin at 100 % CPU forever).
    func testStalledRankEndsTheJobNamingIt() throws {
        let images = try squareImages(2)
        let cfg = try config("stall", images: images, batch: 1, steps: 6, lora: "collective_timeout = 3")
        let started = Date()
        let r = try TestProcesses.run(try TestProcesses.executable("lora-dist"), ["train", cfg], ranks: 2,
                                      environment: ["LORA_DIST_TEST_STALL_AT_STEP": "2"], timeout: 120)
        XCTAssertNotEqual(r.status, 0, r.output)
        XCTAssertTrue(r.output.contains("Rank(s) 1 did not answer"), r.output)
        XCTAssertTrue(r.output.contains("after step 2"), r.output)
        XCTAssertLessThan(Date().timeIntervalSince(started), 60, r.output)
    }

    // Two runs in one output_dir: the second stops at once naming the first (host, pid); after the first is stopped the
    // next run there says the previous one did not finish, and takes the folder over.
    func testSecondRunInOneOutputDirStopsAtOnce() throws {
        let images = try squareImages(2)
        let cfg = try config("shared", images: images, batch: 1, steps: 4)
        let dir = work.appendingPathComponent("shared")
        final class Box: @unchecked Sendable { var result: (status: Int32, output: String)?; var seconds = 0.0; var pid: Int32 = 0 }
        let second = Box()
        let exe = try TestProcesses.executable("lora-dist")
        let first = try TestProcesses.run(exe, ["train", cfg], environment: ["LORA_DIST_TEST_STEP_DELAY": "4"]) { pid in
            guard Self.waitForSteps(dir.appendingPathComponent("t-metrics.jsonl"), 1) else { return }
            let t0 = Date()
            second.result = try? TestProcesses.run(exe, ["train", cfg])
            second.seconds = Date().timeIntervalSince(t0)
            second.pid = pid
            kill(pid, SIGTERM)
        }
        let r = try XCTUnwrap(second.result, first.output)
        XCTAssertNotEqual(r.status, 0, r.output)
        XCTAssertTrue(r.output.contains("is in use by another lora-dist run") && r.output.contains("pid \(second.pid)"), r.output)
        XCTAssertLessThan(second.seconds, 10, r.output)
        XCTAssertTrue(first.output.contains("stopped by SIGTERM"), first.output)
        let next = try run(["train", cfg, "--resume", "auto"])
        XCTAssertEqual(next.status, 0, next.output)
        XCTAssertTrue(next.output.contains("did not finish"), next.output)
        let again = try run(["train", cfg, "--max-train-steps", "5", "--resume", "auto"])
        XCTAssertFalse(again.output.contains("did not finish"), "a finished run leaves no stale holder: \(again.output)")
    }

    // --resume auto with a corrupt newest state falls back to the next older one, saying so; temporaries a killed writer
    // left (a LoRA's .tmp-<pid>, a state's .state-*.tmp-<pid>, .nosync files) are removed at the next start.
    func testResumeAutoSkipsACorruptNewestStateAndCleansTemporaries() throws {
        let images = try squareImages(2)
        let cfg = try config("corrupt", images: images, batch: 1, steps: 5, extra: "save_every_n_steps = 1\nsave_state = true\n",
                             lora: "keep_states = 3")
        let dir = work.appendingPathComponent("corrupt"), states = dir.appendingPathComponent("t-state")
        let first = try run(["train", cfg, "--max-train-steps", "3"])
        XCTAssertEqual(first.status, 0, first.output)
        XCTAssertEqual(try CheckpointWriter.completeStates(in: states).map(\.step), [1, 2, 3])
        // Flip one byte in the middle of the newest state: its checksum no longer matches.
        let newest = states.appendingPathComponent(CheckpointWriter.fileName(step: 3))
        var bytes = try Data(contentsOf: newest)
        bytes[bytes.count / 2] ^= 0xFF
        try bytes.write(to: newest)
        let leftovers = ["t-step00000002.safetensors.tmp-99999", ".nosync.t.safetensors.abc"]
        for name in leftovers { try Data([1, 2, 3]).write(to: dir.appendingPathComponent(name)) }
        try Data([1]).write(to: states.appendingPathComponent(".state-00000004.tmp-99999"))
        let resumed = try run(["train", cfg, "--resume", "auto"])
        XCTAssertEqual(resumed.status, 0, resumed.output)
        XCTAssertTrue(resumed.output.contains("state-00000003.ldstate cannot be used") && resumed.output.contains("trying the next older one"), resumed.output)
        XCTAssertTrue(resumed.output.contains("at step 2/5"), resumed.output)
        XCTAssertTrue(resumed.output.contains("removed 3 incomplete file(s)"), resumed.output)
        for name in leftovers { XCTAssertFalse(FileManager.default.fileExists(atPath: dir.appendingPathComponent(name).path), name) }
    }

    // A refused resume names the settings that changed; a dataset with images added is accepted, saying what changed.
    func testResumeSaysWhatChanged() throws {
        let images = try squareImages(3)
        let cfg = try config("changed", images: images, batch: 1, steps: 4, extra: "save_every_n_steps = 2\nsave_state = true\n")
        let dir = work.appendingPathComponent("changed")
        XCTAssertEqual(try run(["train", cfg, "--max-train-steps", "2"]).status, 0)
        let other = try run(["train", cfg, "--resume", "auto", "--set", "network_dim=8", "--set", "learning_rate=2e-3"])
        XCTAssertNotEqual(other.status, 0, other.output)
        XCTAssertTrue(other.output.contains("network_dim: 4 → 8") && other.output.contains("learning_rate: "), other.output)
        XCTAssertFalse(other.output.contains("latent cache"), "refused before the latent cache is built (item 15): \(other.output)")
        // One more image (and its caption) in the folder.
        let extra = try TrainingFixtures.squareImages(4, in: work.appendingPathComponent("img4"))
        for name in try FileManager.default.contentsOfDirectory(atPath: extra.path) where name.hasPrefix("sq_03") {
            try? FileManager.default.copyItem(at: extra.appendingPathComponent(name), to: images.appendingPathComponent(name))
        }
        let added = try run(["train", cfg, "--resume", "auto"])
        XCTAssertEqual(added.status, 0, added.output)
        XCTAssertTrue(added.output.contains("dataset changed since the state: 1 image(s) added"), added.output)
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir.appendingPathComponent("t.safetensors").path))
    }

    // Elastic resume: a state written by 2 ranks continues on 1 rank at the same step (the global batch before/after
    // printed), and `lora-dist export` turns a state into the LoRA file the step save of that step holds.
    func testElasticResumeAndExport() throws {
        let images = try squareImages(3)
        let cfg = try config("elastic", images: images, batch: 1, steps: 4, extra: "save_every_n_steps = 2\nsave_state = true\n")
        let dir = work.appendingPathComponent("elastic"), states = dir.appendingPathComponent("t-state")
        let two = try run(["train", cfg, "--max-train-steps", "2"], ranks: 2)
        XCTAssertEqual(two.status, 0, two.output)
        let exported = work.appendingPathComponent("exported.safetensors")
        let e = try run(["export", states.path, "--out", exported.path])
        XCTAssertEqual(e.status, 0, e.output)
        XCTAssertTrue(e.output.contains("step 2"), e.output)
        // The final save of the 2-step run is step 2's LoRA: the export from step 2's state has the same tensors.
        XCTAssertEqual(try loraTensors(exported.path), try loraTensors(dir.appendingPathComponent("t.safetensors").path))
        let meta = try SafeTensorsFile(path: exported.path).metadata
        XCTAssertEqual(meta["ss_output_name"], "t")
        XCTAssertNotNil(meta["sshs_model_hash"])
        let one = try run(["train", cfg, "--resume", "auto"])
        XCTAssertEqual(one.status, 0, one.output)
        XCTAssertTrue(one.output.contains("resuming a 2-rank state on 1 rank") && one.output.contains("Global batch 2 = 1 × 1 × 2 ranks → 1 = 1 × 1 × 1")
                      && one.output.contains("gradient_accumulation_steps = 2 would keep 2"), one.output)
        XCTAssertTrue(one.output.contains("at step 2/4"), one.output)
        // The summary counts this process's steps only; each process starts its part of the metrics file with a marker.
        XCTAssertTrue(one.output.contains("trained 2 steps"), one.output)
        let metrics = try String(contentsOf: dir.appendingPathComponent("t-metrics.jsonl"), encoding: .utf8)
        XCTAssertEqual(metrics.split(separator: "\n").filter { $0.contains("\"run_start\"") }.count, 2, metrics)
        XCTAssertTrue(metrics.contains("\"start_after_step\":2"), metrics)
        let bad = try run(["export", work.appendingPathComponent("nothing").path])
        XCTAssertNotEqual(bad.status, 0)
        XCTAssertTrue(bad.output.contains("no such state file or folder"), bad.output)
    }

    // Item 15: an output_dir that cannot be made is an error naming the key and why, not a raw Foundation error.
    func testBadOutputDirNamesTheKey() throws {
        let file = work.appendingPathComponent("plainfile")
        try Data("x".utf8).write(to: file)
        let r = try run(["train", "--output-dir", file.appendingPathComponent("out").path, "--max-train-steps", "1"])
        XCTAssertNotEqual(r.status, 0)
        XCTAssertTrue(r.output.contains("output_dir") && r.output.contains("is a file, not a folder"), r.output)
        XCTAssertFalse(r.output.contains("NSCocoaErrorDomain"), r.output)
    }
}
