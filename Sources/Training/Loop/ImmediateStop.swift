import Distributed
import Foundation
import Tensor

#if canImport(Glibc)
import Glibc
#endif

/// A stop signal honoured within seconds wherever the rank is (loading the model, caching latents, mid-forward,
/// mid-backward), not at the next step boundary: a CPU step takes from seconds to minutes, and Open MPI (SIGCONT,
/// SIGTERM, SIGKILL, `odls_base_sigkill_timeout` apart) and Slurm (SIGTERM, then SIGKILL after KillWait) do not wait
/// for one.
///
/// A thread waits for the signal (StopSignal's wake pipe). What it does depends on the phase:
/// - setup (before the first step): nothing is trained yet and every latent cache entry already written validates
///   itself, so every rank exits at once — with the requeue status when the job script asked for it.
/// - training: rank 0 writes the state of the last *completed* optimizer step (the loop publishes each one under
///   `lock`, in the same critical section as the optimizer's update of the parameters, so the thread never sees
///   parameters and position of different steps), then exits; the micro-step in flight is abandoned. No collective
///   is needed: every rank holds the same LoRA and optimizer state after a step. The other ranks go on until the
///   launcher ends them when rank 0 exits (mpirun does at once; srun with --kill-on-bad-exit); a signal that reached
///   only them is still agreed at the next step boundary (`StopSignal.shouldStop`).
/// - finishing (final files being written): the thread leaves the process alone; it ends by itself.
///
/// The error-feedback residuals of the bf16 wire format live on every rank and change inside the all-reduce; a
/// state written here has none (a resume starts them at zero: correct, but not bit-identical to an uninterrupted run).
public final class ImmediateStop: @unchecked Sendable {
    enum Phase { case setup, training, finishing }

    /// Held by the optimizer's update with its position (GradientUpdate.apply) and by rank 0's file writes.
    let lock = NSLock()
    private var phase = Phase.setup
    private var rank = 0
    /// The last completed optimizer step (training phase), and the step whose state is already on disk.
    private var completed: TrainingPosition?
    private var savedStep: Int?
    /// Rank 0's writer of a state without collectives (Checkpointer.writeState); returns the file.
    private var writeState: ((TrainingPosition) throws -> URL?)?
    private var stateFolder = ""
    private let requeue: Bool
    private let say: (String) -> Void

    /// Installs the signal handlers and starts the thread. `requeue` (--requeue-on-stop): exit with
    /// `StopSignal.requeueExitCode` after any stop; otherwise 0 once the training is saved (as the step-boundary stop
    /// does) and 128 + signal when a signal ended the run before it trained anything.
    public init(requeue: Bool, say: @escaping (String) -> Void = { print($0) }) {
        self.requeue = requeue
        self.say = say
        StopSignal.install()
        // Captures self strongly: the thread lives for the process, and so must what it calls.
        let thread = Thread { [self] in
            while true { self.handle(StopSignal.waitForSignal()) }
        }
        thread.name = "lora-dist stop"
        thread.start()
    }

    /// `body` with no stop acting meanwhile: the optimizer's update with the position it produces, and every file
    /// rank 0 writes (one writer in the output folder at a time).
    func locked<T>(_ body: () throws -> T) rethrows -> T {
        lock.lock()
        defer { lock.unlock() }
        return try body()
    }

    /// The rank, once the launcher has said it (before, a signal ends the process the same way on every rank).
    public func setRank(_ rank: Int) { locked { self.rank = rank } }

    /// From here on a signal saves `position`'s state (and each later completed step's) on rank 0.
    /// `startIsSaved`: `position` is a resumed step whose state is the newest file in `stateFolder` (nothing to write
    /// for it); otherwise a stop before the next step completes writes `position`'s state (step 0 has none).
    func beginTraining(rank: Int, position: TrainingPosition, stateFolder: String, startIsSaved: Bool,
                       writeState: @escaping (TrainingPosition) throws -> URL?) {
        locked {
            self.rank = rank
            self.completed = position
            self.stateFolder = stateFolder
            self.writeState = writeState
            savedStep = startIsSaved ? position.optimizerSteps : nil
            phase = .training
        }
    }

    /// Call inside `locked`, right after the optimizer step that produced `position`.
    func stepCompleted(_ position: TrainingPosition) { completed = position }

    /// Call inside `locked`, after a state of `step` was written by the loop.
    func stateSaved(step: Int) { savedStep = step }

    func finishing() { locked { phase = .finishing } }

    private func handle(_ signal: Int32) {
        let name = StopSignal.name(signal)
        lock.lock()
        switch phase {
        case .finishing:
            lock.unlock()
        case .setup:
            if rank == 0 {
                say("stopped by \(name) before training started: nothing to save (latent cache entries already written are kept and reused)")
            }
            end(requeue ? StopSignal.requeueExitCode : 128 + signal)
        case .training:
            guard rank == 0, let position = completed, let writeState else {
                lock.unlock()   // rank 0 writes; the launcher ends this rank when rank 0 exits
                return
            }
            let started = Date()
            Threads.hold()   // the abandoned step's compute parks: the cores go to the write
            var code = requeue ? StopSignal.requeueExitCode : position.optimizerSteps == 0 ? 128 + signal : StopSignal.cleanExitCode
            if position.optimizerSteps == 0 {
                say("stopped by \(name) during the first step: nothing to save yet")
            } else if savedStep == position.optimizerSteps {
                say("stopped by \(name) during step \(position.optimizerSteps + 1): the state of step \(position.optimizerSteps) is already saved in \(stateFolder); resume with --resume auto")
            } else {
                do {
                    let url = try StopSignal.deferringKill { try writeState(position) }
                    say(String(format: "stopped by %@ during step %d: saved the state of step %d in %.2f s (%@); the step in progress is abandoned; resume with --resume auto",
                               name, position.optimizerSteps + 1, position.optimizerSteps, Date().timeIntervalSince(started),
                               url?.path ?? stateFolder))
                } catch {
                    say("stopped by \(name), but the state of step \(position.optimizerSteps) could not be written: \(error). Earlier states in \(stateFolder) are intact")
                    code = 1
                }
            }
            end(code)
        }
    }

    /// Exits from this thread, whatever the main thread is doing: buffered output first; no atexit handlers (MPI and
    /// the engine's threads are mid-call).
    private func end(_ code: Int32) -> Never {
        if code == StopSignal.requeueExitCode, rank == 0 { Self.markRequeue() }
        fflush(nil)
        _exit(code)
    }

    /// `LORA_DIST_STOP_FILE` (set by cluster/slurm/train.sbatch and cluster/pbs/train.pbs): rank 0 creates it when the
    /// run stopped to be requeued. A launcher's own exit status does not always carry the 75 — srun reports the other
    /// ranks, which it terminates once rank 0 has exited, as killed.
    public static func markRequeue() {
        guard let path = ProcessInfo.processInfo.environment["LORA_DIST_STOP_FILE"], !path.isEmpty else { return }
        _ = FileManager.default.createFile(atPath: path, contents: Data("\(StopSignal.requeueExitCode)\n".utf8))
    }
}
