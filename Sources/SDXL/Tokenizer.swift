import Foundation

/// A tokenizer file that could not be read or is not a CLIP BPE vocabulary.
public struct TokenizerError: Error, CustomStringConvertible {
    public let file: String
    public let reason: String

    public var description: String { "CLIP tokenizer: \(file): \(reason)" }
}

/// CLIP's byte-level BPE tokenizer, id-for-id equal to transformers' python `CLIPTokenizer` (the class that
/// cleans text with ftfy, as kohya's sd-scripts runs it: transformers 4.54, ftfy 6.3), plus kohya's chunking
/// of long captions into 77-token windows.
///
/// Per caption (transformers `PreTrainedTokenizer.tokenize` → `CLIPTokenizer._tokenize` → `bpe`):
/// 1. split the raw text on the added special tokens: `<|startoftext|>`, `<|endoftext|>` and, for encoder 2,
///    the pad token `!` (id 0) — laion's bigG tokenizer declares it as a special token, so every `!` of a
///    caption becomes id 0 there while encoder 1 BPE-encodes it;
/// 2. each other piece: `whitespace_clean(ftfy.fix_text(piece)).lower()` (`FTFY` below; Python's `str.lower`,
///    final sigma included);
/// 3. pre-tokenise with CLIP's regex, byte-encode each match, BPE with the merge ranks, `</w>` on the last
///    symbol of each word.
///
/// Thread-safe: the word → ids cache is locked.
public final class CLIPTokenizer: @unchecked Sendable {
    public enum Padding {
        /// Encoder 1 (openai/clip-vit-large-patch14): pad with `<|endoftext|>` (49407).
        case endOfText
        /// Encoder 2 (laion CLIP-ViT-bigG-14, as kohya sets it: `tokenizer2.pad_token_id = 0`): pad with id 0,
        /// `!`, which is also a special token (see step 1 above).
        case zero
    }

    /// transformers' `model_max_length` for CLIP: BOS + 75 tokens + EOS.
    public static let modelMaxLength = 77

    public let padding: Padding
    public let bosID: Int
    public let eosID: Int
    public let padID: Int
    public let vocabularySize: Int

    /// The added special tokens split out of raw text before cleaning (transformers' `tokens_trie`), as scalars.
    private let specialTokens: [(scalars: [Unicode.Scalar], id: Int)]
    /// Byte b → id of its byte-level symbol (`bytes_to_unicode()[b]`), and of that symbol + "</w>".
    private let byteSymbolID: [Int32]
    private let byteSymbolEndID: [Int32]
    /// (left id << 32 | right id) → (rank << 32 | merged id).
    private let merges: [UInt64: UInt64]

    private let cacheLock = NSLock()
    /// UTF-8 bytes of a pre-token → its ids (transformers' `self.cache`). Keyed by bytes, not String: Swift's
    /// String equality is canonical equivalence, which would merge pieces Python keeps apart.
    private var cache: [[UInt8]: [Int32]] = [:]
    private static let cacheLimit = 1 << 18

    // MARK: - Construction

    /// The vocabulary shipped in the SDXL target: open_clip's `bpe_simple_vocab_16e6.txt` merges (MIT, see
    /// Resources/LICENSE-open_clip.txt), the vocabulary CLIP builds from them.
    public static func bundled(padding: Padding) throws -> CLIPTokenizer {
        guard let url = Bundle.module.url(forResource: "clip_bpe_merges", withExtension: "txt") else {
            throw TokenizerError(file: "clip_bpe_merges.txt", reason: "resource missing from the SDXL bundle")
        }
        let text = try readText(url)
        let mergeLines = text.split(separator: "\n", omittingEmptySubsequences: true)
        // CLIP's vocabulary (open_clip SimpleTokenizer / transformers' vocab.json order): 256 byte symbols,
        // the same + "</w>", one token per merge, then the two specials.
        var vocab: [String: Int] = [:]
        vocab.reserveCapacity(49_408)
        let symbols = byteSymbolsInVocabOrder()
        for s in symbols { vocab[s] = vocab.count }
        for s in symbols { vocab[s + "</w>"] = vocab.count }
        for (number, line) in mergeLines.enumerated() {
            let parts = line.split(separator: " ")
            let merged = String(parts.joined())
            guard parts.count == 2, vocab[merged] == nil else {
                throw TokenizerError(file: url.lastPathComponent, reason: "line \(number + 1) is not a new merge `a b`: \(line)")
            }
            vocab[merged] = vocab.count
        }
        vocab["<|startoftext|>"] = vocab.count
        vocab["<|endoftext|>"] = vocab.count
        return try CLIPTokenizer(vocab: vocab, mergeLines: mergeLines, padding: padding,
                                 vocabName: "bundled vocabulary", mergesName: url.lastPathComponent)
    }

