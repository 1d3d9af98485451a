#if canImport(Glibc)
import Glibc
#endif

/// glibc's allocator serves blocks above 128 KB (its dynamic threshold grows to 32 MB at most) with fresh mmap'd
/// pages and returns them on free: every new multi-MB tensor or all-reduce piece then costs page faults and the kernel
/// zeroing each page, which measured as the largest part of the compressed all-reduce's time (bench/RESULTS.md "On
/// real LoRA gradients": fp32 ring 0.75 → 0.35 s per 170 MB). Keeping freed blocks in the heap reuses their pages.
public enum Memory {
    /// Sets M_MMAP_THRESHOLD to 256 MB and M_TRIM_THRESHOLD to 1 GB, unless the user set glibc's own variables
    /// (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, or GLIBC_TUNABLES), which then win. Call once, early.
    public static func keepFreedBlocks() {
        #if canImport(Glibc)
        let env = { (name: String) in getenv(name) != nil }
        guard !env("MALLOC_MMAP_THRESHOLD_"), !env("MALLOC_TRIM_THRESHOLD_"), !env("GLIBC_TUNABLES") else { return }
        // mallopt is in <malloc.h>, which Swift's Glibc module does not import: looked up by name. The option numbers
        // are glibc's (malloc.h: M_TRIM_THRESHOLD -1, M_MMAP_THRESHOLD -3).
        typealias Mallopt = @convention(c) (Int32, Int32) -> Int32
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "mallopt") else { return }
        let mallopt = unsafeBitCast(symbol, to: Mallopt.self)
        _ = mallopt(-3, 256 << 20)
        _ = mallopt(-1, 1 << 30)
        #endif
    }
}
