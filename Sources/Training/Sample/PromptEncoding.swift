import SDXL
import Tensor

/// Prompts → SDXL text conditioning for generation, as kohya's SDXL sampler does it (library/strategy_base.py
/// `_get_weighted_input_ids` + strategy_sdxl.py `encode_tokens_with_weights`, the path live since sd-scripts 793999d1):
///
/// 1. The prompt is split into weighted pieces by A1111's attention syntax (`PromptAttention.parse`).
/// 2. Each piece is tokenised on its own (BPE never crosses a piece boundary); every token gets its piece's weight.
/// 3. At most 75n tokens are kept (n windows of 75), then BOS + tokens + EOS + padding, cut into n 77-id windows for
///    each encoder as kohya's chunking does (`CLIPTokenizer.chunks(ids:)`), encoded and stitched (`Conditioning.encode`).
/// 4. The hidden states (both encoders' halves of the context) are multiplied by their tokens' weights — no
///    renormalisation; BOS, EOS and padding keep 1. The pooled vector is not weighted.
///
/// A prompt without brackets of ≤ 75 tokens therefore gives exactly StableDiffusionXLPipeline.encode_prompt's
/// conditioning. `windows`: kohya fixes n from the training run's max_token_length (75 → 1, 150 → 2, 225 → 3);
/// nil chooses the fewest windows (at most 3) that hold the longest prompt of the batch (what `lora-dist generate` does).
public enum PromptEncoding {
    public static let maxWindows = 3

    /// One prompt for one tokenizer: 75n + 2 ids (BOS, tokens, EOS, padding) and their weights.
    public struct Weighted: Equatable {
        public let ids: [Int]
        public let weights: [Float]
        /// Tokens beyond 75n were dropped.
        public let truncated: Bool
    }

    /// The prompt's tokens (without BOS/EOS) with their weights, untruncated.
    static func tokens(_ text: String, _ tokenizer: CLIPTokenizer) throws -> (ids: [Int], weights: [Double]) {
        var ids: [Int] = [], weights: [Double] = []
        for piece in try PromptAttention.parse(text) {
            let t = tokenizer.encode(piece.text)
            ids += t
            weights += [Double](repeating: piece.weight, count: t.count)
        }
        return (ids, weights)
    }

    /// kohya's `_get_weighted_input_ids` for max_length 75n + 2.
    public static func weighted(_ text: String, _ tokenizer: CLIPTokenizer, windows n: Int) throws -> Weighted {
        let limit = 75 * n
        var (ids, weights) = try tokens(text, tokenizer)
        let truncated = ids.count > limit
        if truncated { ids = Array(ids.prefix(limit)); weights = Array(weights.prefix(limit)) }
        let padded = [tokenizer.bosID] + ids + [tokenizer.eosID] + [Int](repeating: tokenizer.padID, count: limit - ids.count)
        let w = [Float(1)] + weights.map { Float($0) } + [Float](repeating: 1, count: limit + 1 - weights.count)
        return Weighted(ids: padded, weights: w, truncated: truncated)
    }

    /// The fewest windows (1…3) that hold every prompt's tokens.
    public static func windows(_ prompts: [String], _ tokenizer: CLIPTokenizer) throws -> Int {
        let longest = try prompts.map { try tokens($0, tokenizer).ids.count }.max() ?? 0
        return max(1, min(maxWindows, (longest + 74) / 75))
    }

    /// context [B, 75n + 2, C_L + C_G] and pooled [B, P] for `prompts` (B rows, in order), and which prompts were cut.
    public static func encode(_ t: Tape, l: CLIPTextEncoderL, g: OpenCLIPTextEncoderG, tokenizers: (CLIPTokenizer, CLIPTokenizer),
                              prompts: [String], windows fixed: Int? = nil) throws -> (context: Tensor, pooled: Tensor, truncated: [Bool]) {
        let n = try fixed ?? windows(prompts, tokenizers.0)
        precondition((1...maxWindows).contains(n), "PromptEncoding: 1 to 3 windows")
        let wl = try prompts.map { try weighted($0, tokenizers.0, windows: n) }
        let wg = try prompts.map { try weighted($0, tokenizers.1, windows: n) }
        let (context, pooled) = Conditioning.encode(t, l: l, g: g, idsL: wl.map { tokenizers.0.chunks(ids: $0.ids) },
                                                    idsG: wg.map { tokenizers.1.chunks(ids: $0.ids) })
        var values = context.value.scalars                                   // [B, 75n + 2, C]
        let positions = context.shape[1], channels = context.shape[2]
        let widthL = l.config.width
        for (b, (a, c)) in zip(wl, wg).enumerated() {
            // Position p (1…75n) carries token p − 1 of the padded row: weights[p]; BOS and the last slot stay 1.
            for p in 1...(75 * n) {
                let (fl, fg) = (a.weights[p], c.weights[p])
                if fl == 1 && fg == 1 { continue }
                let row = (b * positions + p) * channels
                for ch in 0..<channels { values[row + ch] *= ch < widthL ? fl : fg }
            }
        }
        return (Tensor(shape: context.shape, values), pooled.value, zip(wl, wg).map { $0.truncated || $1.truncated })
    }
}

