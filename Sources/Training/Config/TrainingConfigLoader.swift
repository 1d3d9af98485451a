import Crypto
import Dataset
import Distributed
import Foundation
import TOMLKit

/// A value of an implemented kohya key, in kohya's terms (what `TrainingConfig.kohyaValue(of:)` returns).
public enum KohyaValue: Equatable, Sendable, CustomStringConvertible {
    case null
    case bool(Bool)
    case int(Int)
    case float(Double)
    case string(String)
    case strings([String])
    case ints([Int])
    case floats([Double])

    public var description: String {
        switch self {
        case .null: return "null"
        case .bool(let b): return String(b)
        case .int(let i): return String(i)
        case .float(let d): return String(d)
        case .string(let s): return "\"\(s)\""
        case .strings(let a): return "[" + a.map { "\"\($0)\"" }.joined(separator: ", ") + "]"
        case .ints(let a): return "\(a)"
        case .floats(let a): return "\(a)"
        }
    }
}

/// The LoRA network's shape, from network_dim / network_alpha / network_dropout / network_args / the train-only
/// switches, as kohya networks/lora.py `create_network` reads them.
public struct NetworkOptions: Equatable, Sendable {
    /// Rank of the Linear (and 1×1 conv) modules: kohya network_dim.
    public var linearDim: Int
    /// kohya network_alpha; scale = alpha / dim.
    public var linearAlpha: Double
    /// LoCon rank for the 3×3 convs (network_args conv_dim); nil = no conv LoRA.
    public var convDim: Int?
    /// network_args conv_alpha; kohya uses 1.0 when conv_dim is given without it.
    public var convAlpha: Double?
    /// Neuron dropout on the down projection's output (network_dropout, or network_args dropout which wins).
    public var dropout: Double?
    /// network_args rank_dropout: drops whole ranks.
    public var rankDropout: Double?
    /// network_args module_dropout: skips whole modules.
    public var moduleDropout: Double?
    /// kohya `train_unet = not network_train_text_encoder_only`.
    public var trainUNet: Bool
    /// kohya `train_text_encoder = not network_train_unet_only`.
    public var trainTextEncoder: Bool

    public init(linearDim: Int, linearAlpha: Double, convDim: Int? = nil, convAlpha: Double? = nil,
                dropout: Double? = nil, rankDropout: Double? = nil, moduleDropout: Double? = nil,
                trainUNet: Bool = true, trainTextEncoder: Bool = false) {
        self.linearDim = linearDim; self.linearAlpha = linearAlpha; self.convDim = convDim; self.convAlpha = convAlpha
        self.dropout = dropout; self.rankDropout = rankDropout; self.moduleDropout = moduleDropout
        self.trainUNet = trainUNet; self.trainTextEncoder = trainTextEncoder
    }
}

extension TrainingConfig {
    // MARK: Loading

    /// A kohya training TOML as is: sectioned ([model_arguments], [dataset_arguments], [training_arguments],
    /// [network_arguments], [optimizer_arguments], [saving_arguments], [sample_prompt_arguments],
    /// [logging_arguments], [sdxl_arguments], ... — like kohya's `read_config_from_file`, any section name is
    /// flattened) or flat; plus lora-dist's own `[lora_dist]` section.
    public static func load(toml url: URL, overrides: [(key: String, value: TOMLValueConvertible)] = []) throws -> TrainingConfig {
        let text: String
        do { text = try String(contentsOf: url, encoding: .utf8) } catch {
            throw TrainingConfigError(file: url.path, "cannot read the training config: \(error.localizedDescription)")
        }
        if url.pathExtension.lowercased() == "json" || text.drop(while: \.isWhitespace).first == "{" {
            throw TrainingConfigError(file: url.path, "this is a JSON file (a kohya_ss GUI preset?), not kohya's training TOML: in the kohya_ss GUI, save the configuration as TOML (or copy the TOML it writes next to the run's output), and give lora-dist that file")
        }
        return try parse(toml: text, source: url.path, baseDirectory: url.deletingLastPathComponent(), overrides: overrides)
    }

