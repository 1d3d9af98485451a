import Foundation
import Synchronization

/// Set by `Threads.hold()`: compute parks at its next `parallelFor`.
private let computeHeld = Atomic<Bool>(false)

/// How many threads one process uses. Under `mpirun` several ranks share a node, so this is set per
/// rank (cores on the node / ranks on the node) rather than taken from the machine.
/// GEMM runs on OpenBLAS's threads (oneDNN's OpenMP threads in the bf16 family, the same count); every other kernel on `parallelFor`'s. They never run at the same
/// time: a kernel calls GEMM from one thread only, outside any `parallelFor`, or inside one under
/// `BLAS.withOneThread` (OpenBLAS on one thread meanwhile).
public enum Threads {
    private static let lock = NSLock()
    nonisolated(unsafe) private static var current = ProcessInfo.processInfo.activeProcessorCount

    public static var count: Int {
        lock.lock(); defer { lock.unlock() }
        return current
    }

    /// Stops the engine's compute for good: every thread parks at its next `parallelFor` (the GEMM or oneDNN call in
    /// progress finishes first). For a process about to exit that needs the cores for something else — a stop writing
    /// the state while the abandoned step would otherwise keep both cores busy.
    public static func hold() { computeHeld.store(true, ordering: .relaxed) }

    static func parkIfHeld() {
        while computeHeld.load(ordering: .relaxed) { sleep(1) }
    }

    /// Sets the engine's threads and OpenBLAS's to `n` (at least 1).
    public static func set(_ n: Int) {
        let n = max(1, n)
        lock.lock(); current = n; lock.unlock()
        BLAS.setThreads(n)
        DNNL.setThreads(n)
    }
}

/// Runs `body` over `0..<n` split into at most `Threads.count` contiguous chunks (no chunk smaller than
/// `grain` items). Runs inline when there is one chunk.
@inline(__always)
func parallelFor(_ n: Int, grain: Int = 1, _ body: (Range<Int>) -> Void) {
    if n <= 0 { return }
    Threads.parkIfHeld()
    let chunks = min(Threads.count, max(1, n / max(grain, 1)))
    if chunks <= 1 { body(0..<n); return }
    DispatchQueue.concurrentPerform(iterations: chunks) { c in
        let lo = n * c / chunks, hi = n * (c + 1) / chunks
        if lo < hi { body(lo..<hi) }
    }
}
