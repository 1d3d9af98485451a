/// Byte grouping ("byte shuffle") for compressing floats: the k-th byte of every value is stored together,
/// so the sign/exponent bytes of a gradient (few distinct values) form one long, very compressible run and
/// the noisy low mantissa bytes another. Layout for n fp32 values: [byte0 × n][byte1 × n][byte2 × n][byte3 × n]
/// (byte0 = least significant); for bf16 (the upper half of fp32) [low byte × n][high byte × n].
public enum ByteGrouping {
    /// n floats → 4n grouped bytes.
    public static func groupFloat32(_ values: ArraySlice<Float>) -> [UInt8] {
        let n = values.count
        var out = [UInt8](repeating: 0, count: 4 * n)
        var i = 0
        for v in values {
            let b = v.bitPattern
            out[i] = UInt8(truncatingIfNeeded: b)
            out[n + i] = UInt8(truncatingIfNeeded: b >> 8)
            out[2 * n + i] = UInt8(truncatingIfNeeded: b >> 16)
            out[3 * n + i] = UInt8(truncatingIfNeeded: b >> 24)
            i += 1
        }
        return out
    }

    /// 4n grouped bytes → n floats.
    public static func ungroupFloat32(_ bytes: [UInt8], count n: Int) -> [Float] {
        precondition(bytes.count == 4 * n, "grouped fp32 payload has \(bytes.count) bytes, expected \(4 * n)")
        var out = [Float](repeating: 0, count: n)
        for i in 0..<n {
            let b = UInt32(bytes[i]) | UInt32(bytes[n + i]) << 8 | UInt32(bytes[2 * n + i]) << 16
                | UInt32(bytes[3 * n + i]) << 24
            out[i] = Float(bitPattern: b)
        }
        return out
    }

    /// n bf16 bit patterns → 2n grouped bytes.
    public static func groupBFloat16(_ values: [UInt16]) -> [UInt8] {
        let n = values.count
        var out = [UInt8](repeating: 0, count: 2 * n)
        for i in 0..<n {
            out[i] = UInt8(truncatingIfNeeded: values[i])
            out[n + i] = UInt8(truncatingIfNeeded: values[i] >> 8)
        }
        return out
    }

    /// 2n grouped bytes → n floats (bf16 widened exactly to fp32).
    public static func ungroupBFloat16(_ bytes: [UInt8], count n: Int) -> [Float] {
        precondition(bytes.count == 2 * n, "grouped bf16 payload has \(bytes.count) bytes, expected \(2 * n)")
        var out = [Float](repeating: 0, count: n)
        for i in 0..<n {
            out[i] = Float(bitPattern: (UInt32(bytes[i]) | UInt32(bytes[n + i]) << 8) << 16)
        }
        return out
    }

    /// fp32 → bf16, round to nearest even; NaN stays NaN (quiet bit set so truncation cannot make it Inf).
    @inline(__always)
    public static func bfloat16(_ x: Float) -> UInt16 {
        let b = x.bitPattern
        if x.isNaN { return UInt16(truncatingIfNeeded: (b >> 16) | 0x40) }
        let rounded = b &+ 0x7FFF &+ ((b >> 16) & 1)
        return UInt16(truncatingIfNeeded: rounded >> 16)
    }

    @inline(__always)
    public static func float(fromBFloat16 h: UInt16) -> Float { Float(bitPattern: UInt32(h) << 16) }
}
