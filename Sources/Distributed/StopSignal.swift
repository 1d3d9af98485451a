import Foundation
import Synchronization

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The signal that asked this process to stop (0 = none). Written by the signal handler: a lock-free atomic
/// store is async-signal-safe, unlike anything that allocates or locks.
private let pendingStopSignal = Atomic<Int32>(0)

/// The pipe the handler writes each signal's number into, for `StopSignal.waitForSignal` (a thread that acts at
/// once instead of at the next step boundary). write(2) is async-signal-safe; -1 until `install`.
nonisolated(unsafe) private var wakePipe: (read: Int32, write: Int32) = (-1, -1)
/// Set while a state is being written after a signal: a second SIGTERM then (Open MPI's kill sequence, a user's
/// second `kill`) waits for the write instead of killing the process mid-file. SIGKILL still ends it.
private let writingState = Atomic<Bool>(false)

/// Handler installed for SIGTERM, SIGINT and SIGUSR1. The first signal only records itself (and wakes a waiting
/// thread); the training loop, or `ImmediateStop`, acts on it. A second SIGTERM or SIGINT while a stop is already
/// pending restores the default action and re-raises: a rank stuck in a collective can still be killed the
/// ordinary way (Slurm's KillWait, a user's second Ctrl-C) — except while the state is being written.
/// sigaction, raise and write are async-signal-safe.
private func stopSignalHandler(_ signal: Int32) {
    let savedErrno = errno   // write(2) may set it; the interrupted code may be about to read its own
    defer { errno = savedErrno }
    let previous = pendingStopSignal.exchange(signal, ordering: .sequentiallyConsistent)
    if wakePipe.write >= 0 {
        var byte = UInt8(truncatingIfNeeded: signal)
        _ = write(wakePipe.write, &byte, 1)
    }
    if previous != 0 && (signal == SIGTERM || signal == SIGINT) && !writingState.load(ordering: .sequentiallyConsistent) {
        setHandler(signal, SIG_DFL)
        raise(signal)
    }
}

/// sigaction with no extra flags beyond SA_RESTART (a blocking read/write in progress continues; the loop
/// checks the flag later). The handler field's spelling differs between Glibc and Darwin.
private func setHandler(_ sig: Int32, _ handler: (@convention(c) (Int32) -> Void)?) {
    var action = sigaction()
    #if os(Linux)
    action.__sigaction_handler.sa_handler = handler
    #else
    action.__sigaction_u.__sa_handler = handler
    #endif
    sigemptyset(&action.sa_mask)
    action.sa_flags = SA_RESTART
    sigaction(sig, &action, nil)
}

/// Anything that can sum one float across ranks (every `Communicator`; a fake in tests).
public protocol FlagReducer {
    func allReduceSum(_ buffer: inout [Float]) throws
}


/// Cooperative stop on SIGTERM / SIGUSR1 (Slurm `--signal=USR1@120` before the time limit, preemption, a
/// user's `kill`). The signal may reach only one rank (Slurm signals every task, but a user kills one pid;
/// `mpirun` forwards SIGUSR1 but not necessarily to all ranks at the same step), so ranks decide together:
/// at each step boundary every rank calls `shouldStop`, a one-float all-reduce of the local flag, and all of
/// them see the same answer at the same step. Rank 0 then writes a resumable state and every rank exits
/// with `StopSignal.exitCode`.
public enum StopSignal {
    /// Exit status after a signal-requested stop when the job should be requeued: 75 = EX_TEMPFAIL
    /// (sysexits.h, "temporary failure, retry later"). Job scripts test for it and call
    /// `scontrol requeue $SLURM_JOB_ID` (Slurm) or `qrerun` (PBS); the next run resumes from the newest state.
    public static let requeueExitCode: Int32 = 75
    /// Exit status after a signal-requested stop when no requeue is wanted: success, the state is saved.
    public static let cleanExitCode: Int32 = 0

    public static let signals: [Int32] = [SIGTERM, SIGUSR1, SIGINT]

    /// Installs the handlers (idempotent). Call before the first step.
    public static func install() {
        // Swift initializes globals lazily (swift_once, which locks): the handler must never be the first to touch them.
        _ = pendingStopSignal.load(ordering: .sequentiallyConsistent)
        _ = writingState.load(ordering: .sequentiallyConsistent)
        if wakePipe.read < 0 {
            var fds: [Int32] = [0, 0]
            if pipe(&fds) == 0 {
                _ = fcntl(fds[1], F_SETFL, fcntl(fds[1], F_GETFL) | O_NONBLOCK)   // a full pipe never blocks the handler
                wakePipe = (fds[0], fds[1])
            }
        }
        for sig in signals { setHandler(sig, { stopSignalHandler($0) }) }
    }

    /// Blocks the calling thread until a stop signal arrives (after `install`); returns it.
    public static func waitForSignal() -> Int32 {
        var byte: UInt8 = 0
        while true {
            let n = read(wakePipe.read, &byte, 1)
            if n == 1 { return Int32(byte) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { sleep(1) }   // no pipe (install failed): nothing to wait on, never busy-spin
        }
    }

    /// While `body` runs, a second SIGTERM/SIGINT does not kill the process (a state being written after a stop).
    public static func deferringKill<T>(_ body: () throws -> T) rethrows -> T {
        writingState.store(true, ordering: .sequentiallyConsistent)
        defer { writingState.store(false, ordering: .sequentiallyConsistent) }
        return try body()
    }

    /// Restores the default action for the signals (a process that stops using the protocol; tests).
    public static func uninstall() {
        for sig in signals { setHandler(sig, SIG_DFL) }
    }

    /// The signal received by this process, if any (local only: use `shouldStop` to agree across ranks).
    public static var pendingSignal: Int32? {
        let s = pendingStopSignal.load(ordering: .sequentiallyConsistent)
        return s == 0 ? nil : s
    }

    /// Marks a stop as requested without a signal (a rank's own reason, e.g. a max-time budget), and tests.
    public static func request(signal: Int32 = SIGTERM) {
        pendingStopSignal.store(signal, ordering: .sequentiallyConsistent)
    }

    /// Forgets a pending stop (tests; a process that handled one and carries on).
    public static func reset() { pendingStopSignal.store(0, ordering: .sequentiallyConsistent) }

    /// Collective: every rank must call it at the same step boundary. True on every rank when any rank has a
    /// pending stop. Costs one 4-byte all-reduce per step, noise next to the gradient all-reduce.
    public static func shouldStop(_ reducer: FlagReducer) throws -> Bool {
        var flag: [Float] = [pendingSignal == nil ? 0 : 1]
        try reducer.allReduceSum(&flag)
        return flag[0] > 0
    }

    public static func name(_ signal: Int32) -> String {
        switch signal {
        case SIGTERM: return "SIGTERM"
        case SIGUSR1: return "SIGUSR1"
        case SIGINT: return "SIGINT"
        default: return "signal \(signal)"
        }
    }
}
