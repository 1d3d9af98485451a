/// A value in a computation: a tensor plus whether gradients must flow to it.
///
/// Leaves are made with `Var(tensor)` (a constant, e.g. a frozen base weight or an input) or
/// `Var(tensor, requiresGrad: true)` (a trainable parameter such as a LoRA matrix). Every operation on a
/// `Tape` returns a new `Var` that requires a gradient iff one of its inputs does.
public final class Var {
    public let value: Tensor
    public let requiresGrad: Bool
    public var shape: [Int] { value.shape }

    public init(_ value: Tensor, requiresGrad: Bool = false) {
        self.value = value
        self.requiresGrad = requiresGrad
    }
}

/// Gradients, kept apart from the tensors they belong to (candle's GradStore).
public struct GradStore {
    private var entries: [ObjectIdentifier: (owner: Var, grad: Tensor)] = [:]

    public init() {}

    public subscript(_ v: Var) -> Tensor? { entries[ObjectIdentifier(v)]?.grad }

    public var count: Int { entries.count }

    /// Adds `g` into the gradient of `v` (out of place: `g` may alias another tensor).
    public mutating func accumulate(_ v: Var, _ g: Tensor) {
        precondition(g.shape == v.shape, "gradient shape \(g.shape) does not match its value's \(v.shape)")
        let key = ObjectIdentifier(v)
        if let old = entries[key] {
            entries[key] = (v, Elementwise.add(old.grad, g))
        } else {
            entries[key] = (v, g)
        }
    }

    mutating func take(_ v: Var) -> Tensor? { entries.removeValue(forKey: ObjectIdentifier(v))?.grad }
}

/// Extra computation attached to named layers (LoRA adapters): a layer at `path` hands its input and its own output
/// to `adapt`, which returns the output to use. Layers name themselves by their weight key prefix, so adapters are
/// addressed in the checkpoint's key space.
public protocol LayerAdapters: AnyObject {
    func adapt(_ t: Tape, path: String, input: Var, output: Var) -> Var
    /// A linear layer's whole computation, when the adapter fuses it with its own (nil: the layer computes its output
    /// and then calls `adapt`).
    func linear(_ t: Tape, path: String, input: Var, weight: Var, bias: Var?) -> Var?
}

extension LayerAdapters {
    public func linear(_ t: Tape, path: String, input: Var, weight: Var, bias: Var?) -> Var? { nil }
}

/// Reverse-mode autograd: a list of recorded operations, run backwards once.
///
/// Only operations with an input that requires a gradient are recorded, and each records exactly what
/// its backward needs. A tape with `recording == false` computes values (and `requiresGrad` flags) but
/// saves nothing: that is how checkpointed blocks run their first forward.
public final class Tape {
    /// A recorded operation: `backward` gets dL/d(output) and which inputs need a gradient, and returns
    /// the gradient of each input (nil where not needed).
    private struct Node {
        let output: Var
        let inputs: [Var]
        let backward: (Tensor, [Bool]) -> [Tensor?]
    }

    private var nodes: [Node] = []
    /// Checkpointed blocks, which route gradients to Vars they captured, not only to their inputs.
    private var blocks: [ObjectIdentifier: (Tensor) -> GradStore] = [:]
    public let recording: Bool
    /// Adapters the layers run through on this tape (nil: plain model). Checkpointed blocks run theirs too.
    public var adapters: LayerAdapters?
    /// The tape a checkpointed block's quiet first forward runs under (its positions are that tape's).
    private let parent: Tape?

    public init(recording: Bool = true, adapters: LayerAdapters? = nil) {
        self.recording = recording
        self.adapters = adapters
        parent = nil
    }

    private init(quietUnder parent: Tape) {
        recording = false
        adapters = parent.adapters
        self.parent = parent
    }

    /// Number of recorded operations (for tests and diagnostics).
    public var recordedCount: Int { nodes.count }

    /// Where the forward pass is on the outermost recording tape: the index the next recorded operation gets. Inside a
    /// checkpointed block's first forward it is the block's own index. `backward`'s `progress` counts down through
    /// these: once it reports `remaining ≤ p`, every Var used at position ≥ p has its final gradient (GradientBuckets).
    public var position: Int { parent?.position ?? nodes.count }

    /// Wraps the result of an op. Records `backward` only if some input requires a gradient.
    public func record(_ value: Tensor, inputs: [Var], backward: @escaping (Tensor, [Bool]) -> [Tensor?]) -> Var {
        let needsGrad = inputs.contains { $0.requiresGrad }
        let out = Var(value, requiresGrad: needsGrad)
        if recording && needsGrad { nodes.append(Node(output: out, inputs: inputs, backward: backward)) }
        return out
    }

    /// Runs the tape backwards from `output`, seeded with `seed` (default: ones, for a scalar loss).
    /// The tape is consumed: saved activations are released as their nodes are processed. Returns the
    /// gradients of every Var that requires one and was not produced on this tape (the leaves).
    ///
    /// `progress(remaining, grads)` runs after each operation: `remaining` operations are left, and `grads` holds every
    /// gradient found so far (a leaf used only at positions ≥ `remaining` has its final one: see `position`).
    public func backward(from output: Var, seed: Tensor? = nil, progress: (Int, GradStore) -> Void = { _, _ in }) -> GradStore {
        var grads = GradStore()
        guard output.requiresGrad else { return grads }
        let seed = seed ?? Tensor(shape: output.shape, [Float](repeating: 1, count: output.value.count))
        grads.accumulate(output, seed)
        while let node = nodes.popLast() {
            defer { progress(nodes.count, grads) }
            guard let dOut = grads.take(node.output) else { continue }
            if let block = blocks.removeValue(forKey: ObjectIdentifier(node.output)) {
                for (v, g) in block(dOut).all { grads.accumulate(v, g) }
                continue
            }
            let needs = node.inputs.map(\.requiresGrad)
            let dIns = node.backward(dOut, needs)
            for (i, input) in node.inputs.enumerated() where needs[i] {
                guard let g = dIns[i] else { preconditionFailure("an op returned no gradient for an input that needs one") }
                grads.accumulate(input, g)
            }
        }
        blocks.removeAll()
        return grads
    }

    /// Gradient checkpointing: runs `body` without saving its activations, and runs it again during
    /// backward to get them. Trainable Vars that `body` captures (LoRA weights) get their gradients too.
    public func checkpoint(_ inputs: [Var], _ body: @escaping (Tape, [Var]) -> Var) -> Var {
        guard recording else { return body(self, inputs) }
        let adapters = self.adapters
        let quiet = Tape(quietUnder: self)
        let first = body(quiet, inputs)
        guard first.requiresGrad else { return first }
        let out = Var(first.value, requiresGrad: true)
        nodes.append(Node(output: out, inputs: inputs, backward: { _, _ in [] }))
        blocks[ObjectIdentifier(out)] = { dOut in
            let replay = Tape(adapters: adapters)
            let fresh = inputs.map { Var($0.value, requiresGrad: $0.requiresGrad) }
            let again = body(replay, fresh)
            var sub = replay.backward(from: again, seed: dOut)
            var routed = GradStore()
            for (orig, copy) in zip(inputs, fresh) { if let g = sub.take(copy) { routed.accumulate(orig, g) } }
            for (v, g) in sub.all { routed.accumulate(v, g) }
            return routed
        }
        return out
    }
}

extension GradStore {
    /// (Var, gradient) pairs, in no particular order.
    public var all: [(Var, Tensor)] { entries.values.map { ($0.owner, $0.grad) } }
}
