import Distributed
import Foundation

/// An optimizer over the trainer's flat parameter buffer (layout: `ParameterLayout`).
public protocol Optimizer: AnyObject {
    var name: String { get }
    /// One update of `parameters` from `gradients` (same layout), with each group's learning rate for this step.
    func step(parameters: inout [Float], gradients: [Float], learningRates: [Double])
    /// Everything needed to continue bit-identically after a restart (moments, step counts, Prodigy's d, ...).
    func stateBlobs() -> StateBlobList
    /// Replaces the state with saved blobs; errors name the missing/mis-sized blob.
    func restore(_ blobs: [String: [UInt8]]) throws
    /// The learning rate actually applied per group (Prodigy: d·lr; Adafactor relative step: its computed lr) for logs.
    func effectiveLearningRates(_ learningRates: [Double]) -> [Double]
    /// Throws when these per-group learning rates cannot be used (Prodigy: different non-zero lrs).
    /// `step` stops with the same message, so the trainer should call this once before training.
    func validate(learningRates: [Double]) throws
}

extension Optimizer {
    public func validate(learningRates: [Double]) throws {}
}

public enum Optimizers {
    /// kohya `--optimizer_type` spellings accepted (compared case-insensitively, as kohya lowercases them).
    public static let supported: [String] = ["AdamW", "AdamW8bit", "Lion", "Prodigy", "Adafactor"]

    /// kohya `--optimizer_type` + `--optimizer_args` ("key=value"; values like "0.9,0.99" are tuples, "True"/"False" bools).
    /// Unknown type or arg -> error naming it and listing what is accepted.
    /// `baseLearningRate` is kohya's `--learning_rate` (the `lr=` given to the optimizer's constructor); only
    /// Lion's `decoupled_weight_decay=True` needs it (lion_pytorch divides weight decay by that initial lr).
    public static func make(type: String, args: [String], layout: ParameterLayout,
                            baseLearningRate: Double? = nil) throws -> Optimizer {
        let parsed = try OptimizerArgs(args)
        switch type.lowercased() {
        case "", "adamw": return try AdamW(layout: layout, args: parsed)
        case "adamw8bit": return try AdamW8bit(layout: layout, args: parsed)
        case "lion": return try Lion(layout: layout, args: parsed, baseLearningRate: baseLearningRate)
        case "prodigy": return try Prodigy(layout: layout, args: parsed)
        case "adafactor": return try Adafactor(layout: layout, args: parsed)
        default:
            throw OptimizerError(
                "--optimizer_type '\(type)' is not supported; use one of \(supported.joined(separator: ", "))")
        }
    }
}

// MARK: - optimizer_args

/// One `--optimizer_args` value as kohya reads it with `ast.literal_eval`.
enum OptimizerArgValue: Equatable, CustomStringConvertible {
    case number(Double)
    case bool(Bool)
    case none
    case string(String)
    case tuple([OptimizerArgValue])

    var description: String {
        switch self {
        case .number(let v): return "\(v)"
        case .bool(let b): return b ? "True" : "False"
        case .none: return "None"
        case .string(let s): return "'\(s)'"
        case .tuple(let t): return "(" + t.map(\.description).joined(separator: ", ") + ")"
        }
    }
}

/// Parsed `key=value` optimizer arguments; each optimizer takes out the keys it knows and then calls
/// `finish` so any key left over is reported with the accepted list.
struct OptimizerArgs {
    private(set) var values: [String: OptimizerArgValue] = [:]
    private var order: [String] = []
    private let raw: [String: String]

    init(_ args: [String]) throws {
        var raw: [String: String] = [:]
        for arg in args {
            // kohya: key, value = arg.split("="), so exactly one '='
            let parts = arg.split(separator: "=", omittingEmptySubsequences: false)
            guard parts.count == 2, !parts[0].trimmingCharacters(in: .whitespaces).isEmpty else {
                throw OptimizerError("--optimizer_args entry '\(arg)' is not key=value (e.g. weight_decay=0.01)")
            }
            let key = parts[0].trimmingCharacters(in: .whitespaces)
            let text = String(parts[1])
            guard let value = OptimizerArgs.literal(text) else {
                throw OptimizerError(
                    "--optimizer_args \(key)='\(text)' is not a number, True/False, None or a tuple like 0.9,0.99")
            }
            values[key] = value
            raw[key] = text
            order.append(key)
        }
        self.raw = raw
    }

