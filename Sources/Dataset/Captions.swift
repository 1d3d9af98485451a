import Base
import Foundation

/// Per-subset caption settings: kohya's subset keys (caption_prefix, caption_suffix, shuffle_caption,
/// keep_tokens, keep_tokens_separator, caption_separator, secondary_separator, enable_wildcard,
/// caption_dropout_rate, caption_tag_dropout_rate, caption_dropout_every_n_epochs) plus AI Toolkit's
/// trigger word. Decoding accepts any subset of the keys; missing ones take kohya's defaults.
public struct CaptionOptions: Codable, Equatable, Sendable {
    public var shuffle: Bool
    public var keepTokens: Int
    public var keepTokensSeparator: String
    /// kohya `caption_separator` (default ","): what tags are split on for shuffling/tag dropout.
    public var captionSeparator: String
    /// kohya `secondary_separator`: joins sub-tags that shuffle as one tag; replaced by `captionSeparator`
    /// after shuffling.
    public var secondarySeparator: String?
    /// kohya `enable_wildcard`: `{a|b|c}` picks one alternative; a multi-line caption picks one line.
    public var enableWildcard: Bool
    public var captionDropoutRate: Double
    public var tagDropoutRate: Double
    public var dropoutEveryNEpochs: Int
    public var prefix: String?
    public var suffix: String?
    /// AI Toolkit `trigger_word`: replaces `[trigger]` / `[name]`, and is put first when absent.
    public var trigger: String?

    public init(
        shuffle: Bool = false, keepTokens: Int = 0, keepTokensSeparator: String = "", captionSeparator: String = ",",
        secondarySeparator: String? = nil, enableWildcard: Bool = false, captionDropoutRate: Double = 0,
        tagDropoutRate: Double = 0, dropoutEveryNEpochs: Int = 0, prefix: String? = nil, suffix: String? = nil,
        trigger: String? = nil
    ) {
        self.shuffle = shuffle; self.keepTokens = keepTokens; self.keepTokensSeparator = keepTokensSeparator
        self.captionSeparator = captionSeparator; self.secondarySeparator = secondarySeparator
        self.enableWildcard = enableWildcard; self.captionDropoutRate = captionDropoutRate
        self.tagDropoutRate = tagDropoutRate; self.dropoutEveryNEpochs = dropoutEveryNEpochs
        self.prefix = prefix; self.suffix = suffix; self.trigger = trigger
    }

    enum CodingKeys: String, CodingKey {
        case shuffle, keepTokens, keepTokensSeparator, captionSeparator, secondarySeparator, enableWildcard,
            captionDropoutRate, tagDropoutRate, dropoutEveryNEpochs, prefix, suffix, trigger
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init()
        shuffle = try c.decodeIfPresent(Bool.self, forKey: .shuffle) ?? shuffle
        keepTokens = try c.decodeIfPresent(Int.self, forKey: .keepTokens) ?? keepTokens
        keepTokensSeparator = try c.decodeIfPresent(String.self, forKey: .keepTokensSeparator) ?? keepTokensSeparator
        captionSeparator = try c.decodeIfPresent(String.self, forKey: .captionSeparator) ?? captionSeparator
        secondarySeparator = try c.decodeIfPresent(String.self, forKey: .secondarySeparator)
        enableWildcard = try c.decodeIfPresent(Bool.self, forKey: .enableWildcard) ?? enableWildcard
        captionDropoutRate = try c.decodeIfPresent(Double.self, forKey: .captionDropoutRate) ?? captionDropoutRate
        tagDropoutRate = try c.decodeIfPresent(Double.self, forKey: .tagDropoutRate) ?? tagDropoutRate
        dropoutEveryNEpochs = try c.decodeIfPresent(Int.self, forKey: .dropoutEveryNEpochs) ?? dropoutEveryNEpochs
        prefix = try c.decodeIfPresent(String.self, forKey: .prefix)
        suffix = try c.decodeIfPresent(String.self, forKey: .suffix)
        trigger = try c.decodeIfPresent(String.self, forKey: .trigger)
    }
}

/// The randomness caption processing draws, shaped like the three calls kohya makes on Python's `random`
/// (`random()`, `shuffle` and `choice`, both of which CPython builds on `_randbelow`). Tests substitute a
/// scripted source so the whole function can be compared with kohya's on the same draws.
public protocol CaptionRandomSource {
    /// Uniform in [0, 1).
    mutating func random() -> Double
    /// Uniform in 0..<n, n > 0.
    mutating func below(_ n: Int) -> Int
}