    /// A Hugging Face CLIP tokenizer's files (`vocab.json`, `merges.txt` with its `#version` header line).
    public convenience init(vocabJSON: URL, merges: URL, padding: Padding) throws {
        let vocabData: Data
        do { vocabData = try Data(contentsOf: vocabJSON) } catch {
            throw TokenizerError(file: vocabJSON.path, reason: "cannot read: \(error.localizedDescription)")
        }
        guard let object = try? JSONSerialization.jsonObject(with: vocabData),
              let dictionary = object as? [String: Any] else {
            throw TokenizerError(file: vocabJSON.path, reason: "not a JSON object of token → id")
        }
        var vocab: [String: Int] = [:]
        vocab.reserveCapacity(dictionary.count)
        for (token, value) in dictionary {
            guard let number = value as? NSNumber else {
                throw TokenizerError(file: vocabJSON.path, reason: "id of \(token.debugDescription) is not a number")
            }
            vocab[token] = number.intValue
        }
        let text = try Self.readText(merges)
        // transformers CLIPTokenizer.__init__: merges.read().strip().split("\n")[1 : 49152 - 256 - 2 + 1]
        // — the first line is the "#version: 0.2" header, at most 48,894 merges are used.
        let lines = text.trimmingCharacters(in: .whitespacesAndNewlines)
            .split(separator: "\n", omittingEmptySubsequences: false)
        guard let header = lines.first, header.hasPrefix("#version") else {
            throw TokenizerError(file: merges.path, reason: "not a BPE merges file (first line must be `#version: …`)")
        }
        let mergeLines = Array(lines.dropFirst().prefix(49_152 - 256 - 2))
        try self.init(vocab: vocab, mergeLines: mergeLines, padding: padding,
                      vocabName: vocabJSON.path, mergesName: merges.path)
    }

    /// A folder holding `vocab.json` and `merges.txt` (a diffusers `tokenizer` / `tokenizer_2` folder).
    public convenience init(tokenizerFolder: URL, padding: Padding) throws {
        let vocab = tokenizerFolder.appendingPathComponent("vocab.json")
        let merges = tokenizerFolder.appendingPathComponent("merges.txt")
        for file in [vocab, merges] where !FileManager.default.fileExists(atPath: file.path) {
            throw TokenizerError(file: file.path, reason: "missing (a CLIP tokenizer folder holds vocab.json and merges.txt)")
        }
        try self.init(vocabJSON: vocab, merges: merges, padding: padding)
    }

    private init<Line: StringProtocol>(vocab: [String: Int], mergeLines: [Line], padding: Padding,
                                       vocabName: String, mergesName: String) throws {
        func id(_ token: String, _ why: String) throws -> Int {
            guard let id = vocab[token] else {
                throw TokenizerError(file: vocabName, reason: "has no token \(token.debugDescription) (\(why))")
            }
            return id
        }
        let bytesToSymbol = Self.bytesToUnicode()
        var byteID = [Int32](repeating: 0, count: 256), byteEndID = [Int32](repeating: 0, count: 256)
        for b in 0..<256 {
            byteID[b] = Int32(try id(bytesToSymbol[b], "byte symbol of byte \(b)"))
            byteEndID[b] = Int32(try id(bytesToSymbol[b] + "</w>", "byte symbol of byte \(b) + </w>"))
        }
        var merges: [UInt64: UInt64] = [:]
        merges.reserveCapacity(mergeLines.count)
        for (rank, line) in mergeLines.enumerated() {
            // Python: tuple(merge.split()) — whitespace-separated pair.
            let parts = line.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\r" })
            guard parts.count == 2 else {
                throw TokenizerError(file: mergesName, reason: "merge \(rank + 1) is not a pair `a b`: \(String(line).debugDescription)")
            }
            let left = String(parts[0]), right = String(parts[1])
            let why = "needed by merge \(rank + 1) of \(mergesName)"
            let key = UInt64(try id(left, why)) << 32 | UInt64(try id(right, why))
            // dict(zip(merges, ranks)): a repeated pair keeps its last rank.
            merges[key] = UInt64(rank) << 32 | UInt64(try id(left + right, why))
        }
        self.padding = padding
        self.bosID = try id("<|startoftext|>", "BOS")
        self.eosID = try id("<|endoftext|>", "EOS")
        self.byteSymbolID = byteID
        self.byteSymbolEndID = byteEndID
        self.merges = merges
        self.vocabularySize = vocab.count
        var specials: [(scalars: [Unicode.Scalar], id: Int)] = [
            (Array("<|startoftext|>".unicodeScalars), bosID), (Array("<|endoftext|>".unicodeScalars), eosID),
        ]
        switch padding {
        case .endOfText:
            padID = eosID
        case .zero:
            // kohya: pad_token_id = 0; in laion's tokenizer that token ("!") is an added special token.
            padID = 0
            guard let padToken = vocab.first(where: { $0.value == 0 })?.key else {
                throw TokenizerError(file: vocabName, reason: "has no token with id 0 (the encoder-2 pad token)")
            }
            specials.append((Array(padToken.unicodeScalars), 0))
        }
        specialTokens = specials
        // transformers: self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        // — a pre-token equal to a special token's text (e.g. from `<|ENDOFTEXT|>` after lower-casing) is that id.
        cache[Array("<|startoftext|>".utf8)] = [Int32(bosID)]
        cache[Array("<|endoftext|>".utf8)] = [Int32(eosID)]
    }

