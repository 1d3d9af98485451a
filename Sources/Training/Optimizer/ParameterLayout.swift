import Foundation
import Tensor

/// Where each trainable LoRA tensor lives in the trainer's one flat fp32 parameter buffer (and in the
/// gradient buffer, which has the same layout). Entries are contiguous, in order, without gaps.
public struct ParameterLayout: Sendable {
    public struct Entry: Sendable, Equatable {
        /// kohya key, e.g. `lora_unet_..._to_q.lora_down.weight`.
        public let name: String
        /// `[r, in]`, `[out, r]`, `[r, in, k, k]`, `[out, r, 1, 1]`, or `[]` for a scalar.
        public let shape: [Int]
        /// First element of this tensor in the flat buffer.
        public let offset: Int
        /// Parameter group (0 = U-Net, 1 = text encoder, ...): selects the learning rate.
        public let group: Int
        public var count: Int { shape.reduce(1, *) }

        public init(name: String, shape: [Int], offset: Int, group: Int) {
            self.name = name
            self.shape = shape
            self.offset = offset
            self.group = group
        }
    }

    public let entries: [Entry]
    public let groupNames: [String]
    public var totalCount: Int

    /// Validates that the entries tile `0..<totalCount` in order and that every group index names a
    /// group. A bad layout is a programming error in the trainer, so it stops with a message saying
    /// which entry is wrong.
    public init(entries: [Entry], groupNames: [String]) {
        do {
            try ParameterLayout.validate(entries: entries, groupNames: groupNames)
        } catch {
            fatalError("ParameterLayout: \(error)")
        }
        self.entries = entries
        self.groupNames = groupNames
        self.totalCount = entries.last.map { $0.offset + $0.count } ?? 0
    }

    /// Builds a layout from shapes, assigning offsets in order.
    public init(tensors: [(name: String, shape: [Int], group: Int)], groupNames: [String]) {
        var offset = 0
        var entries: [Entry] = []
        for t in tensors {
            entries.append(Entry(name: t.name, shape: t.shape, offset: offset, group: t.group))
            offset += t.shape.reduce(1, *)
        }
        self.init(entries: entries, groupNames: groupNames)
    }

    /// The checks `init(entries:groupNames:)` makes, as a throwing function for callers that would
    /// rather report than stop.
    public static func validate(entries: [Entry], groupNames: [String]) throws {
        var expectedOffset = 0
        var names = Set<String>()
        for (i, e) in entries.enumerated() {
            if e.shape.contains(where: { $0 <= 0 }) {
                throw OptimizerError("entry \(i) '\(e.name)' has shape \(e.shape); every dimension must be > 0")
            }
            if e.offset != expectedOffset {
                throw OptimizerError(
                    "entry \(i) '\(e.name)' starts at offset \(e.offset) but the previous entries end at "
                        + "\(expectedOffset); entries must be contiguous, in order, without overlap")
            }
            if e.group < 0 || e.group >= groupNames.count {
                throw OptimizerError(
                    "entry \(i) '\(e.name)' is in group \(e.group) but there are \(groupNames.count) groups "
                        + "(\(groupNames))")
            }
            if !names.insert(e.name).inserted {
                throw OptimizerError("entry \(i) '\(e.name)' appears twice in the layout")
            }
            expectedOffset += e.count
        }
    }

    /// Indices of the entries of `group`, in layout order.
    public func entries(inGroup group: Int) -> [Entry] { entries.filter { $0.group == group } }
}

/// An optimizer, schedule or argument problem, with a message that says what to change.
public struct OptimizerError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Runs `body` for every index in `0..<count`, on at most `Threads.count` threads (a rank's share of the node under
/// mpirun, not every core). Each call touches only its own entry's elements and writes its own slot of any per-entry
/// result, so the outcome does not depend on how many threads run it. Entries are dealt round-robin: neighbouring
/// entries differ most in size (down, up), so each thread gets a mix.
func forEachEntryConcurrently(_ count: Int, _ body: (Int) -> Void) {
    let threads = min(Threads.count, count)
    if threads <= 1 {
        for i in 0..<count { body(i) }
        return
    }
    DispatchQueue.concurrentPerform(iterations: threads) { t in
        for i in stride(from: t, to: count, by: threads) { body(i) }
    }
}