extension CaptionRandomSource {
    /// CPython `Random.shuffle`: Fisher-Yates from the back, `j = _randbelow(i + 1)`.
    mutating func shuffle<T>(_ a: inout [T]) {
        guard a.count > 1 else { return }
        for i in stride(from: a.count - 1, through: 1, by: -1) {
            let j = below(i + 1)
            a.swapAt(i, j)
        }
    }
    /// CPython `Random.choice`: `seq[_randbelow(len(seq))]`.
    mutating func choice<T>(_ a: [T]) -> T { a[below(a.count)] }
}

/// Python's global `random` stream cannot be reproduced, so each (seed, epoch, image) gets its own SplitMix64:
/// the same triple always gives the same caption, on every rank, whatever order the images are visited in.
extension SplitMix64: CaptionRandomSource {
    /// Keyed by (seed, epoch, image id): each part goes through the SplitMix64 finaliser in turn, the id as
    /// its FNV-1a 64 hash of the UTF-8 bytes.
    public init(seed: UInt64, epoch: Int, imageID: String) {
        var s = SplitMix64.mix(seed &+ 0x9E37_79B9_7F4A_7C15)
        s = SplitMix64.mix(s ^ UInt64(bitPattern: Int64(epoch)))
        s = SplitMix64.mix(s ^ FNV1a64.hash(imageID))
        self.init(seed: s)
    }

    public mutating func random() -> Double { uniform() }
}

/// A caption file that cannot be used, as the shared `DatasetIssue` (file + reason). `DatasetIssue` is not an
/// `Error`, so it travels in a `Result` inside this wrapper.
public struct CaptionFileIssue: Error, Equatable, CustomStringConvertible, Sendable {
    public let issue: DatasetIssue
    public init(_ url: URL, _ reason: String) { issue = DatasetIssue(path: url.path, reason: reason) }
    public var description: String { issue.description }
}

public enum Captions {
    // MARK: Reading

    /// kohya `read_caption` (library/train_util.py, DreamBoothDataset): the file is read as UTF-8 text with
    /// universal newlines and the caption is `lines[0].strip()`. Non-UTF-8 (kohya raises) and an empty file
    /// (kohya asserts) become an issue, and so does a blank first line (kohya would train on ""): the caller
    /// then uses the class token, as kohya does for an image without a caption file. A UTF-8 byte-order mark
    /// is dropped (kohya would keep U+FEFF inside the caption, which no tokenizer wants).
    public static func firstLine(of url: URL) -> Result<String, CaptionFileIssue> {
        switch lines(of: url) {
        case .failure(let issue): return .failure(issue)
        case .success(let lines):
            let first = pyStrip(lines[0])
            if first.isEmpty { return .failure(CaptionFileIssue(url, "caption file's first line is empty")) }
            return .success(first)
        }
    }

    /// What `process` should get for a subset: the first line, or with `enableWildcard` every non-blank line
    /// stripped and joined by "\n" (kohya `read_caption` with enable_wildcard; one line is chosen per step).
    public static func read(_ url: URL, enableWildcard: Bool) -> Result<String, CaptionFileIssue> {
        guard enableWildcard else { return firstLine(of: url) }
        switch lines(of: url) {
        case .failure(let issue): return .failure(issue)
        case .success(let lines):
            let kept = lines.map(pyStrip).filter { !$0.isEmpty }
            if kept.isEmpty { return .failure(CaptionFileIssue(url, "caption file has only blank lines")) }
            return .success(kept.joined(separator: "\n"))
        }
    }

    /// Python text-mode `readlines()` (newline=None): "\r\n", "\r" and "\n" all end a line.
    static func lines(of url: URL) -> Result<[String], CaptionFileIssue> {
        let data: Data
        do { data = try Data(contentsOf: url) } catch {
            return .failure(CaptionFileIssue(url, "caption file unreadable: \(error.localizedDescription)"))
        }
        if data.isEmpty { return .failure(CaptionFileIssue(url, "caption file is empty")) }
        guard var text = String(data: data, encoding: .utf8) else {
            return .failure(CaptionFileIssue(url, "caption file is not UTF-8"))
        }
        if text.unicodeScalars.first == "\u{FEFF}" { text.unicodeScalars.removeFirst() }
        var out: [String] = []
        var cur = String.UnicodeScalarView()
        var prevCR = false
        for u in text.unicodeScalars {
            if u == "\n" && prevCR { prevCR = false; continue }
            prevCR = false
            if u == "\r" || u == "\n" {
                out.append(String(cur)); cur = String.UnicodeScalarView()
                prevCR = u == "\r"
            } else {
                cur.append(u)
            }
        }
        if !cur.isEmpty || out.isEmpty { out.append(String(cur)) }
        return .success(out)
    }

