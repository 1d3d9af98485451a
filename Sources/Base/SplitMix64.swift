import Foundation

/// SplitMix64 (Steele, Lea & Flood 2014): a 64-bit state, one add and a mix per number — small, fast and the same
/// sequence on every platform. The project's one generator: the data plan's shuffles, caption processing, noise
/// and every training draw, random weights, the drawn-shapes dataset.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    public var state: UInt64
    public init(seed: UInt64) { state = seed }

    /// SplitMix64's finaliser (a bijective 64-bit mix).
    public static func mix(_ x: UInt64) -> UInt64 {
        var z = x
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        return Self.mix(state)
    }

    /// A generator for one stream, keyed by several words (seed, epoch, bucket…): each word is mixed in turn.
    public static func derive(_ parts: UInt64...) -> SplitMix64 {
        var g = SplitMix64(seed: 0x6c6f_7261_2d64_6973)  // "lora-dis"
        for p in parts { g = SplitMix64(seed: g.next() ^ p) }
        return g
    }

    /// Uniform in [0, 1) from the top 53 bits.
    public mutating func uniform() -> Double { Double(next() >> 11) * 0x1.0p-53 }

    /// Standard normal (Box–Muller).
    public mutating func normal() -> Double {
        let u1 = max(uniform(), 1e-300), u2 = uniform()
        return (-2 * log(u1)).squareRoot() * cos(2 * .pi * u2)
    }

    /// Uniform in 0..<n without modulo bias (rejection of the short top range, as CPython's _randbelow).
    public mutating func below(_ n: Int) -> Int {
        precondition(n > 0, "below(0)")
        let bound = UInt64(n)
        let limit = UInt64.max - UInt64.max % bound
        while true {
            let x = next()
            if x < limit { return Int(x % bound) }
        }
    }

    /// Fisher–Yates from the back, j = below(i + 1) (CPython's Random.shuffle on these draws).
    public mutating func shuffle<T>(_ a: inout [T]) {
        guard a.count > 1 else { return }
        for i in stride(from: a.count - 1, to: 0, by: -1) { a.swapAt(i, below(i + 1)) }
    }
}
