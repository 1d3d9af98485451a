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

/// Handler installed for SIGTERM and SIGUSR1. The first signal only records itself; the training loop sees it
/// at the next step boundary. A second SIGTERM while a stop is already pending restores the default action and
/// re-raises: a rank stuck in a collective can still be killed the ordinary way (Slurm's KillWait, a user's
/// second `kill`). sigaction and raise are async-signal-safe.
private func stopSignalHandler(_ signal: Int32) {
    let previous = pendingStopSignal.exchange(signal, ordering: .sequentiallyConsistent)
    if previous != 0 && signal == SIGTERM {
        setHandler(SIGTERM, SIG_DFL)
        raise(SIGTERM)
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

    public static let signals: [Int32] = [SIGTERM, SIGUSR1]

    /// Installs the handlers (idempotent). Call before the first step.
    public static func install() {
        for sig in signals { setHandler(sig, { stopSignalHandler($0) }) }
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