    /// kohya's command-line spelling of config keys next to the file, as a launch script passes them
    /// (`--dataset_config d.toml --optimizer_args weight_decay=0.1 --zero_terminal_snr`), and lora-dist's generic
    /// `--set key=value` (a TOML value): key/TOML-value pairs that replace the file's (the command line wins, as in
    /// kohya's read_config_from_file). A flag with no value is `true`; a list key takes every value up to the next flag.
    public static func commandLineOverrides(kohyaFlags: [String], set: [String]) throws -> [(key: String, value: TOMLValueConvertible)] {
        var pairs: [(String, String)] = []
        var i = 0
        while i < kohyaFlags.count {
            let flag = kohyaFlags[i]
            guard flag.hasPrefix("--"), flag.count > 2 else {
                throw TrainingConfigError(file: "<command line>", "\(flag): expected a kohya option such as --dataset_config FILE (or --set key=value)")
            }
            var key = String(flag.dropFirst(2)), values: [String] = []
            if let eq = key.firstIndex(of: "=") { values = [String(key[key.index(after: eq)...])]; key = String(key[..<eq]) }
            i += 1
            while values.isEmpty || isList(key), i < kohyaFlags.count, !kohyaFlags[i].hasPrefix("--") {
                values.append(kohyaFlags[i]); i += 1
            }
            func literal(_ v: String) -> String {
                if let k = fields[key]?.kind ?? datasetArgumentFields[key]?.kind, [.int, .float, .intOrFloat, .floatOrFloats].contains(k),
                   Double(v) != nil { return v }
                return "\"" + v.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"") + "\""
            }
            let value = values.isEmpty ? "true" : isList(key) ? "[" + values.map(literal).joined(separator: ", ") + "]" : literal(values[0])
            pairs.append((key, value))
        }
        for s in set {
            guard let eq = s.firstIndex(of: "="), eq != s.startIndex else {
                throw TrainingConfigError(file: "<command line>", "--set \(s): expected key=value (a TOML value, e.g. --set max_train_steps=100)")
            }
            pairs.append((String(s[..<eq]).trimmingCharacters(in: .whitespaces), String(s[s.index(after: eq)...])))
        }
        return try pairs.map { key, text in
            guard let table = try? TOMLTable(string: "v = \(text)"), let v = table["v"] else {
                throw TrainingConfigError(file: "<command line>", key: key, "= \(text) is not a TOML value (quote strings: --set 'output_name=\"x\"')")
            }
            return (key, v)
        }
    }

    /// kohya's nargs="*" options (and the list-valued ones a TOML writes as arrays).
    static func isList(_ key: String) -> Bool {
        if let k = fields[key]?.kind { return k == .strings || k == .floatOrFloats }
        return false
    }

    /// Whether `url` is a kohya dataset TOML (`[[datasets]]`, `[general]`) rather than a training TOML.
    public static func isDatasetTOML(_ url: URL) -> Bool {
        guard let text = try? String(contentsOf: url, encoding: .utf8), let table = try? TOMLTable(string: text) else { return false }
        let training = table.contains(key: "pretrained_model_name_or_path")
            || table.keys.contains { table[$0]?.table?.contains(key: "pretrained_model_name_or_path") ?? false }
        return table.contains(key: "datasets") && !training
    }

    /// The embedded demo with command-line overrides.
    public static func demo(overrides: [(key: String, value: TOMLValueConvertible)]) throws -> TrainingConfig {
        try parse(toml: demoTOML, source: "<demo>", baseDirectory: URL(fileURLWithPath: FileManager.default.currentDirectoryPath),
                  overrides: overrides)
    }

    /// The embedded demo (configs/demo.toml), parsed against the current directory.
    public static var demo: TrainingConfig {
        do {
            return try parse(toml: demoTOML, source: "<demo>",
                             baseDirectory: URL(fileURLWithPath: FileManager.default.currentDirectoryPath))
        } catch {
            // TrainingConfigTests parses demoTOML, so this only fires if the compiled-in text was broken.
            fatalError("the embedded demo config does not parse: \(error)")
        }
    }

    /// Parses a training TOML's text. `source` names it in errors; `baseDirectory` is where `dataset_config` is
    /// looked for first (the TOML's folder). Other paths stay as written (kohya reads them relative to the
    /// current directory, and so does lora-dist).
    public static func parse(toml text: String, source: String, baseDirectory: URL,
                             overrides: [(key: String, value: TOMLValueConvertible)] = []) throws -> TrainingConfig {
        let root: TOMLTable
        do { root = try TOMLTable(string: text) } catch let e as TOMLParseError {
            throw TrainingConfigError(file: source, "TOML syntax error at line \(e.source.begin.line), column \(e.source.begin.column): \(e.description)")
        } catch {
            throw TrainingConfigError(file: source, "not a TOML file: \(error)")
        }

        // LoRA_Easy_Training_Scripts' UI format ([general_args.args], [network_args.args], dataset_args …) is not a kohya
        // training TOML: kohya cannot read it either (its sections hold tables, not values).
        let letsSections = root.keys.filter { $0.hasSuffix("_args") && root[$0]?.table?.contains(key: "args") == true }
        if !letsSections.isEmpty {
            throw TrainingConfigError(file: source, "this is LoRA_Easy_Training_Scripts' UI format ([\(letsSections.sorted().joined(separator: "], ["))] with `args` tables), which kohya's sd-scripts cannot read either; give lora-dist a kohya training TOML (flat keys, or sections of plain key = value) — the keys inside the `args` tables are kohya's and can be copied into one")
        }
        // Flatten every section (kohya: "combine all sections into one"); [lora_dist] is ours.
        var entries: [(key: String, value: TOMLValueConvertible, section: String?)] = []
        var loraTable: TOMLTable? = nil
        for name in root.keys {
            let v = root[name]!
            if name == "lora_dist" {
                guard let t = v.table else {
                    throw TrainingConfigError(file: source, key: "lora_dist", "must be a section ([lora_dist]), got \(show(v))")
                }
                loraTable = t
            } else if let t = v.table {
                for k in t.keys { entries.append((k, t[k]!, name)) }
            } else {
                entries.append((name, v, nil))
            }
        }
        // The command line replaces the file's value of a key, wherever the file sets it.
        for o in overrides {
            entries.removeAll { $0.key == o.key }
            entries.append((o.key, o.value, "the command line"))
        }
        // Aliases (network_rank → network_dim): read as the kohya key unless that is set too.
        var warnings: [String] = []
        for (i, e) in entries.enumerated() {
            guard let target = aliases[e.key] else { continue }
            if let other = entries.first(where: { $0.key == target }) {
                guard show(other.value) == show(e.value) else {
                    throw TrainingConfigError(file: source, key: e.key,
                        "= \(show(e.value)) and \(target) = \(show(other.value)) disagree; `\(e.key)` is not a kohya option (kohya ignores it) — keep only \(target)")
                }
                warnings.append("\(e.key): not a kohya option; \(target) = \(show(other.value)) is the rank trained")
                entries[i].key = ""
            } else {
                warnings.append("\(e.key) = \(show(e.value)): read as \(target) (the kohya option; kohya itself ignores \(e.key) and would train at rank 4)")
                entries[i].key = target
            }
        }
        entries.removeAll { $0.key.isEmpty }
        // sdxl_train.py's learning_rate_te1/te2: the text encoders' rates when text_encoder_lr is not set.
        let teRates = entries.filter { textEncoderRateKeys.contains($0.key) }
        entries.removeAll { textEncoderRateKeys.contains($0.key) }
        var seenIn: [String: String] = [:]
        for e in entries {
            let here = e.section.map { "[\($0)]" } ?? "the top level"
            if let there = seenIn[e.key] {
                throw TrainingConfigError(file: source, key: e.key,
                    "is set twice (in \(there) and in \(here)); kohya would silently keep one — keep only one")
            }
            seenIn[e.key] = here
        }

        var c = TrainingConfig()
        c.sourceFile = source
        c.warnings = warnings
        let given = Dictionary(entries.map { ($0.key, $0.value) }, uniquingKeysWith: { a, _ in a })
        var ignored: [String] = [], ignoredGUI: [String] = []
        var optimizerTypeSet = false, use8bitAdam = false, useLion = false
        for e in entries.sorted(by: { $0.key < $1.key }) {
            let key = e.key, v = e.value
            if let field = fields[key] {
                let value = try decode(v, as: field.kind, key: key, file: source)
                if let note = coercionNote(key, v, value, kind: field.kind) {
                    c.warnings.append(note)
                    if value == .null { continue }
                }
                if key == "optimizer_type" { optimizerTypeSet = true }
                if key == "use_8bit_adam", case .bool(let b) = value { use8bitAdam = b; continue }
                if key == "use_lion_optimizer", case .bool(let b) = value { useLion = b; continue }
                try field.apply(&c, value, baseDirectory)
            } else if let d = datasetArgumentFields[key] {
                let value = try decode(v, as: d.kind, key: key, file: source)
                if let note = coercionNote(key, v, value, kind: d.kind) {
                    c.warnings.append(note)
                    if value == .null { continue }
                }
                try d.apply(&c.datasetArguments, value, c)
                c.datasetArgumentKeys.insert(d.configName)
                if key == "caption_extention", case .string(let e) = value {
                    c.notes.append("caption_extention: read as caption_extension \"\(e)\" (kohya's old spelling)")
                }
            } else if let note = acceptedWithNote[key] {
                if warningKeys.contains(key) { c.warnings.append(note) } else { c.notes.append(note) }
            } else if let what = unsupported[key] {
                if isInert(key, v, given: given) { ignored.append("\(key) = \(show(v))"); continue }
                throw TrainingConfigError(file: source, key: key,
                    "= \(show(v)): `\(key)` is a kohya option lora-dist does not implement (it \(what)) — remove it")
            } else if loraDistKinds[key] != nil {
                throw TrainingConfigError(file: source, key: key,
                    "is a lora-dist setting; move it into the [lora_dist] section")
            } else if let gui = guiKeys[key] {
                ignoredGUI.append(gui.isEmpty ? key : "\(key) (\(gui))")
            } else {
                // kohya ignores keys its parser does not define; so does lora-dist, saying so (a typo gets a suggestion).
                let unknown = unknownKey(key, in: e.section.map { "[\($0)]" } ?? "the top level", file: source,
                                         candidates: Array(kohyaKeys.keys) + loraDistKinds.keys.map { "lora_dist." + $0 })
                c.warnings.append("`\(key)` = \(show(v)): \(unknown.message); ignored, as kohya ignores it")
            }
        }
        if !ignored.isEmpty {
            c.warnings.append("ignored, as they ask for nothing: " + ignored.joined(separator: ", ")
                              + " (kohya options lora-dist does not implement, set off, to kohya's default, or without what switches them on)")
        }
        if !ignoredGUI.isEmpty {
            c.warnings.append("ignored GUI/front-end settings (not kohya options; kohya ignores them too): " + ignoredGUI.joined(separator: ", "))
        }
        if !teRates.isEmpty {
            let names = teRates.map { "\($0.key) = \(show($0.value))" }.joined(separator: ", ")
            if c.textEncoderLR != nil {
                c.warnings.append("\(names): sdxl_train.py options (full fine-tuning), which kohya's LoRA trainer ignores; text_encoder_lr applies")
            } else {
                var rates: [Double] = []
                for key in textEncoderRateKeys {
                    guard let e = teRates.first(where: { $0.key == key }) else { rates.append(c.learningRate); continue }
                    guard case .floats(let f) = try decode(e.value, as: .floatOrFloats, key: key, file: source), f.count == 1 else {
                        throw TrainingConfigError(file: source, key: key, "= \(show(e.value)) must be one number")
                    }
                    guard f[0] >= 0 else { throw TrainingConfigError(file: source, key: key, "is \(f[0]); a learning rate must be ≥ 0") }
                    rates.append(f[0])
                }
                c.textEncoderLR = rates
                c.warnings.append("\(names): read as text_encoder_lr = \(rates) (sdxl_train.py's names; kohya's LoRA trainer reads text_encoder_lr)")
            }
        }
        let runtime = c.optimizerArgs.compactMap { $0.split(separator: "=").first.map { $0.trimmingCharacters(in: .whitespaces) } }
            .filter { AdamW.runtimeOnly.contains($0) }
        if !runtime.isEmpty && c.optimizerType == "AdamW" {
            c.notes.append("optimizer_args \(runtime.joined(separator: ", ")): torch.optim.AdamW implementation switches (kernel choice); lora-dist's AdamW computes the same update either way")
        }
        // kohya get_optimizer: the legacy switches pick the optimizer when optimizer_type is not given.
        if use8bitAdam && useLion {
            throw c.error("use_8bit_adam", "and use_lion_optimizer are both true (kohya refuses this too) — keep one, or set optimizer_type")
        }
        if use8bitAdam || useLion {
            let flag = use8bitAdam ? "use_8bit_adam" : "use_lion_optimizer"
            if optimizerTypeSet {
                throw c.error(flag, "is true and optimizer_type is set too (kohya refuses this) — keep only optimizer_type")
            }
            c.optimizerType = use8bitAdam ? "AdamW8bit" : "Lion"
            c.notes.append("\(flag): optimizer_type \(c.optimizerType) (kohya's legacy switch)")
        }

        if let t = loraTable {
            for key in t.keys.sorted() {
                let v = t[key]!
                if let kind = loraDistKinds[key] {
                    try c.applyLoraDist(key: key, value: v, kind: kind)
                } else if kohyaKeys[key] != nil {
                    throw TrainingConfigError(file: source, key: "lora_dist.\(key)",
                        "is a kohya option, not a lora-dist one; move it out of [lora_dist] (into any other section)")
                } else {
                    throw unknownKey(key, in: "[lora_dist]", file: source, candidates: Array(loraDistKinds.keys))
                }
            }
        }
        try c.validate()
        try c.checkStrict()
        c.datasetSource = c.datasetConfigPath ?? c.inJSON ?? c.trainDataDir ?? ""
        // Resolve the dataset now where that needs nothing the trainer makes (builtin:shapes is written at train
        // time; a missing dataset TOML is reported by datasetConfig(builtinFolder:)), so bad bucket settings and
        // dataset TOML errors surface at load.
        if c.trainDataDir != "builtin:shapes", c.datasetConfigPath.map({ FileManager.default.fileExists(atPath: $0) }) ?? true {
            c.dataset = try c.datasetConfig(builtinFolder: baseDirectory)
        }
        return c
    }

    /// With `strict` (`[lora_dist] strict = true`, `lora-dist train --strict`): every warning is an error.
    public func checkStrict() throws {
        guard lora.strict, !warnings.isEmpty else { return }
        throw TrainingConfigError(file: sourceFile, "strict mode: the config has \(warnings.count) warning(s), each an error here:\n  "
            + warnings.joined(separator: "\n  "))
    }

    static func unknownKey(_ key: String, in place: String, file: String, candidates: [String]) -> TrainingConfigError {
        var msg = "unknown key in \(place)"
        if let guess = closestKey(to: key, in: candidates) {
            msg += guess.hasPrefix("lora_dist.")
                ? "; did you mean `\(guess.dropFirst("lora_dist.".count))` (in the [lora_dist] section)?"
                : "; did you mean `\(guess)`?"
        } else {
            msg += " (neither a kohya sdxl_train_network.py option nor a [lora_dist] setting) — remove it or fix its spelling"
        }
        return TrainingConfigError(file: file, key: key, msg)
    }

    func error(_ key: String, _ message: String) -> TrainingConfigError {
        TrainingConfigError(file: sourceFile, key: key, message)
    }

    /// Whether an unsupported key's value asks for nothing: off, empty, kohya's default, or a part of a feature that
    /// is not switched on (sampling without a cadence, uploads without a repository id).
    static func isInert(_ key: String, _ v: TOMLValueConvertible, given: [String: TOMLValueConvertible]) -> Bool {
        if v.bool == false || v.string?.isEmpty == true || v.array?.isEmpty == true { return true }
        switch unsupportedDefaults[key] {
        case .number(let d)?: if (v.int.map(Double.init) ?? v.double) == d { return true }
        case .string(let d)?: if v.string == d { return true }
        case nil: break
        }
        switch key {
        case "save_last_n_steps_state", "save_last_n_epochs_state":
            // Keep rules for states: nothing to keep when no state is saved.
            return given["save_state"]?.bool != true
        case _ where key.hasPrefix("huggingface_") || key == "async_upload" || key == "save_state_to_huggingface":
            return (given["huggingface_repo_id"]?.string ?? "").isEmpty
        default:
            return false
        }
    }

    /// The note for a value `decode` read other than as written (a number in a string, "" or false for "not set").
    static func coercionNote(_ key: String, _ v: TOMLValueConvertible, _ value: KohyaValue, kind: ValueKind) -> String? {
        if value == .null { return "\(key) = \(show(v)): treated as not set (kohya's code ignores it too)" }
        if v.string != nil, [.int, .float, .intOrFloat, .floatOrFloats].contains(kind) {
            return "\(key) = \(show(v)): read as the number \(value)"
        }
        return nil
    }

    /// A TOML value as written, for messages.
    static func show(_ v: TOMLValueConvertible) -> String {
        if let s = v.string { return "\"\(s)\"" }
        if v.table != nil { return "a table" }
        return v.debugDescription
    }

    static func decode(_ v: TOMLValueConvertible, as kind: ValueKind, key: String, file: String) throws -> KohyaValue {
        func bad() -> TrainingConfigError {
            let got: String
            switch v.type {
            case .string: got = "a string"
            case .int: got = "an integer"
            case .double: got = "a float"
            case .bool: got = "a boolean"
            case .array: got = "an array"
            case .table: got = "a table"
            default: got = "a \(v.type)"
            }
            return TrainingConfigError(file: file, key: key, "= \(show(v)) is \(got); it must be \(kind.expected)")
        }
        // kohya applies no argparse type to TOML values; its code then uses them as Python would: a number written
        // as a string works where kohya computes with it (float("1.0")), "" or false where it tests `if args.x:`.
        // Those are read as kohya ends up using them (`coercions` says so in a note); anything else is refused.
        let text = v.string?.trimmingCharacters(in: .whitespaces)
        switch kind {
        case .int:
            if let i = v.int { return .int(i) }
            if text == "" { return .null }
            if let t = text, let i = Int(t) ?? Double(t).flatMap({ $0.rounded() == $0 ? Int($0) : nil }) { return .int(i) }
            throw bad()
        case .float:
            if let d = v.double { return .float(d) }
            if let i = v.int { return .float(Double(i)) }
            if text == "" { return .null }
            if let t = text, let d = Double(t) { return .float(d) }
            throw bad()
        case .bool:
            guard let b = v.bool else { throw bad() }
            return .bool(b)
        case .string:
            if v.bool == false { return .null }
            guard let s = v.string else { throw bad() }
            return .string(s)
        case .strings:
            guard let a = v.array else { throw bad() }
            var out: [String] = []
            for x in a { guard let s = x.string else { throw bad() }; out.append(s) }
            return .strings(out)
        case .intOrFloat:
            if let i = v.int { return .int(i) }
            if let d = v.double { return .float(d) }
            if text == "" { return .null }
            if let t = text { if let i = Int(t) { return .int(i) }; if let d = Double(t) { return .float(d) } }
            throw bad()
        case .resolution:
            if let i = v.int { return .ints([i, i]) }
            if let s = v.string {
                // kohya prepare_dataset_args: tuple(int(r) for r in resolution.split(",")); one number = square.
                let parts = s.split(separator: ",", omittingEmptySubsequences: false)
                    .map { Int($0.trimmingCharacters(in: .whitespaces)) }
                if parts.count == 1, let n = parts[0] { return .ints([n, n]) }
                if parts.count == 2, let w = parts[0], let h = parts[1] { return .ints([w, h]) }
                throw bad()
            }
            if let a = v.array, a.count == 2, let w = a[0].int, let h = a[1].int { return .ints([w, h]) }
            throw bad()
        case .floatOrFloats:
            if let d = v.double { return .floats([d]) }
            if let i = v.int { return .floats([Double(i)]) }
            if let a = v.array {
                var out: [Double] = []
                for x in a {
                    if let d = x.double { out.append(d) } else if let i = x.int { out.append(Double(i)) } else { throw bad() }
                }
                return .floats(out)
            }
            throw bad()
        case .any:
            return .null
        }
    }

    mutating func applyLoraDist(key: String, value v: TOMLValueConvertible, kind: ValueKind) throws {
        let name = "lora_dist.\(key)"
        func bad(_ want: String) -> TrainingConfigError {
            TrainingConfigError(file: sourceFile, key: name, "= \(Self.show(v)); it must be \(want)")
        }
        func int(atLeast low: Int) throws -> Int {
            guard let i = v.int else { throw bad("an integer") }
            guard i >= low else { throw bad("an integer ≥ \(low)") }
            return i
        }
        func str() throws -> String { guard let s = v.string else { throw bad("a string") }; return s }
        switch key {
        case "wire_format":
            guard let w = WireFormat(rawValue: try str()) else { throw bad("one of \"none\", \"fp32\", \"bf16\"") }
            lora.wireFormat = w
        case "threads_per_rank": lora.threadsPerRank = try int(atLeast: 1)
        case "cache_dir": lora.cacheDir = try str()
        case "cache_mode":
            switch try str() {
            case "shared": lora.cacheMode = .shared
            case "node_local", "node-local": lora.cacheMode = .nodeLocal
            default: throw bad("\"shared\" or \"node_local\"")
            }
        case "trigger":
            let t = try str()
            guard !t.trimmingCharacters(in: .whitespaces).isEmpty else { throw bad("a non-empty trigger word") }
            lora.trigger = t
        case "resolutions":
            guard let a = v.array, a.count >= 1 else { throw bad("a non-empty array of integers, e.g. [512, 768]") }
            var out: [Int] = []
            for x in a {
                guard let i = x.int, i > 0 else { throw bad("an array of positive integers, e.g. [512, 768]") }
                out.append(i)
            }
            guard Set(out).count == out.count else { throw bad("an array without repeats") }
            lora.resolutions = out
        case "keep_step_saves": lora.keepStepSaves = try int(atLeast: 1)
        case "log_every": lora.logEvery = try int(atLeast: 1)
        case "metrics_file": lora.metricsFile = try str()
        case "max_nonfinite_steps": lora.maxNonFiniteSteps = try int(atLeast: 1)
        case "parameter_check_every": lora.parameterCheckEvery = try int(atLeast: 0)
        case "keep_states": lora.keepStates = try int(atLeast: 1)
        case "collective_timeout":
            guard let d = v.double ?? v.int.map(Double.init) else { throw bad("a number of seconds (0 = wait forever)") }
            guard d >= 0 else { throw bad("a number of seconds ≥ 0 (0 = wait forever)") }
            lora.collectiveTimeout = d
        case "strict":
            guard let b = v.bool else { throw bad("true or false") }
            lora.strict = b
        case "overlap_reduction":
            if let b = v.bool { lora.overlapReduction = b ? .on : .off }
            else if v.string == "auto" { lora.overlapReduction = .auto }
            else { throw bad("true, false or \"auto\"") }
        case "bucket_mb":
            guard let d = v.double ?? v.int.map(Double.init) else { throw bad("a number of megabytes, e.g. 25") }
            guard d > 0, d <= 4096 else { throw bad("a number of megabytes > 0 and ≤ 4096, e.g. 25") }
            lora.bucketMB = d
        default: preconditionFailure("loraDistKinds has \(key) but applyLoraDist does not")
        }
    }

    /// Checks across keys, as kohya's verify_training_args / assert_extra_args do (its warnings become notes,
    /// its errors errors).
    mutating func validate() throws {
        if pretrainedModelNameOrPath.isEmpty {
            throw error("pretrained_model_name_or_path", "is not set — give the SDXL checkpoint (.safetensors), a diffusers folder, or \"builtin:tiny\"")
        }
        if datasetConfigPath == nil, trainDataDir?.trimmingCharacters(in: .whitespaces).isEmpty == true {
            throw error("train_data_dir", "is empty — give the image folder (kohya N_name subfolders, or a flat folder of images with captions), or a dataset_config")
        }
        if datasetConfigPath == nil && trainDataDir == nil && inJSON == nil {
            throw error("train_data_dir", "is not set and neither is dataset_config — give the image folder (or \"builtin:shapes\"), or a dataset TOML")
        }
        if datasetConfigPath != nil {
            // kohya train_network.py: with a dataset config, train_data_dir / reg_data_dir are ignored (warned).
            for (k, v) in [("train_data_dir", trainDataDir), ("reg_data_dir", regDataDir), ("in_json", inJSON)] where v != nil {
                notes.append("\(k): ignored because dataset_config is given (kohya ignores it too)")
            }
            trainDataDir = nil; regDataDir = nil; inJSON = nil
        }
        if networkTrainUnetOnly && networkTrainTextEncoderOnly {
            throw error("network_train_unet_only", "and network_train_text_encoder_only are both true — keep at most one")
        }
        if cacheTextEncoderOutputs && !networkTrainUnetOnly {
            throw error("cache_text_encoder_outputs", "needs network_train_unet_only = true: a text-encoder LoRA cannot train on cached text-encoder outputs (kohya asserts this too)")
        }
        if cacheLatentsToDisk && !cacheLatents {
            cacheLatents = true   // kohya verify_training_args does the same
            notes.append("cache_latents_to_disk: cache_latents is enabled too (as kohya does)")
        }
        if adaptiveNoiseScale != nil && noiseOffset == nil {
            throw error("adaptive_noise_scale", "needs noise_offset (kohya refuses it alone) — set noise_offset too")
        }
        if scaleVPredLossLikeNoisePred && !vParameterization {
            throw error("scale_v_pred_loss_like_noise_pred", "needs v_parameterization = true (kohya refuses it otherwise)")
        }
        if let v = vPredLikeLoss, v != 0, vParameterization {
            throw error("v_pred_like_loss", "cannot be used with v_parameterization (kohya refuses it too) — remove one")
        }
        if zeroTerminalSNR && !vParameterization {
            notes.append("zero_terminal_snr without v_parameterization: kohya warns that training will be unexpected")
        }
        if let lo = minTimestep, !(0...999).contains(lo) { throw error("min_timestep", "is \(lo); it must be in 0...999") }
        if let hi = maxTimestep, !(1...1000).contains(hi) { throw error("max_timestep", "is \(hi); it must be in 1...1000") }
        if let lo = minTimestep, let hi = maxTimestep, lo >= hi {
            throw error("min_timestep", "\(lo) is not below max_timestep \(hi) — timesteps are drawn from [min, max)")
        }
        if let r = datasetArguments.resolution, lora.resolutions != nil {
            notes.append("resolution \(r[0]),\(r[1]): replaced by [lora_dist] resolutions \(lora.resolutions!)")
        }
        warnings += try parseNetwork().warnings
        // kohya networks/lora.py LoRAModule: `alpha = self.lora_dim if alpha is None or alpha == 0 else alpha`.
        if networkAlpha == 0 {
            notes.append("network_alpha = 0: read as network_alpha = network_dim (\(networkDim)), as kohya does (scale 1; the file stores alpha \(networkDim))")
        }
        // kohya train_network.py trains at lr 0 after a warning; so does lora-dist, saying so.
        let rates = [learningRate] + (unetLR.map { [$0] } ?? []) + (textEncoderLR ?? [])
        if learningRate == 0 && (unetLR ?? 0) == 0 && (textEncoderLR ?? []).allSatisfy({ $0 == 0 }) {
            warnings.append("learning_rate = 0\(rates.count > 1 ? " (and unet_lr / text_encoder_lr 0 or unset)" : ""): the LoRA will not change from its initial values (lora_up stays 0: the file does nothing)")
        }
    }

    // MARK: Network

    /// LyCORIS switches (lycoris/kohya.py) that select another computation when on; off (their default) they ask for nothing.
    static let lycorisSwitches = ["use_tucker", "use_scalar", "train_norm", "dora_wd", "bypass_mode", "rs_lora",
                                  "weight_decompose", "use_cp", "rank_dropout_scale"]

    /// kohya network_args names lora-dist does not implement, with what they do.
    static let unsupportedNetworkArgs: [String: String] = [
        "down_lr_weight": "per-block learning-rate weights", "mid_lr_weight": "per-block learning-rate weights",
        "up_lr_weight": "per-block learning-rate weights", "block_lr_zero_threshold": "per-block learning-rate weights",
        "block_dims": "per-block ranks", "block_alphas": "per-block alphas", "conv_block_dims": "per-block conv ranks",
        "conv_block_alphas": "per-block conv alphas", "loraplus_lr_ratio": "LoRA+ learning-rate ratios",
        "loraplus_unet_lr_ratio": "LoRA+ learning-rate ratios", "loraplus_text_encoder_lr_ratio": "LoRA+ learning-rate ratios",
    ]

    /// The network args parsed (kohya networks/lora.py `create_network`): conv_dim, conv_alpha, dropout,
    /// rank_dropout, module_dropout. An unknown or unimplemented arg is an error naming it.
    public var networkOptions: NetworkOptions {
        get throws { try parseNetwork().options }
    }

    /// The network options and what the parse ignored (kohya's create_network reads its kwargs with `.get`, so an
    /// arg it does not know is ignored; `dropout` in network_args is one of those for networks.lora).
    func parseNetwork() throws -> (options: NetworkOptions, warnings: [String]) {
            var warnings: [String] = []
            // kohya trains the text encoders unless network_train_unet_only; at text_encoder_lr 0 their parameter
            // groups are skipped ("NO LR skipping!"), so their modules keep lora_up = 0 and change nothing.
            let teFrozen = textEncoderLR.map { !$0.isEmpty && $0.allSatisfy { $0 == 0 } } ?? false
            if teFrozen && !networkTrainUnetOnly {
                warnings.append("text_encoder_lr = 0: kohya leaves the text encoders' modules at their initial values (no effect); lora-dist trains the UNet only and saves its modules")
            }
            var o = NetworkOptions(linearDim: networkDim, linearAlpha: networkAlpha, dropout: networkDropout,
                                   trainUNet: !networkTrainTextEncoderOnly, trainTextEncoder: !networkTrainUnetOnly && !teFrozen)
            let lycoris = networkModule == "lycoris.kohya"
            let known = ["conv_dim", "conv_alpha", "rank_dropout", "module_dropout"]
                + (lycoris ? ["algo", "preset", "dropout"] + Self.lycorisSwitches : [])
            var seen: Set<String> = []
            var algo = "lora"
            for arg in networkArgs {
                // kohya: key, value = net_arg.split("=", 1).
                let parts = arg.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).map {
                    String($0).trimmingCharacters(in: .whitespaces)
                }
                guard parts.count == 2, !parts[0].isEmpty else {
                    throw error("network_args", "entry \"\(arg)\" is not key=value (e.g. \"conv_dim=8\")")
                }
                let (k, v) = (parts[0], parts[1])
                if !seen.insert(k).inserted {
                    warnings.append("network_args sets \(k) twice; the last (\(v)) applies, as in kohya's dict")
                }
                func number() throws -> Double {
                    guard let d = Double(v), d.isFinite else {
                        throw error("network_args", "\(k)=\(v): \(v) is not a number")
                    }
                    return d
                }
                func rate() throws -> Double {
                    let d = try number()
                    guard (0..<1).contains(d) else { throw error("network_args", "\(k)=\(v): a dropout rate must be in [0, 1)") }
                    return d
                }
                switch k {
                case "conv_dim":
                    // kohya: int(conv_dim); Python's int() refuses "8.0".
                    guard let n = Int(v), n >= 1 else {
                        throw error("network_args", "conv_dim=\(v): the conv rank must be a positive integer")
                    }
                    o.convDim = n
                case "conv_alpha": o.convAlpha = try number()
                case "rank_dropout": o.rankDropout = try rate()
                case "module_dropout": o.moduleDropout = try rate()
                case "dropout" where lycoris:
                    // LyCORIS applies it only in bypass mode (locon.py), which is off by default.
                    if (Double(v) ?? 0) != 0 { warnings.append("network_args dropout=\(v): LyCORIS applies no dropout outside bypass mode; ignored, as there") }
                case "dropout":
                    warnings.append("network_args dropout=\(v): ignored — kohya's networks.lora reads network_dropout, not this arg (it is LyCORIS's)")
                case "algo" where lycoris:
                    // lycoris/wrapper.py: lora and locon are the same LoConModule; kohya's LoRA/LoCon math.
                    guard ["lora", "locon"].contains(v.lowercased()) else {
                        throw error("network_args", "algo=\(v): lora-dist trains LyCORIS's lora/locon only (the same math as networks.lora); \(v) (LoHa, LoKr, IA3, DyLoRA, …) is another adapter kind")
                    }
                    algo = v.lowercased()
                case "preset" where lycoris:
                    guard v == "full" else {
                        throw error("network_args", "preset=\(v): lora-dist trains LyCORIS's default preset \"full\" (kohya's targets with the ResBlock convs) only")
                    }
                case _ where lycoris && Self.lycorisSwitches.contains(k):
                    guard ["false", "0", "none"].contains(v.lowercased()) else {
                        throw error("network_args", "\(k)=\(v): a LyCORIS variant lora-dist does not implement (off by default) — remove it")
                    }
                default:
                    if let what = Self.unsupportedNetworkArgs[k] {
                        throw error("network_args", "\(k) is a kohya network arg lora-dist does not implement (\(what)) — remove it")
                    }
                    let guess = closestKey(to: k, in: known + Array(Self.unsupportedNetworkArgs.keys))
                    warnings.append("network_args \(k)=\(v): not an arg of kohya's networks.lora, which ignores it; so does lora-dist"
                        + (guess.map { " (did you mean \($0)?)" } ?? ""))
                }
            }
            if lycoris {
                // lycoris/kohya.py: the "full" preset always adapts ResBlocks, Downsample and Upsample; conv_dim and
                // conv_alpha default to network_dim and network_alpha (kohya's networks.lora: no convs, alpha 1).
                // network_dropout reaches LyCORIS as `dropout`, a no-op outside bypass mode; rank_dropout differs.
                if o.convDim == nil { o.convDim = networkDim }
                if o.convAlpha == nil { o.convAlpha = networkAlpha }
                if let d = networkDropout, d != 0 {
                    warnings.append("network_dropout \(d): LyCORIS (algo=\(algo)) applies no dropout outside bypass mode; ignored, as there")
                }
                o.dropout = nil
                if let r = o.rankDropout, r != 0 {
                    throw error("network_args", "rank_dropout=\(r): LyCORIS drops rows of the weight update (not kohya's per-sample ranks), which lora-dist does not implement — remove it")
                }
            }
            // kohya: conv_alpha defaults to 1.0 when conv_dim is given; conv_alpha alone does nothing there.
            if o.convDim != nil && o.convAlpha == nil { o.convAlpha = 1.0 }
            // LoRAModule (and LyCORIS's LoConModule): alpha None or 0 means alpha = the module's rank.
            if o.linearAlpha == 0 { o.linearAlpha = Double(networkDim) }
            if o.convAlpha == 0, let c = o.convDim { o.convAlpha = Double(c) }
            if o.convDim == nil && o.convAlpha != nil {
                throw error("network_args", "conv_alpha without conv_dim does nothing — add conv_dim (e.g. \"conv_dim=8\") or remove conv_alpha")
            }
            if let d = o.dropout, !(0..<1).contains(d) {
                throw error("network_dropout", "is \(d); a dropout rate must be in [0, 1)")
            }
            return (o, warnings)
    }
}
