import Base
import Foundation

extension Tensor {
    /// N(0, std²) samples from a seeded generator.
    public init(randomNormal shape: [Int], std: Float = 1, seed: UInt64) {
        var rng = SplitMix64(seed: seed)
        self.init(shape: shape, (0..<shape.reduce(1, *)).map { _ in Float(rng.normal()) * std })
    }

    /// U(lo, hi) samples from a seeded generator.
    public init(randomUniform shape: [Int], in range: ClosedRange<Float> = -1...1, seed: UInt64) {
        var rng = SplitMix64(seed: seed)
        let w = range.upperBound - range.lowerBound
        self.init(shape: shape, (0..<shape.reduce(1, *)).map { _ in range.lowerBound + Float(rng.uniform()) * w })
    }
}