    private static func readText(_ url: URL) throws -> String {
        let data: Data
        do { data = try Data(contentsOf: url) } catch {
            throw TokenizerError(file: url.path, reason: "cannot read: \(error.localizedDescription)")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw TokenizerError(file: url.path, reason: "not UTF-8 text")
        }
        return text
    }

    /// CLIP's `bytes_to_unicode()`: byte → a printable character, so BPE never sees whitespace/control bytes.
    /// The printable Latin-1 bytes map to themselves, the other 68 to U+0100 + n in byte order.
    static func bytesToUnicode() -> [String] {
        var table = [String](repeating: "", count: 256)
        var n = 0
        for b in 0..<256 {
            let printable = (33...126).contains(b) || (161...172).contains(b) || (174...255).contains(b)
            let scalar = printable ? b : 256 + n
            if !printable { n += 1 }
            table[b] = String(Character(Unicode.Scalar(UInt32(scalar))!))
        }
        return table
    }

    /// The byte symbols in vocabulary order: the printable bytes first (in byte order), then the others.
    static func byteSymbolsInVocabOrder() -> [String] {
        let table = bytesToUnicode()
        let printable = (0..<256).filter { (33...126).contains($0) || (161...172).contains($0) || (174...255).contains($0) }
        let others = (0..<256).filter { !printable.contains($0) }
        return (printable + others).map { table[$0] }
    }

    // MARK: - Encoding

    /// BPE ids of `text`, without BOS/EOS and untruncated (transformers `encode(text, add_special_tokens=False)`).
    public func encode(_ text: String) -> [Int] {
        var ids: [Int] = []
        let scalars = Array(text.unicodeScalars)
        // transformers Trie.split: special tokens are cut out of the raw text, the rest tokenised piecewise.
        var start = 0, i = 0
        while i < scalars.count {
            if let special = specialTokens.first(where: { Self.hasPrefix(scalars, at: i, $0.scalars) }) {
                if i > start { encodePiece(scalars[start..<i], into: &ids) }
                ids.append(special.id)
                i += special.scalars.count
                start = i
            } else {
                i += 1
            }
        }
        if start < scalars.count { encodePiece(scalars[start...], into: &ids) }
        return ids
    }

    /// transformers `__call__(text, padding="max_length", truncation=True, max_length=maxLength)`.input_ids:
    /// BOS + the first maxLength − 2 ids + EOS, padded to maxLength with the pad id.
    public func callAsFunction(_ text: String, maxLength: Int = CLIPTokenizer.modelMaxLength) -> [Int] {
        precondition(maxLength >= 2, "maxLength must leave room for BOS and EOS")
        let ids = encode(text).prefix(maxLength - 2)
        var out = [bosID] + ids + [eosID]
        out += [Int](repeating: padID, count: maxLength - out.count)
        return out
    }

    /// kohya's chunking for max_token_length 75 (one chunk), 150 (two) or 225 (three): n chunks of 77 ids.
    ///
    /// kohya-ss/sd-scripts library/train_util.py `BaseDataset.get_input_ids` (= strategy_base.py
    /// `TokenizeStrategy._get_input_ids`): tokenise to tokenizer_max_length = maxTokenLength + 2, then cut
    /// `input_ids[i : i + 75]` for i in range(1, L − 77 + 2, 75), each framed as BOS + window + input_ids[-1].
    /// With pad ≠ EOS (encoder 2) a window ending in a token gets EOS as its last id, and a window starting
    /// with padding gets EOS as its first token.
    public func chunks(_ text: String, maxTokenLength: Int) -> [[Int]] {
        let model = Self.modelMaxLength
        let window = model - 2                                       // 75
        precondition(maxTokenLength > 0 && maxTokenLength % window == 0,
                     "kohya's max_token_length is 75, 150 or 225")
        return chunks(ids: self(text, maxLength: maxTokenLength + 2))
    }

