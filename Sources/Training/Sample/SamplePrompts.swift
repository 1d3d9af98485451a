import Foundation
import TOMLKit

/// One entry of kohya's sample-prompts file (`--sample_prompts`): the keys of kohya's prompt dict, each nil when the
/// entry does not set it (the run's defaults then apply).
public struct SamplePrompt: Equatable, Sendable {
    public var prompt: String
    public var negativePrompt: String?
    public var width: Int?
    public var height: Int?
    public var seed: UInt64?
    public var steps: Int?
    public var scale: Float?
    public var sampler: String?
    /// `--cn` / controlnet_image: kept so it can be refused by name (no ControlNet in lora-dist).
    public var controlnetImage: String?
    /// kohya's "enum": the entry's position in the file, used in image file names.
    public var index: Int

    public init(prompt: String, negativePrompt: String? = nil, width: Int? = nil, height: Int? = nil, seed: UInt64? = nil,
                steps: Int? = nil, scale: Float? = nil, sampler: String? = nil, controlnetImage: String? = nil, index: Int = 0) {
        self.prompt = prompt
        self.negativePrompt = negativePrompt
        self.width = width
        self.height = height
        self.seed = seed
        self.steps = steps
        self.scale = scale
        self.sampler = sampler
        self.controlnetImage = controlnetImage
        self.index = index
    }

    /// kohya's `line_to_prompt_dict` (library/train_util.py): the line split on " --"; the first piece is the prompt;
    /// every piece (the prompt too, as kohya does) is tried against `w N`, `h N`, `d N` (seed), `s N` (steps, clamped
    /// to 1…1000), `l X` (CFG scale), `n TEXT` (negative prompt), `ss NAME` (sampler), `cn PATH` — case-insensitive
    /// prefixes (re.match); a piece that matches none is ignored, and a number that does not parse is skipped.
    public static func parseLine(_ line: String, index: Int = 0) -> SamplePrompt {
        let pieces = line.components(separatedBy: " --")
        var p = SamplePrompt(prompt: pieces[0], index: index)
        for piece in pieces {
            // The leading run of characters a regex `\d+` / `[\d\.]+` takes (re.match: no anchor at the end).
            func value(after prefix: String) -> Substring? {
                guard piece.count > prefix.count, piece.prefix(prefix.count).lowercased() == prefix else { return nil }
                return piece.dropFirst(prefix.count)
            }
            func digits(_ s: Substring) -> String? {
                let d = s.prefix { $0.isASCII && $0.isNumber }
                return d.isEmpty ? nil : String(d)
            }
            if let v = value(after: "w "), let d = digits(v) { p.width = Int(d); continue }
            if let v = value(after: "h "), let d = digits(v) { p.height = Int(d); continue }
            if let v = value(after: "d "), let d = digits(v) { p.seed = UInt64(d); continue }
            if let v = value(after: "s "), let d = digits(v) { p.steps = Int(d).map { max(1, min(1000, $0)) } ?? 1000; continue }
            if let v = value(after: "l ") {
                let n = v.prefix { ($0.isASCII && $0.isNumber) || $0 == "." }
                if !n.isEmpty {
                    if let f = Float(n) { p.scale = f }   // kohya: float("1.2.3") raises ValueError, logged, skipped
                    continue
                }
            }
            // `(.+)`: the rest of the piece (`.` stops at a newline, which stripped lines do not have).
            if let v = value(after: "n "), let t = v.split(separator: "\n", omittingEmptySubsequences: false).first, !t.isEmpty { p.negativePrompt = String(t); continue }
            if let v = value(after: "ss "), let t = v.split(separator: "\n", omittingEmptySubsequences: false).first, !t.isEmpty { p.sampler = String(t); continue }
            if let v = value(after: "cn "), let t = v.split(separator: "\n", omittingEmptySubsequences: false).first, !t.isEmpty { p.controlnetImage = String(t); continue }
        }
        return p
    }

