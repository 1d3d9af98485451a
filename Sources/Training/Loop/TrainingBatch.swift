import Base
import Dataset
import Distributed
import Foundation
import SDXL
import Tensor

/// Seeds for every random draw of a run, derived statelessly from the run's seed and where the draw happens
/// (epoch, step, image, …). Nothing random carries state from one step to the next, so a resumed run draws exactly
/// what the uninterrupted run drew, and a sample draws the same noise whichever rank trains it.
public enum RunRandom {
    public static func mix(_ parts: [UInt64]) -> UInt64 {
        var h: UInt64 = 0x6c6f_7261_2d64_6973   // "lora-dis"
        for p in parts {
            h ^= p &+ 0x9E37_79B9_7F4A_7C15 &+ (h << 6) &+ (h >> 2)
            var z = h
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            h = z ^ (z >> 31)
        }
        return h
    }

    public enum Stream: UInt64 { case noise = 1, flip = 2, latent = 3, dropout = 4, lora = 5 }

    /// One sample's generator: (seed, stream, epoch, step, image, occurrence of the image in the step).
    public static func sample(seed: UInt64, _ stream: Stream, epoch: Int, step: Int, image: String, occurrence: Int) -> SplitMix64 {
        SplitMix64(seed: mix([seed, stream.rawValue, UInt64(epoch), UInt64(step), FNV1a64.hash(image), UInt64(occurrence)]))
    }
}

/// The text side: captions → (context, pooled). With the text encoders frozen and captions that never vary, each
/// caption is encoded once (memo); otherwise every batch runs the encoders on the step's tape, where the network's
/// text-encoder modules (if any) adapt them and record their gradients.
final class TextConditioner {
    let encoderL: CLIPTextEncoderL
    let encoderG: OpenCLIPTextEncoderG
    let tokenizerL: CLIPTokenizer
    let tokenizerG: CLIPTokenizer
    let maxTokenLength: Int
    /// Memo of encoded captions (only when every subset's captions are static and the encoders are not trained).
    private var memo: [String: (Tensor, Tensor)]? = nil

    init(encoders: (CLIPTextEncoderL, OpenCLIPTextEncoderG), maxTokenLength: Int, memoize: Bool) throws {
        (encoderL, encoderG) = encoders
        tokenizerL = try CLIPTokenizer.bundled(padding: .endOfText)
        tokenizerG = try CLIPTokenizer.bundled(padding: .zero)
        self.maxTokenLength = maxTokenLength
        memo = memoize ? [:] : nil
    }

    /// captions → context [B, 75n+2, 2048], pooled [B, P] on `t` (constants when memoised).
    func encode(_ t: Tape, _ captions: [String], checkpointing: Bool) -> (context: Var, pooled: Var) {
        if memo != nil {
            let encoded = captions.map { caption -> (Tensor, Tensor) in
                if let hit = memo?[caption] { return hit }
                let (c, p) = Conditioning.encode(Tape(recording: false), l: encoderL, g: encoderG,
                                                 idsL: [tokenizerL.chunks(caption, maxTokenLength: maxTokenLength)],
                                                 idsG: [tokenizerG.chunks(caption, maxTokenLength: maxTokenLength)])
                memo?[caption] = (c.value, p.value)
                return (c.value, p.value)
            }
            return (Var(stackBatch(encoded.map(\.0))), Var(stackBatch(encoded.map(\.1))))
        }
        return Conditioning.encode(t, l: encoderL, g: encoderG,
                                   idsL: captions.map { tokenizerL.chunks($0, maxTokenLength: maxTokenLength) },
                                   idsG: captions.map { tokenizerG.chunks($0, maxTokenLength: maxTokenLength) },
                                   checkpointing: checkpointing)
    }
}

/// Concatenates per-sample tensors [1, …] along the batch axis.
func stackBatch(_ parts: [Tensor]) -> Tensor {
    if parts.count == 1 { return parts[0] }
    let t = Tape(recording: false)
    return t.concat(parts.map { Var($0) }, axis: 0).value
}