    /// The chunking of `chunks(_:maxTokenLength:)` on already padded ids (BOS, up to 75n tokens, EOS, padding: 75n + 2
    /// ids), e.g. those of a weighted prompt.
    public func chunks(ids inputIDs: [Int]) -> [[Int]] {
        let model = Self.modelMaxLength
        let window = model - 2
        let tokenizerMaxLength = inputIDs.count
        precondition(tokenizerMaxLength >= model && (tokenizerMaxLength - 2) % window == 0, "chunks: 75n + 2 ids, got \(tokenizerMaxLength)")
        guard tokenizerMaxLength > model else { return [inputIDs] }  // max_token_length 75: one [77] row
        var result: [[Int]] = []
        for i in stride(from: 1, to: tokenizerMaxLength - model + 2, by: window) {
            var chunk = [inputIDs[0]] + inputIDs[i..<(i + window)] + [inputIDs[inputIDs.count - 1]]
            if padID != eosID {
                // "末尾が x <PAD/EOS> の場合は末尾を <EOS> に変える"
                if chunk[model - 2] != eosID && chunk[model - 2] != padID { chunk[model - 1] = eosID }
                // "先頭が <BOS> <PAD> ... の場合は <BOS> <EOS> <PAD> ... に変える"
                if chunk[1] == padID { chunk[1] = eosID }
            }
            result.append(chunk)
        }
        return result
    }

    // MARK: - Internals

    private static func hasPrefix(_ s: [Unicode.Scalar], at i: Int, _ p: [Unicode.Scalar]) -> Bool {
        guard i + p.count <= s.count else { return false }
        for k in 0..<p.count where s[i + k] != p[k] { return false }
        return true
    }

    /// transformers `CLIPTokenizer._tokenize` on one piece between special tokens.
    private func encodePiece(_ raw: ArraySlice<Unicode.Scalar>, into ids: inout [Int]) {
        let text = Self.lowercased(Self.whitespaceClean(FTFY.fixText(Array(raw))))
        // CLIP's pattern (re.IGNORECASE):
        //   <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
        // The alternatives are tried in order at each position, as `regex.findall` does; whitespace matches none,
        // and neither does U+0345 (COMBINING GREEK YPOGEGRAMMENI): not a letter, and under IGNORECASE outside
        // `[^\s\p{L}\p{N}]` too, since it case-folds to ι — the regex module drops it (checked over all scalars).
        // Case-insensitivity matters nowhere else on lower-cased text except `ſ` (long s), which folds to `s`.
        var i = 0
        let n = text.count
        while i < n {
            let c = text[i]
            var end = i
            if c == "<", let special = Self.specialPatterns.first(where: { Self.hasPrefixIgnoringCase(text, at: i, $0) }) {
                end = i + special.count
            } else if c == "'", let length = Self.contractionLength(text, at: i) {
                end = i + length
            } else if Self.isLetter(c) {
                end = i + 1
                while end < n && Self.isLetter(text[end]) { end += 1 }
            } else if Self.isNumber(c) {
                end = i + 1
            } else if Self.isOther(c) {
                end = i + 1
                while end < n && Self.isOther(text[end]) { end += 1 }
            } else {
                i += 1
                continue
            }
            var utf8: [UInt8] = []
            for scalar in text[i..<end] { utf8.append(contentsOf: UTF8.encode(scalar)!) }
            for id in bpe(utf8) { ids.append(Int(id)) }
            i = end
        }
    }

    /// `[^\s\p{L}\p{N}]` under IGNORECASE.
    private static func isOther(_ c: Unicode.Scalar) -> Bool {
        !c.properties.isWhitespace && !isLetter(c) && !isNumber(c) && c != "\u{345}"
    }

    /// Prefix match of a lower-case ASCII pattern, with `ſ` matching `s` (regex IGNORECASE on lower-cased text).
    private static func hasPrefixIgnoringCase(_ s: [Unicode.Scalar], at i: Int, _ p: [Unicode.Scalar]) -> Bool {
        guard i + p.count <= s.count else { return false }
        for k in 0..<p.count where s[i + k] != p[k] && !(p[k] == "s" && s[i + k] == "\u{17F}") { return false }
        return true
    }

