import Dataset
import SDXL
import Tensor

/// The text side of the step: captions → (context, pooled). With the text encoders frozen and captions that never
/// vary, each caption is encoded once (memo); otherwise every batch runs the encoders on the step's tape, where the
/// network's text-encoder modules (if any) adapt them and record their gradients.
final class TextConditioner {
    let encoderL: CLIPTextEncoderL
    let encoderG: OpenCLIPTextEncoderG
    let tokenizerL: CLIPTokenizer
    let tokenizerG: CLIPTokenizer
    let maxTokenLength: Int
    /// Memo of encoded captions (only when the captions are static and the encoders are not trained).
    private var memo: [String: (Tensor, Tensor)]? = nil

    init(encoders: (CLIPTextEncoderL, OpenCLIPTextEncoderG), maxTokenLength: Int, memoize: Bool) throws {
        (encoderL, encoderG) = encoders
        tokenizerL = try CLIPTokenizer.bundled(padding: .endOfText)
        tokenizerG = try CLIPTokenizer.bundled(padding: .zero)
        self.maxTokenLength = maxTokenLength
        memo = memoize ? [:] : nil
    }

    /// captions → context [B, 75n+2, 2048], pooled [B, P] on `t` (constants when memoised). `checkpointing`: the
    /// encoders' layers recompute their activations in backward.
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
