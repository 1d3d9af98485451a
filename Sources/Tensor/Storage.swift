#if canImport(Glibc)
import Glibc
#else
import Darwin
#endif
import Foundation

/// The bytes behind a tensor: either owned (allocated here) or borrowed from an owner that keeps them
/// alive (a memory-mapped file). Kernels reach it only through `Tensor`'s internal accessors.
public final class Storage: @unchecked Sendable {
    let bytes: UnsafeMutableRawPointer
    let byteCount: Int
    private let owner: AnyObject?

    /// Zero-filled owned storage.
    init(byteCount: Int) {
        self.byteCount = byteCount
        self.bytes = Storage.allocate(byteCount)
        memset(self.bytes, 0, max(byteCount, 1))
        self.owner = nil
    }

    /// Uninitialised owned storage, for kernels that write every element.
    init(uninitializedByteCount byteCount: Int) {
        self.byteCount = byteCount
        self.bytes = Storage.allocate(byteCount)
        self.owner = nil
    }

    /// Activations at SDXL sizes are tens of MB, freshly allocated each step: with 4 KB pages their
    /// first touch costs ~10k page faults per 40 MB (measured: 42 ms → 5 ms for a 42 MB copy with
    /// transparent huge pages). Large buffers are therefore 2 MB-aligned and advised as huge pages.
    private static let hugeThreshold = 4 << 20
    private static let hugePage = 2 << 20

    private static func allocate(_ byteCount: Int) -> UnsafeMutableRawPointer {
        let large = byteCount >= hugeThreshold
        let alignment = large ? hugePage : 64
        let size = large ? (byteCount + hugePage - 1) / hugePage * hugePage : max(byteCount, 1)
        if large, let p = BlockCache.take(size) { return p }
        var p: UnsafeMutableRawPointer?
        guard posix_memalign(&p, alignment, size) == 0, let p else {
            fatalError("out of memory allocating \(byteCount) bytes for a tensor")
        }
        #if os(Linux)
        if large { _ = madvise(p, size, MADV_HUGEPAGE) }
        #endif
        return p
    }

    /// Borrowed storage: `owner` must keep `bytes` valid for its lifetime (e.g. an mmap'd file).
    public init(borrowing bytes: UnsafeRawBufferPointer, owner: AnyObject) {
        self.bytes = UnsafeMutableRawPointer(mutating: bytes.baseAddress!)
        self.byteCount = bytes.count
        self.owner = owner
    }

    deinit {
        guard owner == nil else { return }
        if byteCount >= Storage.hugeThreshold {
            let size = (byteCount + Storage.hugePage - 1) / Storage.hugePage * Storage.hugePage
            if BlockCache.give(bytes, size) { return }
        }
        free(bytes)
    }
}

/// Large freed buffers kept for the next allocation of the same (2 MB-rounded) size. A training step allocates the
/// same activation shapes every step, and each fresh buffer costs the kernel a page fault and a page clearing per
/// 2 MB on first touch (a fifth of a bf16 SDXL step's samples before this cache); a reused one costs nothing.
/// Bounded: at most `limit` bytes are held (the oldest go first), so the cache raises the peak by that much at most.
enum BlockCache {
    /// LORA_DIST_BLOCK_CACHE_MB overrides (0 turns the cache off).
    static let limit: Int = {
        if let v = getenv("LORA_DIST_BLOCK_CACHE_MB"), let mb = Int(String(cString: v)), mb >= 0 { return mb << 20 }
        return 1 << 30
    }()
    nonisolated(unsafe) private static var cached: [(size: Int, pointer: UnsafeMutableRawPointer)] = []   // oldest first
    nonisolated(unsafe) private static var held = 0
    private static let lock = NSLock()

    static func take(_ size: Int) -> UnsafeMutableRawPointer? {
        guard limit > 0 else { return nil }
        lock.lock(); defer { lock.unlock() }
        guard let i = cached.lastIndex(where: { $0.size == size }) else { return nil }
        held -= size
        return cached.remove(at: i).pointer
    }

    /// False when the buffer alone is over the limit: the caller frees it. Otherwise the oldest buffers make room.
    static func give(_ p: UnsafeMutableRawPointer, _ size: Int) -> Bool {
        guard size <= limit else { return false }
        lock.lock(); defer { lock.unlock() }
        cached.append((size, p))
        held += size
        while held > limit {
            let old = cached.removeFirst()
            held -= old.size
            free(old.pointer)
        }
        return true
    }
}