    private static let specialPatterns = [Array("<|startoftext|>".unicodeScalars), Array("<|endoftext|>".unicodeScalars)]

    /// Length of `'s|'t|'re|'ve|'m|'ll|'d` at i (case-insensitive: after lower-casing only the long s `ſ`,
    /// whose simple case folding is `s`, still differs).
    private static func contractionLength(_ t: [Unicode.Scalar], at i: Int) -> Int? {
        func at(_ k: Int) -> Unicode.Scalar? { i + k < t.count ? t[i + k] : nil }
        switch at(1) {
        case "s", "\u{17F}", "t", "m", "d": return 2
        case "r" where at(2) == "e", "v" where at(2) == "e", "l" where at(2) == "l": return 3
        default: return nil
        }
    }

    static func isLetter(_ c: Unicode.Scalar) -> Bool {
        if c.isASCII { return (c >= "a" && c <= "z") || (c >= "A" && c <= "Z") }
        switch c.properties.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: return true
        default: return false
        }
    }

    static func isNumber(_ c: Unicode.Scalar) -> Bool {
        if c.isASCII { return c >= "0" && c <= "9" }
        switch c.properties.generalCategory {
        case .decimalNumber, .letterNumber, .otherNumber: return true
        default: return false
        }
    }

    /// transformers `whitespace_clean`: `regex.sub(r"\s+", " ", text).strip()` (`\s` = Unicode White_Space).
    static func whitespaceClean(_ text: [Unicode.Scalar]) -> [Unicode.Scalar] {
        var out: [Unicode.Scalar] = []
        out.reserveCapacity(text.count)
        var pendingSpace = false
        for c in text {
            if c.properties.isWhitespace {
                pendingSpace = true
            } else {
                if pendingSpace && !out.isEmpty { out.append(" ") }
                pendingSpace = false
                out.append(c)
            }
        }
        return out
    }

    /// Python's `str.lower()`: full lower-case mapping of each scalar, with Final_Sigma for U+03A3 — `ς` when
    /// preceded by a cased letter and not followed by one (case-ignorable scalars skipped both ways).
    static func lowercased(_ text: [Unicode.Scalar]) -> [Unicode.Scalar] {
        var out: [Unicode.Scalar] = []
        out.reserveCapacity(text.count)
        for (i, c) in text.enumerated() {
            if c.isASCII {
                out.append(c >= "A" && c <= "Z" ? Unicode.Scalar(c.value + 32)! : c)
            } else if c == "\u{3A3}" {
                out.append(isFinalSigma(text, i) ? "\u{3C2}" : "\u{3C3}")
            } else if c.properties.changesWhenLowercased {
                out.append(contentsOf: c.properties.lowercaseMapping.unicodeScalars)
            } else {
                out.append(c)
            }
        }
        return out
    }

    /// CPython unicodeobject.c `handle_capital_sigma`.
    private static func isFinalSigma(_ t: [Unicode.Scalar], _ i: Int) -> Bool {
        var j = i - 1
        while j >= 0 && t[j].properties.isCaseIgnorable { j -= 1 }
        guard j >= 0 && t[j].properties.isCased else { return false }
        j = i + 1
        while j < t.count && t[j].properties.isCaseIgnorable { j += 1 }
        return j == t.count || !t[j].properties.isCased
    }

    /// transformers `CLIPTokenizer.bpe` on the UTF-8 bytes of one pre-token, as vocabulary ids (cached).
    private func bpe(_ utf8: [UInt8]) -> [Int32] {
        cacheLock.lock()
        let cached = cache[utf8]
        cacheLock.unlock()
        if let cached { return cached }

        // word = tuple(token[:-1]) + (token[-1] + "</w>",)
        var word = utf8.indices.map { $0 == utf8.count - 1 ? byteSymbolEndID[Int(utf8[$0])] : byteSymbolID[Int(utf8[$0])] }
        while word.count > 1 {
            // bigram = min(pairs, key=rank); stop when no pair is a merge.
            var best = UInt64.max, bestAt = 0
            for k in 0..<(word.count - 1) {
                if let merge = merges[UInt64(UInt32(word[k])) << 32 | UInt64(UInt32(word[k + 1]))], merge < best {
                    best = merge
                    bestAt = k
                }
            }
            if best == .max { break }
            let merged = Int32(truncatingIfNeeded: best & 0xFFFF_FFFF)
            let first = word[bestAt], second = word[bestAt + 1]
            // Merge every non-overlapping occurrence of the pair, left to right.
            var next: [Int32] = []
            next.reserveCapacity(word.count)
            var k = 0
            while k < word.count {
                if k < word.count - 1 && word[k] == first && word[k + 1] == second {
                    next.append(merged)
                    k += 2
                } else {
                    next.append(word[k])
                    k += 1
                }
            }
            word = next
        }

        cacheLock.lock()
        if cache.count >= Self.cacheLimit { cache.removeAll(keepingCapacity: true) }
        cache[utf8] = word
        cacheLock.unlock()
        return word
    }
}

