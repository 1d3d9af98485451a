/// 64-bit FNV-1a (Fowler–Noll–Vo): offset basis 0xcbf29ce484222325, prime 0x100000001b3. The project's one
/// non-cryptographic hash: sample ids → random streams, weight keys → random weights, file fingerprints, the
/// parameter-divergence check.
public struct FNV1a64: Sendable {
    public private(set) var value: UInt64 = 0xcbf2_9ce4_8422_2325
    public init() {}

    public mutating func add(_ bytes: UnsafeRawBufferPointer) {
        var v = value
        for b in bytes { v = (v ^ UInt64(b)) &* 0x0000_0100_0000_01b3 }
        value = v
    }
    public mutating func add<C: Collection>(_ bytes: C) where C.Element == UInt8 {
        var v = value
        for b in bytes { v = (v ^ UInt64(b)) &* 0x0000_0100_0000_01b3 }
        value = v
    }
    public var hex: String {
        let s = String(value, radix: 16)
        return String(repeating: "0", count: 16 - s.count) + s
    }

    /// The hash of a byte collection.
    public static func hash<C: Collection>(_ bytes: C) -> UInt64 where C.Element == UInt8 {
        var h = FNV1a64()
        h.add(bytes)
        return h.value
    }
    /// The hash of a string's UTF-8 bytes.
    public static func hash(_ s: String) -> UInt64 { hash(s.utf8) }
    /// The hash of floats' bit patterns (little-endian bytes): equal iff bit-identical, up to collisions.
    public static func hash(_ values: [Float]) -> UInt64 {
        var h = FNV1a64()
        values.withUnsafeBytes { h.add($0) }
        return h.value
    }
}
