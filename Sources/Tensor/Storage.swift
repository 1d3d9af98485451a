/// The bytes behind a tensor: either owned (allocated here) or borrowed from an owner that keeps them
/// alive (a memory-mapped file). Kernels reach it only through `Tensor`'s internal accessors.
public final class Storage: @unchecked Sendable {
    let bytes: UnsafeMutableRawPointer
    let byteCount: Int
    private let owner: AnyObject?

    /// Zero-filled owned storage.
    init(byteCount: Int) {
        self.byteCount = byteCount
        self.bytes = UnsafeMutableRawPointer.allocate(byteCount: max(byteCount, 1), alignment: 64)
        self.bytes.initializeMemory(as: UInt8.self, repeating: 0, count: max(byteCount, 1))
        self.owner = nil
    }

    /// Uninitialised owned storage, for kernels that write every element.
    init(uninitializedByteCount byteCount: Int) {
        self.byteCount = byteCount
        self.bytes = UnsafeMutableRawPointer.allocate(byteCount: max(byteCount, 1), alignment: 64)
        self.owner = nil
    }

    /// Borrowed storage: `owner` must keep `bytes` valid for its lifetime (e.g. an mmap'd file).
    public init(borrowing bytes: UnsafeRawBufferPointer, owner: AnyObject) {
        self.bytes = UnsafeMutableRawPointer(mutating: bytes.baseAddress!)
        self.byteCount = bytes.count
        self.owner = owner
    }

    deinit { if owner == nil { bytes.deallocate() } }
}