/// The parts of ftfy 6.3 `fix_text` (with its default `TextFixerConfig`, as transformers' CLIPTokenizer calls
/// it) that can change a caption, in ftfy's order:
///
/// `fix_text` cuts the text after each "\n" and runs `fix_and_explain` on each segment; `unescape_html="auto"`
/// is switched off for that segment and all later ones once a segment contains "<". `fix_and_explain` repeats,
/// until nothing changes: unescape_html, [fix_encoding], fix_c1_controls, fix_latin_ligatures,
/// fix_character_width, uncurl_quotes, fix_line_breaks, [fix_surrogates], remove_terminal_escapes,
/// remove_control_chars, NFC normalisation.
///
/// Not implemented:
/// - `fix_encoding` (mojibake repair: re-decoding text that was UTF-8 read as Latin-1/Windows-1252/MacRoman…,
///   with restore_byte_a0, replace_lossy_sequences, decode_inconsistent_utf8). It only acts when ftfy's
///   `badness.is_bad` heuristic — a large hand-tuned table of suspicious character sequences — flags the text,
///   which well-formed captions never trigger; porting that heuristic and the legacy codecs is out of proportion
///   to captions that are already broken. Its C1-control case is covered by fix_c1_controls, which ftfy also
///   runs on its own.
/// - `fix_surrogates`: a Swift String cannot hold lone or paired UTF-16 surrogates (they are decoded on input).
///   (Checked against transformers 4.54.1 on 3,000 random strings built from caption-like, HTML, control,
///   width, ligature, case and combining-mark fragments: ids differ only where ftfy's fix_encoding acts.)
/// - NFC uses Foundation's normaliser; lower-casing (in CLIPTokenizer) uses Swift's Unicode tables: both may
///   differ from Python 3.11's Unicode 14 only on characters assigned since then.
enum FTFY {
    static func fixText(_ text: [Unicode.Scalar]) -> [Unicode.Scalar] {
        var out: [Unicode.Scalar] = []
        out.reserveCapacity(text.count)
        var unescapeHTML = true                 // "auto", until a segment containing "<"
        var start = 0
        while start < text.count {
            // textbreak = text.find("\n", pos) + 1 (the "\n" stays in its segment), at most max_decode_length.
            var end = text[start...].firstIndex(of: "\n").map { $0 + 1 } ?? text.count
            if end - start > 1_000_000 { end = start + 1_000_000 }
            let segment = Array(text[start..<end])
            if unescapeHTML && segment.contains("<") { unescapeHTML = false }
            out += fixSegment(segment, unescapeHTML: unescapeHTML)
            start = end
        }
        return out
    }

    /// ftfy `fix_and_explain` with the default config, minus the steps listed on `FTFY`.
    static func fixSegment(_ segment: [Unicode.Scalar], unescapeHTML: Bool) -> [Unicode.Scalar] {
        var text = segment
        while true {
            let original = text
            if unescapeHTML { text = unescapeEntities(text) }
            text = fixC1Controls(text)
            text = fixLatinLigatures(text)
            text = fixCharacterWidth(text)
            text = uncurlQuotes(text)
            text = fixLineBreaks(text)
            text = removeTerminalEscapes(text)
            text = removeControlChars(text)
            text = nfc(text)
            if text == original { return text }
        }
    }

    // MARK: unescape_html

    /// ftfy `unescape_html`: each match of `&#?[0-9A-Za-z]{1,24};` is replaced by its entry in
    /// chardata.HTML_ENTITIES (HTML5 names, plus upper-cased forms), or — for `&#…;` — by what Python's
    /// `html.unescape` makes of it when that consumes the ";"; anything else stays.
    static func unescapeEntities(_ t: [Unicode.Scalar]) -> [Unicode.Scalar] {
        guard t.contains("&") else { return t }
        var out: [Unicode.Scalar] = []
        out.reserveCapacity(t.count)
        var i = 0
        while i < t.count {
            if t[i] == "&", let (length, replacement) = matchEntity(t, at: i) {
                out += replacement
                i += length
            } else {
                out.append(t[i])
                i += 1
            }
        }
        return out
    }

