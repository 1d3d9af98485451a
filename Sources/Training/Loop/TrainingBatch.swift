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

    public static func fnv1a(_ s: String) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in s.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        return h
    }

    public enum Stream: UInt64 { case noise = 1, flip = 2, latent = 3, dropout = 4, lora = 5 }

    /// One sample's generator: (seed, stream, epoch, step, image, occurrence of the image in the step).
    public static func sample(seed: UInt64, _ stream: Stream, epoch: Int, step: Int, image: String, occurrence: Int) -> SeededRandom {
        SeededRandom(seed: mix([seed, stream.rawValue, UInt64(epoch), UInt64(step), fnv1a(image), UInt64(occurrence)]))
    }
}

/// The text side: captions → (context, pooled), with a per-caption memo when captions never vary.
final class TextConditioner {
    let encoderL: CLIPTextEncoderL
    let encoderG: OpenCLIPTextEncoderG
    let tokenizerL: CLIPTokenizer
    let tokenizerG: CLIPTokenizer
    let maxTokenLength: Int
    /// Memo of encoded captions (only when every subset's captions are static).
    private var memo: [String: (Tensor, Tensor)]? = nil

    init(checkpoint: SDXLCheckpoint, maxTokenLength: Int, memoize: Bool) throws {
        // sgm's pooled projection (what ComfyUI/A1111/diffusers use at inference); kohya's single-file loader leaves
        // bigG's text_projection untransposed, which gives another pooled vector — we train with the inference one.
        (encoderL, encoderG) = try checkpoint.textEncoders(pooledProjection: .openCLIP)
        tokenizerL = try CLIPTokenizer.bundled(padding: .endOfText)
        tokenizerG = try CLIPTokenizer.bundled(padding: .zero)
        self.maxTokenLength = maxTokenLength
        memo = memoize ? [:] : nil
    }

    func encode(_ caption: String) -> (context: Tensor, pooled: Tensor) {
        if let hit = memo?[caption] { return hit }
        let t = Tape(recording: false)
        let (context, pooled) = Conditioning.encode(t, l: encoderL, g: encoderG,
                                                    idsL: [tokenizerL.chunks(caption, maxTokenLength: maxTokenLength)],
                                                    idsG: [tokenizerG.chunks(caption, maxTokenLength: maxTokenLength)])
        let out = (context.value, pooled.value)
        memo?[caption] = out
        return out
    }
}

/// Concatenates per-sample tensors [1, …] along the batch axis.
func stackBatch(_ parts: [Tensor]) -> Tensor {
    if parts.count == 1 { return parts[0] }
    let t = Tape(recording: false)
    return t.concat(parts.map { Var($0) }, axis: 0).value
}