/// A1111's prompt attention syntax as kohya's sampler parses it (`parse_prompt_attention`, a copy of A1111's
/// modules/prompt_parser.py): `(text)` ×1.1, `[text]` ÷1.1, `(text:1.3)` ×1.3, nesting multiplies, unclosed brackets
/// still apply, `\(` `\)` `\[` `\]` `\\` are literal characters, a lone `\` disappears; pieces with equal weights are
/// merged. No BREAK / AND / prompt editing (they stay plain text, as in kohya).
public enum PromptAttention {
    public struct Piece: Equatable {
        public var text: String
        public var weight: Double
        public init(_ text: String, _ weight: Double) { self.text = text; self.weight = weight }
    }

    public struct ParseError: Error, CustomStringConvertible, Equatable {
        public let description: String
    }

    /// The pieces of `text` with their weights (Python floats: Double).
    public static func parse(_ text: String) throws -> [Piece] {
        var res: [Piece] = []
        var round: [Int] = [], square: [Int] = []
        func multiply(from start: Int, _ m: Double) { for p in start..<res.count { res[p].weight *= m } }
        let s = Array(text)
        var i = 0
        let special: Set<Character> = ["\\", "(", ")", "[", "]", ":"]
        while i < s.count {
            let c = s[i]
            if c == "\\" {
                // \( \) \[ \] \\ → the character; a lone backslash (before anything else, or at the end) → nothing.
                if i + 1 < s.count, ["(", ")", "[", "]", "\\"].contains(s[i + 1]) {
                    res.append(Piece(String(s[i + 1]), 1))
                    i += 2
                } else {
                    res.append(Piece("", 1))
                    i += 1
                }
            } else if c == "(" {
                round.append(res.count); i += 1
            } else if c == "[" {
                square.append(res.count); i += 1
            } else if c == ":", let (number, end) = weightSuffix(s, i), !round.isEmpty {
                guard let w = Double(number) else {
                    throw ParseError(description: "prompt weight '\(number)' in \"\(text)\" is not a number (write e.g. (word:1.2))")
                }
                multiply(from: round.removeLast(), w)
                i = end
            } else if c == ":", let (_, end) = weightSuffix(s, i) {
                res.append(Piece(String(s[i..<end]), 1))    // `:N)` with no open bracket: literal text
                i = end
            } else if c == ")" && !round.isEmpty {
                multiply(from: round.removeLast(), 1.1); i += 1
            } else if c == "]" && !square.isEmpty {
                multiply(from: square.removeLast(), 1 / 1.1); i += 1
            } else if special.contains(c) {
                res.append(Piece(String(c), 1)); i += 1     // unmatched ) or ], a lone ':'
            } else {
                var j = i
                while j < s.count && !special.contains(s[j]) { j += 1 }
                res.append(Piece(String(s[i..<j]), 1))
                i = j
            }
        }
        for p in round { multiply(from: p, 1.1) }
        for p in square { multiply(from: p, 1 / 1.1) }
        if res.isEmpty { res = [Piece("", 1)] }
        var k = 0
        while k + 1 < res.count {
            if res[k].weight == res[k + 1].weight {
                res[k].text += res[k + 1].text
                res.remove(at: k + 1)
            } else {
                k += 1
            }
        }
        return res
    }

    /// `:([+-]?[.\d]+)\)` at i: the number's text and the index after `)`.
    static func weightSuffix(_ s: [Character], _ i: Int) -> (String, Int)? {
        var j = i + 1
        if j < s.count, s[j] == "+" || s[j] == "-" { j += 1 }
        let start = j
        while j < s.count, s[j] == "." || (s[j].isASCII && s[j].isNumber) { j += 1 }
        guard j > start, j < s.count, s[j] == ")" else { return nil }
        return (String(s[(i + 1)..<j]), j + 1)
    }
}