    // MARK: Processing

    /// The caption for one image at one epoch: kohya `BaseDataset.process_caption` (library/train_util.py)
    /// followed by AI Toolkit's trigger injection, with randomness from SplitMix64 keyed by
    /// (seed, epoch, image id). `epoch` is kohya's `current_epoch`, which counts from 1.
    public static func process(
        _ caption: String, options: CaptionOptions, seed: UInt64, epoch: Int, imageID: String
    ) -> String {
        var rng = SplitMix64(seed: seed, epoch: epoch, imageID: imageID)
        return process(caption, options: options, epoch: epoch, rng: &rng)
    }

    /// The same with a given random source. Order, as kohya: prefix/suffix; caption dropout (one draw, only
    /// when the rate is > 0; or every n-th epoch); wildcard / first line; tag split with keep tokens (or the
    /// keep-tokens separator); shuffle of the non-kept tags; tag dropout of the non-kept tags; join with ", ";
    /// secondary separator → caption separator. Then AI Toolkit `inject_trigger_into_prompt`
    /// (toolkit/prompt_utils.py), which it applies after its own shuffle/dropout and not to a dropped caption.
    /// kohya's token warm-up and textual-inversion replacements are not part of this.
    public static func process<R: CaptionRandomSource>(
        _ caption: String, options o: CaptionOptions, epoch: Int, rng: inout R
    ) -> String {
        var caption = caption
        if let p = o.prefix, !p.isEmpty { caption = p + " " + caption }
        if let s = o.suffix, !s.isEmpty { caption = caption + " " + s }

        var dropped = o.captionDropoutRate > 0 && rng.random() < o.captionDropoutRate
        // kohya: `is_drop_out or n > 0 and current_epoch % n == 0` (Python's `%` is non-negative for n > 0).
        dropped = dropped || (o.dropoutEveryNEpochs > 0 && pyMod(epoch, o.dropoutEveryNEpochs) == 0)
        if dropped { return "" }

        if o.enableWildcard {
            if pyContains(caption, "\n") { caption = rng.choice(pySplit(caption, "\n")) }
            caption = expandWildcards(caption, rng: &rng)
        } else {
            caption = pySplit(caption, "\n")[0]
        }

        // Python's str.split("") raises; an empty separator is read as kohya's default.
        let sep = o.captionSeparator.isEmpty ? "," : o.captionSeparator
        if o.shuffle || o.tagDropoutRate > 0 {
            var fixed: [String] = []
            var flex: [String] = []
            var fixedSuffix: [String] = []
            let kts = o.keepTokensSeparator
            if !kts.isEmpty && pyContains(caption, kts) {
                let parts = pySplit(caption, kts, maxSplit: 1)
                let fixedPart = parts[0]
                var flexPart = parts[1]
                if pyContains(flexPart, kts) {
                    let p2 = pySplit(flexPart, kts, maxSplit: 1)
                    flexPart = p2[0]
                    fixedSuffix = pySplit(p2[1], sep).map(pyStrip).filter { !$0.isEmpty }
                }
                fixed = pySplit(fixedPart, sep).map(pyStrip).filter { !$0.isEmpty }
                flex = pySplit(flexPart, sep).map(pyStrip).filter { !$0.isEmpty }
            } else {
                // kohya keeps empty tags here ("a,,b" → "a, , b").
                let tokens = pySplit(pyStrip(caption), sep).map(pyStrip)
                flex = tokens
                if o.keepTokens > 0 {
                    fixed = Array(tokens.prefix(o.keepTokens))
                    flex = Array(tokens.dropFirst(o.keepTokens))
                }
            }
            if o.shuffle { rng.shuffle(&flex) }
            if o.tagDropoutRate > 0 {
                // kohya dropout_tags: keep when random() >= rate.
                flex = flex.filter { _ in rng.random() >= o.tagDropoutRate }
            }
            caption = (fixed + flex + fixedSuffix).joined(separator: ", ")
        }

        if let s2 = o.secondarySeparator, !s2.isEmpty { caption = pyReplace(caption, s2, sep) }

        if let t = o.trigger { caption = injectTrigger(caption, trigger: t) }
        return caption
    }

    /// AI Toolkit `inject_trigger_into_prompt` with its default placeholders: "[name]" and "[trigger]" become
    /// the trigger; a trigger (not blank) found nowhere in the caption is put first, followed by one space.
    public static func injectTrigger(_ caption: String, trigger: String) -> String {
        var out = caption
        for placeholder in ["[name]", "[trigger]"] { out = pyReplace(out, placeholder, trigger) }
        if !pyStrip(trigger).isEmpty && !pyContains(out, trigger) { out = trigger + " " + out }
        return out
    }