    /// A subset of Python literals: numbers, True/False, None, quoted strings, tuples/lists of them.
    static func literal(_ text: String) -> OptimizerArgValue? {
        var s = text.trimmingCharacters(in: .whitespaces)
        if (s.hasPrefix("(") && s.hasSuffix(")")) || (s.hasPrefix("[") && s.hasSuffix("]")) {
            s = String(s.dropFirst().dropLast())
            let items = s.split(separator: ",", omittingEmptySubsequences: true)
                .map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
            var out: [OptimizerArgValue] = []
            for item in items {
                // nested tuples are not an optimizer argument kohya's optimizers take
                guard let v = literal(item) else { return nil }
                if case .tuple = v { return nil }
                out.append(v)
            }
            return .tuple(out)
        }
        if s.contains(",") {
            // ast.literal_eval("0.9,0.99") is a tuple
            return literal("(" + s + ")")
        }
        switch s {
        case "True": return .bool(true)
        case "False": return .bool(false)
        case "None": return OptimizerArgValue.none
        default: break
        }
        if s.count >= 2, (s.hasPrefix("'") && s.hasSuffix("'")) || (s.hasPrefix("\"") && s.hasSuffix("\"")) {
            return .string(String(s.dropFirst().dropLast()))
        }
        if s.lowercased() == "inf" || s.lowercased() == "nan" { return nil }  // Python needs float('inf')
        if let d = Double(s.replacingOccurrences(of: "_", with: "")) { return .number(d) }
        return nil
    }

    private mutating func take(_ key: String) -> OptimizerArgValue? {
        values.removeValue(forKey: key)
    }

    mutating func double(_ key: String, _ def: Double) throws -> Double {
        guard let v = take(key) else { return def }
        switch v {
        case .number(let d): return d
        case .bool(let b): return b ? 1 : 0  // Python bools are ints
        default: throw OptimizerError("--optimizer_args \(key)=\(raw[key] ?? "") must be a number")
        }
    }

    mutating func optionalDouble(_ key: String, _ def: Double?) throws -> Double? {
        guard let v = take(key) else { return def }
        switch v {
        case .number(let d): return d
        case .none: return nil
        default: throw OptimizerError("--optimizer_args \(key)=\(raw[key] ?? "") must be a number or None")
        }
    }

    mutating func int(_ key: String, _ def: Int) throws -> Int {
        guard let v = take(key) else { return def }
        guard case .number(let d) = v, d == d.rounded(), abs(d) < 1e15 else {
            throw OptimizerError("--optimizer_args \(key)=\(raw[key] ?? "") must be an integer")
        }
        return Int(d)
    }

    mutating func bool(_ key: String, _ def: Bool) throws -> Bool {
        guard let v = take(key) else { return def }
        switch v {
        case .bool(let b): return b
        case .number(let d) where d == 0 || d == 1: return d == 1
        default: throw OptimizerError("--optimizer_args \(key)=\(raw[key] ?? "") must be True or False")
        }
    }

    mutating func doubles(_ key: String, _ def: [Double], counts: ClosedRange<Int>) throws -> [Double] {
        guard let v = take(key) else { return def }
        guard case .tuple(let items) = v, counts.contains(items.count) else {
            throw OptimizerError(
                "--optimizer_args \(key)=\(raw[key] ?? "") must be a tuple of \(counts.lowerBound == counts.upperBound ? "\(counts.lowerBound)" : "\(counts.lowerBound)-\(counts.upperBound)") numbers, e.g. \(key)=\(def.map { "\($0)" }.joined(separator: ","))")
        }
        return try items.map {
            guard case .number(let d) = $0 else {
                throw OptimizerError("--optimizer_args \(key)=\(raw[key] ?? "") must contain only numbers")
            }
            return d
        }
    }

    func has(_ key: String) -> Bool { values[key] != nil }

    /// Fails on any argument the optimizer did not take, listing those it accepts.
    func finish(optimizer: String, accepted: [String]) throws {
        if let unknown = order.first(where: { values[$0] != nil }) {
            throw OptimizerError(
                "--optimizer_args '\(unknown)' is not an argument of \(optimizer); accepted: "
                    + accepted.joined(separator: ", "))
        }
    }
}

