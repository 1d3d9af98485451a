import Base
import Foundation

/// Seeds for every random draw of a run, derived statelessly from the run's seed and where the draw happens
/// (epoch, step, image, …). Nothing random carries state from one step to the next, so a resumed run draws exactly
/// what the uninterrupted run drew, and a sample draws the same noise whichever rank trains it.
public enum RunRandom {
    public static func mix(_ parts: [UInt64]) -> UInt64 {
        var h: UInt64 = 0x6c6f_7261_2d64_6973   // "lora-dis"
        for p in parts {
            h ^= p &+ 0x9E37_79B9_7F4A_7C15 &+ (h << 6) &+ (h >> 2)
            h = SplitMix64.mix(h)
        }
        return h
    }

    public enum Stream: UInt64 { case noise = 1, flip = 2, latent = 3, dropout = 4, lora = 5 }

    /// One sample's generator: (seed, stream, epoch, step, image, occurrence of the image in the step).
    public static func sample(seed: UInt64, _ stream: Stream, epoch: Int, step: Int, image: String, occurrence: Int) -> SplitMix64 {
        SplitMix64(seed: mix([seed, stream.rawValue, UInt64(epoch), UInt64(step), FNV1a64.hash(image), UInt64(occurrence)]))
    }
}