    /// kohya's `load_prompts`: `.txt` — one prompt per line, stripped; empty lines and lines whose first character is
    /// `#` skipped; `.toml` — `[prompt]` defaults merged into each `[[prompt.subset]]`; `.json` — a list of strings
    /// (parsed as lines) or objects with kohya's keys (prompt, negative_prompt, width, height, seed, sample_steps,
    /// scale, sample_sampler, controlnet_image). Entries are numbered in file order.
    /// `builtin:demo`: the demo config's two prompts (captions of the built-in shapes dataset at the tiny model's 128²).
    public static let builtinDemo = """
        demo_trigger, red circle, blue background --w 128 --h 128 --d 1 --s 20 --l 5 --ss euler_a
        demo_trigger, yellow star, green background --n blurry --w 128 --h 128 --d 2 --s 20 --l 5 --ss dpm++_2m_karras
        """

    /// `load` of a path, or of `builtin:demo`.
    public static func load(path: String) throws -> [SamplePrompt] {
        if path == "builtin:demo" {
            return builtinDemo.split(separator: "\n").enumerated().map { parseLine(String($1), index: $0) }
        }
        return try load(URL(fileURLWithPath: path))
    }

    public static func load(_ url: URL) throws -> [SamplePrompt] {
        let path = url.path
        guard let data = FileManager.default.contents(atPath: path) else {
            throw SamplerError("\(path): cannot read the sample prompts file")
        }
        guard let text = String(data: data, encoding: .utf8) else { throw SamplerError("\(path): not UTF-8 text") }
        let ext = url.pathExtension.lowercased()
        var entries: [SamplePrompt]
        switch ext {
        case "txt":
            // Python's readlines + strip; `line[0] != "#"` looks at the unstripped line.
            let text = text.hasPrefix("\u{FEFF}") ? String(text.dropFirst()) : text
            entries = text.split(separator: "\n", omittingEmptySubsequences: false).compactMap { raw -> String? in
                let line = raw.trimmingCharacters(in: .whitespacesAndNewlines)
                guard !line.isEmpty, raw.first != "#" else { return nil }
                return line
            }.enumerated().map { parseLine($1, index: $0) }
        case "toml":
            let root: TOMLTable
            do { root = try TOMLTable(string: text) } catch let e as TOMLParseError {
                throw SamplerError("\(path): TOML syntax error at line \(e.source.begin.line): \(e.description)")
            }
            guard let prompt = root["prompt"]?.table else {
                throw SamplerError("\(path): a sample prompts TOML needs a [prompt] table with [[prompt.subset]] entries (kohya's format)")
            }
            guard let subsets = prompt["subset"]?.array, !subsets.isEmpty else {
                throw SamplerError("\(path): [prompt] has no [[prompt.subset]] entries; each subset is one image")
            }
            var defaults: [String: Any] = [:]
            for key in prompt.keys where key != "subset" { defaults[key] = plain(prompt[key]!) }
            entries = try subsets.enumerated().map { i, v in
                guard let t = v.table else { throw SamplerError("\(path): [[prompt.subset]] entry \(i + 1) is not a table") }
                var d = defaults
                for key in t.keys { d[key] = plain(t[key]!) }   // kohya: dict(**defaults, **subset)
                return try fromDictionary(d, index: i, source: "\(path) [[prompt.subset]] \(i + 1)")
            }
        case "json":
            let json: Any
            do { json = try JSONSerialization.jsonObject(with: data) } catch {
                throw SamplerError("\(path): not valid JSON: \(error.localizedDescription)")
            }
            guard let list = json as? [Any] else { throw SamplerError("\(path): a sample prompts JSON is a list of strings or objects") }
            entries = try list.enumerated().map { i, item in
                if let s = item as? String { return parseLine(s, index: i) }
                guard let d = item as? [String: Any] else { throw SamplerError("\(path): entry \(i + 1) is neither a string nor an object") }
                return try fromDictionary(d, index: i, source: "\(path) entry \(i + 1)")
            }
        default:
            throw SamplerError("\(path): sample prompts must be a .txt, .toml or .json file (as kohya reads them)")
        }
        if entries.isEmpty { throw SamplerError("\(path): no prompts (empty, or only comments)") }
        return entries
    }

    static func plain(_ v: TOMLValueConvertible) -> Any {
        if let s = v.string { return s }
        if let i = v.int { return i }
        if let d = v.double { return d }
        if let b = v.bool { return b }
        return "\(v)"
    }