    private static func isAlnum(_ c: Unicode.Scalar) -> Bool {
        (c >= "0" && c <= "9") || (c >= "a" && c <= "z") || (c >= "A" && c <= "Z")
    }

    /// (match length, replacement) for a match of HTML_ENTITY_RE at i.
    private static func matchEntity(_ t: [Unicode.Scalar], at i: Int) -> (Int, [Unicode.Scalar])? {
        var j = i + 1
        let numeric = j < t.count && t[j] == "#"
        if numeric { j += 1 }
        let bodyStart = j
        while j < t.count && isAlnum(t[j]) { j += 1 }
        let bodyLength = j - bodyStart
        guard bodyLength >= 1 && bodyLength <= 24 && j < t.count && t[j] == ";" else { return nil }
        let length = j + 1 - i
        let body = String(String.UnicodeScalarView(t[bodyStart..<j]))
        let matched = Array(t[i..<(j + 1)])
        if !numeric {
            return (length, htmlEntities[body] ?? matched)
        }
        // html.unescape on "&#<body>;": a decimal or hex character reference only if it spans the whole body
        // (else the ";" survives and ftfy keeps the original text).
        var value: UInt64?
        if body.allSatisfy(\.isASCIIDigit) {
            value = UInt64(body) ?? .max
        } else if body.first == "x" || body.first == "X", body.count > 1, body.dropFirst().allSatisfy(\.isHexDigit) {
            value = UInt64(body.dropFirst(), radix: 16) ?? .max
        }
        guard let value else { return (length, matched) }
        let replacement = charrefReplacement(value)
        return (length, replacement.contains(";") ? matched : replacement)
    }

    /// Python html `_replace_charref` for a numeric reference.
    private static func charrefReplacement(_ n: UInt64) -> [Unicode.Scalar] {
        if n == 0 { return ["\u{FFFD}"] }
        if n == 0x0D { return ["\r"] }
        if (0x80...0x9F).contains(n) { return [windows1252[Int(n) - 0x80]] }
        if (0xD800...0xDFFF).contains(n) || n > 0x10FFFF { return ["\u{FFFD}"] }
        let invalid = (0x1...0x8).contains(n) || n == 0xB || (0xE...0x1F).contains(n) || (0x7F...0x9F).contains(n)
            || (0xFDD0...0xFDEF).contains(n) || (n & 0xFFFE) == 0xFFFE
        return invalid ? [] : [Unicode.Scalar(UInt32(n))!]
    }

    /// chardata.HTML_ENTITIES keyed by the name between "&" and ";".
    static let htmlEntities: [String: [Unicode.Scalar]] = {
        var table: [String: [Unicode.Scalar]] = [:]
        for line in TokenizerTextTables.htmlEntities.split(separator: "\n") {
            let fields = line.split(separator: " ")
            table[String(fields[0])] = fields.dropFirst().map { Unicode.Scalar(UInt32($0, radix: 16)!)! }
        }
        return table
    }()

    // MARK: fix_c1_controls

    /// Bytes 0x80–0x9F in ftfy's "sloppy-windows-1252": Windows-1252, with its five undefined bytes kept as
    /// the C1 code points.
    static let windows1252: [Unicode.Scalar] = [
        "\u{20AC}", "\u{81}", "\u{201A}", "\u{192}", "\u{201E}", "\u{2026}", "\u{2020}", "\u{2021}",
        "\u{2C6}", "\u{2030}", "\u{160}", "\u{2039}", "\u{152}", "\u{8D}", "\u{17D}", "\u{8F}",
        "\u{90}", "\u{2018}", "\u{2019}", "\u{201C}", "\u{201D}", "\u{2022}", "\u{2013}", "\u{2014}",
        "\u{2DC}", "\u{2122}", "\u{161}", "\u{203A}", "\u{153}", "\u{9D}", "\u{17E}", "\u{178}",
    ]

    /// ftfy `fix_c1_controls`: C1 controls U+0080–U+009F read as their Windows-1252 characters.
    static func fixC1Controls(_ t: [Unicode.Scalar]) -> [Unicode.Scalar] {
        t.map { (0x80...0x9F).contains($0.value) ? windows1252[Int($0.value) - 0x80] : $0 }
    }

    // MARK: fix_latin_ligatures, fix_character_width, uncurl_quotes, fix_line_breaks

    /// ftfy chardata.LIGATURES.
    static let ligatures: [Unicode.Scalar: String] = [
        "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
        "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
        "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
    ]

