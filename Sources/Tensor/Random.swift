import Foundation

/// SplitMix64: small, fast, reproducible across platforms (the same seed gives the same tensor).
public struct SeededRandom: RandomNumberGenerator {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    public mutating func uniform() -> Double { Double(next() >> 11) * 0x1.0p-53 }
    /// Standard normal (Box–Muller).
    public mutating func normal() -> Double {
        let u1 = max(uniform(), 1e-300), u2 = uniform()
        return (-2 * log(u1)).squareRoot() * cos(2 * .pi * u2)
    }
}

extension Tensor {
    /// N(0, std²) samples from a seeded generator.
    public init(randomNormal shape: [Int], std: Float = 1, seed: UInt64) {
        var rng = SeededRandom(seed: seed)
        self.init(shape: shape, (0..<shape.reduce(1, *)).map { _ in Float(rng.normal()) * std })
    }

    /// U(lo, hi) samples from a seeded generator.
    public init(randomUniform shape: [Int], in range: ClosedRange<Float> = -1...1, seed: UInt64) {
        var rng = SeededRandom(seed: seed)
        let w = range.upperBound - range.lowerBound
        self.init(shape: shape, (0..<shape.reduce(1, *)).map { _ in range.lowerBound + Float(rng.uniform()) * w })
    }
}