    /// kohya `enable_wildcard`: "{{" / "}}" escape literal braces; each `\{([^}]+)\}` match becomes
    /// `random.choice(group.split("|"))`, left to right.
    static func expandWildcards<R: CaptionRandomSource>(_ caption: String, rng: inout R) -> String {
        var r1 = "⦅", r2 = "⦆"
        while pyContains(caption, r1) || pyContains(caption, r2) { r1 += "⦅"; r2 += "⦆" }
        let escaped = pyReplace(pyReplace(caption, "{{", r1), "}}", r2)
        let s = Array(escaped.unicodeScalars)
        var out = String.UnicodeScalarView()
        var i = 0
        while i < s.count {
            if s[i] == "{", let close = s[(i + 1)...].firstIndex(of: "}"), close > i + 1 {
                let group = string(s[(i + 1)..<close])
                out.append(contentsOf: rng.choice(pySplit(group, "|")).unicodeScalars)
                i = close + 1
            } else {
                out.append(s[i]); i += 1
            }
        }
        return pyReplace(pyReplace(String(out), r1, "{"), r2, "}")
    }

    // MARK: Tag frequency

    /// kohya `BaseDataset.set_tag_frequency`: every caption split on ",", each piece stripped, blank pieces
    /// skipped, the rest lower-cased and counted. kohya counts the captions as read (before prefix, shuffle
    /// or trigger) and per image folder; the caller passes one folder's captions.
    public static func tagFrequency(_ captions: [String]) -> [String: Int] {
        var freq: [String: Int] = [:]
        for caption in captions {
            for piece in pySplit(caption, ",") {
                let tag = pyStrip(piece)
                if !tag.isEmpty { freq[tag.lowercased(), default: 0] += 1 }
            }
        }
        return freq
    }

    // MARK: Python string semantics
    // Swift's String compares grapheme clusters; Python's str works on code points. These work on Unicode
    // scalars so that splitting, replacing and stripping give exactly what kohya's Python gives.

    /// Python `str.isspace()` characters (what `str.strip()` removes): Unicode White_Space plus U+001C-001F.
    static func isPySpace(_ u: Unicode.Scalar) -> Bool {
        switch u.value {
        case 0x09...0x0D, 0x1C...0x20, 0x85, 0xA0, 0x1680, 0x2000...0x200A, 0x2028, 0x2029, 0x202F, 0x205F, 0x3000:
            return true
        default: return false
        }
    }

    static func pyStrip(_ s: String) -> String {
        let a = Array(s.unicodeScalars)
        var lo = 0, hi = a.count
        while lo < hi && isPySpace(a[lo]) { lo += 1 }
        while hi > lo && isPySpace(a[hi - 1]) { hi -= 1 }
        return string(a[lo..<hi])
    }

    static func string(_ a: ArraySlice<Unicode.Scalar>) -> String {
        var v = String.UnicodeScalarView()
        v.append(contentsOf: a)
        return String(v)
    }

    /// Start offsets of non-overlapping occurrences, left to right (Python's find/replace/split rule).
    static func occurrences(_ s: [Unicode.Scalar], _ sep: [Unicode.Scalar], limit: Int = .max) -> [Int] {
        precondition(!sep.isEmpty)
        var found: [Int] = []
        var i = 0
        while i + sep.count <= s.count && found.count < limit {
            if s[i] == sep[0] && Array(s[i..<(i + sep.count)]) == sep { found.append(i); i += sep.count } else { i += 1 }
        }
        return found
    }

    /// Python `s.split(sep, maxsplit)` for a non-empty `sep`.
    static func pySplit(_ s: String, _ sep: String, maxSplit: Int = .max) -> [String] {
        let a = Array(s.unicodeScalars), b = Array(sep.unicodeScalars)
        var parts: [String] = []
        var start = 0
        for at in occurrences(a, b, limit: maxSplit) {
            parts.append(string(a[start..<at])); start = at + b.count
        }
        parts.append(string(a[start...]))
        return parts
    }

    static func pyReplace(_ s: String, _ old: String, _ new: String) -> String {
        guard !old.isEmpty else { return s }
        return pySplit(s, old).joined(separator: new)
    }

    static func pyContains(_ s: String, _ sub: String) -> Bool {
        if sub.isEmpty { return true }
        return !occurrences(Array(s.unicodeScalars), Array(sub.unicodeScalars), limit: 1).isEmpty
    }

    static func pyMod(_ a: Int, _ n: Int) -> Int { let r = a % n; return r < 0 ? r + n : r }
}