    static func fixLatinLigatures(_ t: [Unicode.Scalar]) -> [Unicode.Scalar] {
        guard t.contains(where: { ligatures[$0] != nil }) else { return t }
        return t.flatMap { c in ligatures[c].map { Array($0.unicodeScalars) } ?? [c] }
    }

    /// ftfy chardata.WIDTH_MAP: U+3000 → " ", and U+FF01…U+FFEF → their NFKC forms.
    static let widthMap: [UInt32: [Unicode.Scalar]] = {
        var table: [UInt32: [Unicode.Scalar]] = [:]
        for line in TokenizerTextTables.widthMap.split(separator: "\n") {
            let fields = line.split(separator: " ").map { UInt32($0, radix: 16)! }
            table[fields[0]] = fields.dropFirst().map { Unicode.Scalar($0)! }
        }
        return table
    }()

    static func fixCharacterWidth(_ t: [Unicode.Scalar]) -> [Unicode.Scalar] {
        guard t.contains(where: { $0.value == 0x3000 || (0xFF01...0xFFEF).contains($0.value) }) else { return t }
        return t.flatMap { c in widthMap[c.value] ?? [c] }
    }

    /// ftfy `uncurl_quotes`: [\u02bc\u2018-\u201b] → "'", [\u201c-\u201f] → '"'.
    static func uncurlQuotes(_ t: [Unicode.Scalar]) -> [Unicode.Scalar] {
        t.map { c in
            switch c.value {
            case 0x2BC, 0x2018...0x201B: return "'"
            case 0x201C...0x201F: return "\""
            default: return c
            }
        }
    }

    /// ftfy `fix_line_breaks`: "\r\n", "\r", U+2028, U+2029, U+0085 → "\n".
    static func fixLineBreaks(_ t: [Unicode.Scalar]) -> [Unicode.Scalar] {
        var out: [Unicode.Scalar] = []
        out.reserveCapacity(t.count)
        var i = 0
        while i < t.count {
            switch t[i].value {
            case 0x0D:
                out.append("\n")
                if i + 1 < t.count && t[i + 1] == "\n" { i += 1 }
            case 0x2028, 0x2029, 0x85: out.append("\n")
            default: out.append(t[i])
            }
            i += 1
        }
        return out
    }

    // MARK: remove_terminal_escapes, remove_control_chars, NFC

    /// ftfy `remove_terminal_escapes`: deletes `\x1b\[((?:\d|;)*)([a-zA-Z])` (`\d`: any Unicode decimal digit).
    static func removeTerminalEscapes(_ t: [Unicode.Scalar]) -> [Unicode.Scalar] {
        guard t.contains("\u{1B}") else { return t }
        var out: [Unicode.Scalar] = []
        var i = 0
        while i < t.count {
            if t[i] == "\u{1B}" && i + 1 < t.count && t[i + 1] == "[" {
                var j = i + 2
                while j < t.count && (t[j] == ";" || t[j].properties.generalCategory == .decimalNumber) { j += 1 }
                if j < t.count && t[j].isASCII && isAlnum(t[j]) && !(t[j] >= "0" && t[j] <= "9") {
                    i = j + 1
                    continue
                }
            }
            out.append(t[i])
            i += 1
        }
        return out
    }

    /// ftfy chardata.CONTROL_CHARS: U+0000–0008, 000B, 000E–001F, 007F, 206A–206F, FEFF, FFF9–FFFC.
    static func isRemovedControl(_ c: Unicode.Scalar) -> Bool {
        switch c.value {
        case 0x00...0x08, 0x0B, 0x0E...0x1F, 0x7F, 0x206A...0x206F, 0xFEFF, 0xFFF9...0xFFFC: return true
        default: return false
        }
    }

    static func removeControlChars(_ t: [Unicode.Scalar]) -> [Unicode.Scalar] {
        t.contains(where: isRemovedControl) ? t.filter { !isRemovedControl($0) } : t
    }

    /// unicodedata.normalize("NFC", …). Scalars below U+0300 are NFC-stable unless a combining mark follows,
    /// so all-below-U+0300 text (ASCII and Latin-1 captions) skips the normaliser.
    static func nfc(_ t: [Unicode.Scalar]) -> [Unicode.Scalar] {
        guard t.contains(where: { $0.value >= 0x300 }) else { return t }
        let string = String(String.UnicodeScalarView(t))
        return Array(string.precomposedStringWithCanonicalMapping.unicodeScalars)
    }
}

private extension Character {
    var isASCIIDigit: Bool { ("0"..."9").contains(self) }
}
