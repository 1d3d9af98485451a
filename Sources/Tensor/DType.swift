/// Element types a tensor can be stored in. fp16/bf16 let frozen weights stay in their file's precision (or be
/// memory-mapped); the fp32 kernel family widens them one operation at a time, the bf16 family reads bf16 directly.
public enum DType: String, Sendable, CaseIterable {
    case f32, f16, bf16

    public var byteSize: Int { self == .f32 ? 4 : 2 }
}

/// bf16 <-> fp32 conversion (round to nearest even; NaN stays NaN).
@inline(__always) func bf16Bits(_ x: Float) -> UInt16 {
    let bits = x.bitPattern
    if x.isNaN { return UInt16(truncatingIfNeeded: (bits >> 16) | 0x40) }
    let rounding = ((bits >> 16) & 1) &+ 0x7FFF
    return UInt16(truncatingIfNeeded: (bits &+ rounding) >> 16)
}

@inline(__always) func floatFromBF16(_ b: UInt16) -> Float { Float(bitPattern: UInt32(b) << 16) }
