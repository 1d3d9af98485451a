import Base
import Foundation
import SafeTensors
import Tensor

/// Where a model's weights come from: a checkpoint file, tensors in memory, or a seeded random
/// initialiser (for `make-model` and tests). `shape` is what the module expects; a source returns its own
/// tensor (the binder checks the shape) or nil when it has no such key.
public protocol WeightSource {
    func tensor(_ key: String, expectedShape: [Int]) throws -> Tensor?
    /// Every key the source holds (for the strict "unknown keys" check).
    var keys: [String] { get }
    /// Names the source in error messages (a path, "random weights", …).
    var sourceName: String { get }
}

extension SafeTensorsFile: WeightSource {
    public func tensor(_ key: String, expectedShape: [Int]) throws -> Tensor? {
        entries[key] == nil ? nil : try tensor(key)
    }
    public var keys: [String] { names }
    public var sourceName: String { path }
}

/// Tensors held in memory under their canonical keys.
public struct TensorDictionary: WeightSource {
    public var tensors: [String: Tensor]
    public let sourceName: String
    public init(_ tensors: [String: Tensor], name: String = "tensors in memory") {
        self.tensors = tensors
        self.sourceName = name
    }
    public func tensor(_ key: String, expectedShape: [Int]) throws -> Tensor? { tensors[key] }
    public var keys: [String] { tensors.keys.sorted() }
}

/// Deterministic random weights for any key: the same (seed, key) always gives the same tensor, so a
/// model made twice is identical. Norm scales are 1 + small noise, biases small, matrices ~N(0, 1/fan_in)
/// — a random model whose activations stay in a realistic range through dozens of blocks.
public struct RandomWeights: WeightSource {
    public let seed: UInt64
    public let dtype: DType
    public init(seed: UInt64, dtype: DType = .f32) { self.seed = seed; self.dtype = dtype }
    public var keys: [String] { [] }
    public var sourceName: String { "random weights (seed \(seed))" }

    public func tensor(_ key: String, expectedShape shape: [Int]) throws -> Tensor? {
        let s = FNV1a64.hash(key) ^ (seed &* 0x9E37_79B9_7F4A_7C15)   // the key's hash mixed with the seed
        let leaf = key.split(separator: ".").last.map(String.init) ?? key
        // Every 1-D `weight` in these models is a norm's scale (GroupNorm/LayerNorm), also where the key does not say
        // "norm" (LDM's ResBlock `in_layers.0`, `out_layers.0` and the UNet's `out.0`): a scale near 0 there would
        // silence every ResBlock branch and the UNet's output.
        let t: Tensor
        if (leaf == "weight" || leaf == "scale") && shape.count == 1 {
            t = Elementwise.add(Tensor(randomNormal: shape, std: 0.05, seed: s), Tensor(shape: [1], [1]))
        } else if leaf == "bias" || shape.count == 1 {
            t = Tensor(randomNormal: shape, std: 0.02, seed: s)
        } else {
            let fanIn = shape.count >= 2 ? shape.dropFirst().reduce(1, *) : shape[0]
            let embedding = key.contains("embedding") || key.hasSuffix("positional_embedding")
            t = Tensor(randomNormal: shape, std: embedding ? 0.02 : 1 / Float(fanIn).squareRoot(), seed: s)
        }
        return dtype == .f32 ? t : t.converted(to: dtype)
    }
}

/// A model's load problems, all at once: missing keys, keys nobody asked for, and shape mismatches.
public struct WeightLoadError: Error, CustomStringConvertible {
    public let source: String
    public let missing: [String]
    public let unexpected: [String]
    public let mismatched: [(key: String, expected: [Int], found: [Int])]