    /// A prompt dict (TOML/JSON) with kohya's key names; numbers may be given as strings (kohya passes them on to
    /// the pipeline, which takes ints and floats).
    static func fromDictionary(_ d: [String: Any], index: Int, source: String) throws -> SamplePrompt {
        func string(_ key: String) throws -> String? {
            guard let v = d[key], !(v is NSNull) else { return nil }
            if let s = v as? String { return s }
            throw SamplerError("\(source): \(key) must be text, got \(v)")
        }
        func number(_ key: String) throws -> Double? {
            guard let v = d[key], !(v is NSNull) else { return nil }
            if let n = v as? NSNumber, !(v is Bool) { return n.doubleValue }
            if let s = v as? String, let n = Double(s.trimmingCharacters(in: .whitespaces)) { return n }
            throw SamplerError("\(source): \(key) must be a number, got \(v)")
        }
        func integer(_ key: String) throws -> Int? {
            guard let n = try number(key) else { return nil }
            guard n == n.rounded(), abs(n) < 1e15 else { throw SamplerError("\(source): \(key) must be a whole number, got \(n)") }
            return Int(n)
        }
        var p = SamplePrompt(prompt: try string("prompt") ?? "", index: index)
        p.negativePrompt = try string("negative_prompt")
        p.width = try integer("width")
        p.height = try integer("height")
        if let s = try integer("seed") {
            guard s >= 0 else { throw SamplerError("\(source): seed \(s) must be ≥ 0") }
            p.seed = UInt64(s)
        }
        p.steps = try integer("sample_steps").map { max(1, min(1000, $0)) }
        p.scale = try number("scale").map(Float.init)
        p.sampler = try string("sample_sampler")
        p.controlnetImage = try string("controlnet_image")
        return p
    }
}

/// What an entry that sets nothing gets.
public struct SamplePromptDefaults: Sendable, Equatable {
    public var negativePrompt: String
    public var width: Int
    public var height: Int
    public var steps: Int
    public var cfgScale: Float
    public var sampler: SamplerChoice

    public init(negativePrompt: String = "", width: Int, height: Int, steps: Int, cfgScale: Float, sampler: SamplerChoice) {
        self.negativePrompt = negativePrompt
        self.width = width
        self.height = height
        self.steps = steps
        self.cfgScale = cfgScale
        self.sampler = sampler
    }

    /// kohya's sample_image_inference defaults: 512×512, 30 steps, CFG 7.5, sample_sampler (default ddim).
    public static func kohya(sampler: SamplerChoice) -> SamplePromptDefaults {
        SamplePromptDefaults(width: 512, height: 512, steps: 30, cfgScale: 7.5, sampler: sampler)
    }
}

extension SamplePrompt {
    /// The request for this entry: its own settings over `defaults`; sizes rounded down to a multiple of 8, at least
    /// 64 (kohya: `max(64, height - height % 8)`). `seed` is used when the entry sets none.
    public func request(defaults: SamplePromptDefaults, seed fallback: UInt64) throws -> GenerationRequest {
        if let cn = controlnetImage {
            throw SamplerError("prompt \(index + 1) (\"\(prompt.prefix(40))…\") asks for a ControlNet image (--cn \(cn)); lora-dist has no ControlNet — remove --cn from the line")
        }
        let sampler = try self.sampler.map { try SamplerChoice(parsing: $0) } ?? defaults.sampler
        let w = max(64, (width ?? defaults.width) - (width ?? defaults.width) % 8)
        let h = max(64, (height ?? defaults.height) - (height ?? defaults.height) % 8)
        return GenerationRequest(prompt: prompt, negativePrompt: negativePrompt ?? defaults.negativePrompt, width: w, height: h,
                                 steps: steps ?? defaults.steps, cfgScale: scale ?? defaults.cfgScale, seed: seed ?? fallback,
                                 sampler: sampler)
    }

    /// Every image of a list: `imagesEach` per entry (seeds s, s + 1, …); entries without a seed take `firstSeed`
    /// plus the image's position in the whole list.
    public static func requests(_ list: [SamplePrompt], defaults: SamplePromptDefaults, imagesEach: Int,
                                firstSeed: UInt64) throws -> [GenerationRequest] {
        var out: [GenerationRequest] = []
        for p in list {
            for k in 0..<imagesEach {
                var r = try p.request(defaults: defaults, seed: firstSeed &+ UInt64(out.count))
                if p.seed != nil { r.seed = r.seed &+ UInt64(k) }
                out.append(r)
            }
        }
        return out
    }
}
