import Distributed
import Foundation
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
}