    public var description: String {
        func list(_ keys: [String]) -> String {
            let shown = keys.prefix(12).map { "  \($0)" }.joined(separator: "\n")
            return keys.count > 12 ? shown + "\n  … and \(keys.count - 12) more" : shown
        }
        var parts = ["\(source) does not match the model being built:"]
        if !missing.isEmpty { parts.append("\(missing.count) missing key(s):\n" + list(missing)) }
        if !unexpected.isEmpty { parts.append("\(unexpected.count) unexpected key(s):\n" + list(unexpected)) }
        if !mismatched.isEmpty {
            parts.append("\(mismatched.count) shape mismatch(es):\n" + list(mismatched.map { "\($0.key): model wants \($0.expected), file has \($0.found)" }))
        }
        return parts.joined(separator: "\n")
    }
}

/// Binds weights to modules as they are built, so the module tree is the key tree. It records every key
/// asked for (with its shape): that list is the strict-load check, the list `make-model` writes, and
/// the names LoRA adapters are derived from.
public final class WeightBinder {
    public let source: WeightSource
    public private(set) var bound: [(key: String, tensor: Tensor)] = []
    private var boundKeys: Set<String> = []
    private var missing: [String] = []
    private var mismatched: [(key: String, expected: [Int], found: [Int])] = []
    private var failure: Error?
    /// Every Linear/Conv2d built on this binder, in construction order (PyTorch's named_modules order, since
    /// modules are built in their parents' order). LoRA networks are generated from this record.
    public private(set) var layers: [AdaptableLayer] = []
    /// Scope path → the kind of block built there (kohya picks LoRA targets by the enclosing module's class).
    private var containers: [String: AdaptableLayer.Container] = [:]

    public init(_ source: WeightSource) { self.source = source }

    private static let copyLock = NSLock()
    nonisolated(unsafe) private static var copied = 0
    /// Bytes of bf16 copies made of frozen fp32/fp16 weights in this process (what the bf16 family costs in memory
    /// for a file not stored in bf16; 0 for a bf16 file, which is used as mapped).
    public static var bf16CopyBytes: Int { copyLock.lock(); defer { copyLock.unlock() }; return copied }
    static func countBF16Copy(_ bytes: Int) { copyLock.lock(); copied += bytes; copyLock.unlock() }

    /// Records a layer, tagged with its innermost enclosing container.
    func record(path: String, weightKey: String, kind: AdaptableLayer.Kind) {
        var container = AdaptableLayer.Container.other
        var scope = Substring(path)
        while let dot = scope.lastIndex(of: ".") {
            scope = scope[..<dot]
            if let c = containers[String(scope)] { container = c; break }
        }
        layers.append(AdaptableLayer(path: path, weightKey: weightKey, kind: kind, container: container))
    }

    /// The recorded layers whose path is under `prefix`.
    public func layers(under prefix: String) -> [AdaptableLayer] {
        layers.filter { $0.path.hasPrefix(prefix + ".") }
    }

    func tag(_ path: String, _ container: AdaptableLayer.Container) { containers[path] = container }

    /// The scope at the root of the key space, or under `prefix`.
    public func scope(_ prefix: String = "") -> WeightScope { WeightScope(binder: self, path: prefix) }

    func take(_ key: String, shape: [Int]) -> Tensor {
        precondition(!boundKeys.contains(key), "weight \(key) bound twice: two modules claim one key")
        boundKeys.insert(key)
        do {
            guard var t = try source.tensor(key, expectedShape: shape) else {
                missing.append(key)
                return Tensor(zeros: shape)
            }
            guard t.shape == shape else {
                mismatched.append((key, shape, t.shape))
                return Tensor(zeros: shape)
            }
            // The bf16 family reads a matrix or kernel in bf16: an fp32/fp16 file's is rounded once here (the mapped
            // original is then never touched), not on every use. Embedding tables, norms and biases stay as stored.
            if Kernels.family == .bf16, t.dtype != .bf16, t.rank == 2 || t.rank == 4, key.hasSuffix(".weight"),
               !key.contains("embedding") {
                t = t.converted(to: .bf16)
                WeightBinder.countBF16Copy(t.count * 2)
            }
            bound.append((key, t))
            return t
        } catch {
            if failure == nil { failure = error }
            return Tensor(zeros: shape)
        }
    }

