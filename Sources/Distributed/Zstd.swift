import CZstd

/// zstd, for the compressed gradient all-reduce. The only file that imports CZstd.
public enum Zstd {
    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    static func check(_ rc: Int, _ what: String) throws -> Int {
        if ZSTD_isError(rc) != 0 {
            throw Failure(description: "zstd \(what) failed: \(String(cString: ZSTD_getErrorName(rc)))")
        }
        return rc
    }

    public static var version: String { String(cString: ZSTD_versionString()) }

    /// Compresses `input` at `level` (1 = fastest; zstd's range is 1...22, negative = faster still).
    public static func compress(_ input: [UInt8], level: Int32 = 1) throws -> [UInt8] {
        let bound = ZSTD_compressBound(input.count)
        var out = [UInt8](repeating: 0, count: bound)
        let n = try input.withUnsafeBytes { src in
            try out.withUnsafeMutableBytes { dst in
                try check(ZSTD_compress(dst.baseAddress, bound, src.baseAddress, input.count, level), "compress")
            }
        }
        out.removeLast(bound - n)
        return out
    }

    /// Decompresses a frame whose decompressed size is `size` bytes exactly.
    public static func decompress(_ input: [UInt8], size: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: size)
        let n = try input.withUnsafeBytes { src in
            try out.withUnsafeMutableBytes { dst in
                try check(ZSTD_decompress(dst.baseAddress, size, src.baseAddress, input.count), "decompress")
            }
        }
        guard n == size else { throw Failure(description: "zstd decompress produced \(n) bytes, expected \(size)") }
        return out
    }
}
