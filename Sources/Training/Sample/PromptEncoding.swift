import SDXL
import Tensor

/// Prompts → SDXL text conditioning for generation. Prompts of up to 75 tokens give exactly what
/// StableDiffusionXLPipeline.encode_prompt gives (one 77-token window per encoder, penultimate states side by side,
/// bigG's pooled vector); longer prompts are cut into 75-token windows as kohya does (`Conditioning.encode`), up to
/// three (225 tokens), every prompt of a batch padded to the same number of windows.
public enum PromptEncoding {
    public static let maxWindows = 3

    /// How many 75-token windows the longest prompt needs (1…3).
    static func windows(_ prompts: [String], _ tokenizer: CLIPTokenizer) -> Int {
        let longest = prompts.map { tokenizer.encode($0).count }.max() ?? 0
        return max(1, min(maxWindows, (longest + 74) / 75))
    }

    /// context [B, 75n + 2, C_L + C_G], pooled [B, P] for `prompts` (B rows, in order).
    static func encode(_ t: Tape, l: CLIPTextEncoderL, g: OpenCLIPTextEncoderG, tokenizers: (CLIPTokenizer, CLIPTokenizer),
                       prompts: [String]) -> (context: Var, pooled: Var) {
        let n = windows(prompts, tokenizers.0)
        let idsL = prompts.map { tokenizers.0.chunks($0, maxTokenLength: 75 * n) }
        let idsG = prompts.map { tokenizers.1.chunks($0, maxTokenLength: 75 * n) }
        return Conditioning.encode(t, l: l, g: g, idsL: idsL, idsG: idsG)
    }
}