    /// Throws if anything was missing or mis-shaped, or if the source holds keys under `prefixes` that no
    /// module asked for (unless `ignorable` says they are known to be harmless).
    public func finish(checkingUnusedUnder prefixes: [String], ignorable: (String) -> Bool = { _ in false }) throws {
        if let failure { throw failure }
        let unexpected = source.keys.filter { key in
            !boundKeys.contains(key) && prefixes.contains { key.hasPrefix($0) } && !ignorable(key)
        }
        if !missing.isEmpty || !mismatched.isEmpty || !unexpected.isEmpty {
            throw WeightLoadError(source: source.sourceName, missing: missing, unexpected: unexpected, mismatched: mismatched)
        }
    }
}

/// A position in the key tree: `scope["in_layers.0"].tensor("weight", [320])` binds
/// `<path>.in_layers.0.weight`.
public struct WeightScope {
    let binder: WeightBinder
    public let path: String

    public subscript(_ child: String) -> WeightScope {
        WeightScope(binder: binder, path: path.isEmpty ? child : "\(path).\(child)")
    }

    public subscript(_ index: Int) -> WeightScope { self[String(index)] }

    /// The frozen weight `<path>.<name>` of the given shape (kept in the file's dtype, not copied).
    public func tensor(_ name: String, _ shape: [Int]) -> Tensor {
        binder.take(path.isEmpty ? name : "\(path).\(name)", shape: shape)
    }

    public func key(_ name: String) -> String { path.isEmpty ? name : "\(path).\(name)" }

    /// This scope, recorded as a block of `container`'s kind: layers built below it are tagged with it.
    public func container(_ container: AdaptableLayer.Container) -> WeightScope {
        binder.tag(path, container)
        return self
    }

    /// Every layer built below this scope so far, in construction order.
    public var layers: [AdaptableLayer] { binder.layers(under: path) }

    func record(weightKey: String, kind: AdaptableLayer.Kind) { binder.record(path: path, weightKey: weightKey, kind: kind) }
}

/// A layer adapters can attach to (LoRA), as recorded when it was built: its path (weight key prefix), the key
/// of its weight, its shape, and the kind of block it sits in (kohya picks LoRA targets by the enclosing
/// module's class: Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D in the UNet; CLIPAttention and
/// CLIPMLP in the text encoders).
public struct AdaptableLayer: Equatable, Sendable {
    public enum Kind: Equatable, Sendable {
        case linear(inFeatures: Int, outFeatures: Int)
        case conv(inChannels: Int, outChannels: Int, kernel: Int, stride: Int, padding: Int)
    }
    public enum Container: String, Sendable {
        case transformer, resBlock, downsample, upsample, attention, mlp, other
    }
    public let path: String
    /// `<path>.weight`, or the fused key a layer reads (OpenCLIP's `attn.in_proj_weight`).
    public let weightKey: String
    public let kind: Kind
    public let container: Container
}

/// Every key's tensor is a bf16 view of the same anonymous read-only mapping: binding a model costs
/// address space only (pages are never touched, so never allocated), for tests that need a full-size
/// model's key space and shapes but never run it.
public struct SharedZeroWeights: WeightSource {
    final class Mapping {
        let bytes: UnsafeRawBufferPointer
        init(byteCount: Int) {
            let p = mmap(nil, byteCount, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
            precondition(p != nil && p != MAP_FAILED, "mmap of \(byteCount) bytes failed")
            bytes = UnsafeRawBufferPointer(start: p, count: byteCount)
        }
        deinit { munmap(UnsafeMutableRawPointer(mutating: bytes.baseAddress), bytes.count) }
    }
    let mapping: Mapping
    let storage: Storage
    public init(byteCount: Int) {
        mapping = Mapping(byteCount: byteCount)
        storage = Storage(borrowing: mapping.bytes, owner: mapping)
    }
    public var keys: [String] { [] }
    public var sourceName: String { "shared zero weights" }
    public func tensor(_ key: String, expectedShape: [Int]) throws -> Tensor? {
        Tensor(shape: expectedShape, dtype: .bf16, storage: storage, byteOffset: 0)
    }
}