// MARK: - state blobs

/// Little-endian byte images of state arrays, and the size checks `restore` makes.
enum StateBlob {
    /// Floats as stored (little-endian bit patterns) without a copy where the host is little-endian.
    static func raw(_ values: [Float]) -> any ContiguousBytes {
        #if _endian(little)
        return FloatBlob(values)
        #else
        return bytes(values)
        #endif
    }

    static func bytes(_ values: [Float]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: values.count * 4)
        out.withUnsafeMutableBytes { dst in
            for (i, v) in values.enumerated() { dst.storeBytes(of: v.bitPattern.littleEndian, toByteOffset: i * 4, as: UInt32.self) }
        }
        return out
    }

    static func bytes(_ values: [Double]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: values.count * 8)
        out.withUnsafeMutableBytes { dst in
            for (i, v) in values.enumerated() { dst.storeBytes(of: v.bitPattern.littleEndian, toByteOffset: i * 8, as: UInt64.self) }
        }
        return out
    }

    static func bytes(_ values: [Int64]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: values.count * 8)
        out.withUnsafeMutableBytes { dst in
            for (i, v) in values.enumerated() { dst.storeBytes(of: v.littleEndian, toByteOffset: i * 8, as: Int64.self) }
        }
        return out
    }

    private static func blob(_ blobs: [String: [UInt8]], _ name: String, bytes: Int, optimizer: String) throws -> [UInt8] {
        guard let b = blobs[name] else {
            throw OptimizerError(
                "\(optimizer) state: blob '\(name)' is missing (have: \(blobs.keys.sorted().joined(separator: ", "))); "
                    + "the saved state is from another optimizer or incomplete")
        }
        guard b.count == bytes else {
            throw OptimizerError(
                "\(optimizer) state: blob '\(name)' has \(b.count) bytes, expected \(bytes); "
                    + "the saved state is from a different network layout or optimizer configuration")
        }
        return b
    }

    static func floats(_ blobs: [String: [UInt8]], _ name: String, count: Int, optimizer: String) throws -> [Float] {
        let b = try blob(blobs, name, bytes: count * 4, optimizer: optimizer)
        return b.withUnsafeBytes { src in
            (0..<count).map { Float(bitPattern: UInt32(littleEndian: src.loadUnaligned(fromByteOffset: $0 * 4, as: UInt32.self))) }
        }
    }

    static func doubles(_ blobs: [String: [UInt8]], _ name: String, count: Int, optimizer: String) throws -> [Double] {
        let b = try blob(blobs, name, bytes: count * 8, optimizer: optimizer)
        return b.withUnsafeBytes { src in
            (0..<count).map { Double(bitPattern: UInt64(littleEndian: src.loadUnaligned(fromByteOffset: $0 * 8, as: UInt64.self))) }
        }
    }

    static func int64s(_ blobs: [String: [UInt8]], _ name: String, count: Int, optimizer: String) throws -> [Int64] {
        let b = try blob(blobs, name, bytes: count * 8, optimizer: optimizer)
        return b.withUnsafeBytes { src in
            (0..<count).map { Int64(littleEndian: src.loadUnaligned(fromByteOffset: $0 * 8, as: Int64.self)) }
        }
    }

    static func raw(_ blobs: [String: [UInt8]], _ name: String, count: Int, optimizer: String) throws -> [UInt8] {
        try blob(blobs, name, bytes: count, optimizer: optimizer)
    }
}

/// Checks the buffers handed to `step` against the layout (a mismatch is a trainer bug).
@inline(__always)
func checkStepInputs(_ optimizer: String, layout: ParameterLayout, parameters: Int, gradients: Int, learningRates: Int) {
    precondition(parameters == layout.totalCount && gradients == layout.totalCount,
                 "\(optimizer).step: parameters (\(parameters)) and gradients (\(gradients)) must both have the layout's \(layout.totalCount) elements")
    precondition(learningRates == layout.groupNames.count,
                 "\(optimizer).step: \(learningRates) learning rates for \(layout.groupNames.count) groups \(layout.groupNames)")
}
