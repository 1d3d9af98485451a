import Foundation

/// Reusable scratch memory for the convolution kernels. A fresh multi-MB buffer costs a page fault per
/// 4 KB on every call (glibc hands large blocks back to the kernel when they are freed), which is a
/// sizeable fraction of a convolution; so up to two buffers (≤ 128 MB each) are kept between calls.
enum Scratch {
    private static let lock = NSLock()
    nonisolated(unsafe) private static var pool: [(pointer: UnsafeMutablePointer<Float>, count: Int)] = []
    private static let keepAtMost = 32 << 20   // floats per buffer

    static func with<R>(_ count: Int, _ body: (UnsafeMutablePointer<Float>) -> R) -> R {
        let count = max(count, 1)
        lock.lock()
        let hit = pool.indices.filter { pool[$0].count >= count }.min { pool[$0].count < pool[$1].count }
        let buffer = hit.map { pool.remove(at: $0) }
        lock.unlock()
        let b = buffer ?? (UnsafeMutablePointer<Float>.allocate(capacity: count), count)
        defer {
            lock.lock()
            if b.count > keepAtMost {
                b.pointer.deallocate()
            } else {
                pool.append(b)
                if pool.count > 2, let i = pool.indices.min(by: { pool[$0].count < pool[$1].count }) {
                    pool.remove(at: i).pointer.deallocate()
                }
            }
            lock.unlock()
        }
        return body(b.pointer)
    }
}
