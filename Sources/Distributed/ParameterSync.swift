import Base
import Foundation

/// Keeps the ranks' trainable parameters identical: rank 0's initial LoRA weights and optimizer state go to
/// every rank at start (or on resume), and every N steps a cheap check compares a hash of the parameters
/// across ranks — ranks that silently diverged (a non-deterministic kernel, a bit flip, a bug in the
/// all-reduce) would otherwise train N different models while reporting one.
public struct ParameterSync {
    public struct Diverged: Error, CustomStringConvertible {
        public let step: Int
        public let hashes: [UInt64]
        public var description: String {
            let groups = Dictionary(grouping: hashes.indices, by: { hashes[$0] })
            let majority = groups.max { $0.value.count < $1.value.count }!.key
            let odd = hashes.indices.filter { hashes[$0] != majority }
            return "ranks diverged at step \(step): the trainable parameters of rank(s) \(odd.map(String.init).joined(separator: ", ")) "
                + "differ from the others (hashes \(hashes.map { String($0, radix: 16) }.joined(separator: ", "))). "
                + "Training stops: resume from the last checkpoint; if it recurs, report it with the config."
        }
    }

    public let communicator: any Communicator
    /// Check every `every` steps (0: never).
    public let every: Int

    public init(communicator: any Communicator, every: Int = 100) {
        self.communicator = communicator
        self.every = every
    }

    /// Overwrites `values` on every rank with rank 0's (same count on every rank, checked).
    public func broadcastFromRankZero(_ values: inout [Float]) throws {
        let counts = try communicator.allReduce([Int64(values.count), -Int64(values.count)], op: .max)
        guard counts[0] == -counts[1] else {
            throw CommunicatorFailure("broadcast of parameters: ranks hold different counts (\(-counts[1])…\(counts[0]) floats)")
        }
        var bytes = values.withUnsafeBytes { Array($0) }
        try communicator.broadcast(&bytes, root: 0)
        values = bytes.withUnsafeBytes { Array($0.bindMemory(to: Float.self)) }
    }

    /// FNV-1a over the floats' bit patterns: equal iff bit-identical (up to 64-bit collisions).
    public static func hash(_ values: [Float]) -> UInt64 { FNV1a64.hash(values) }

    /// At steps that are multiples of `every`: throws `Diverged` (on every rank) unless all ranks hold
    /// bit-identical `values`. A collective: every rank must call it at the same steps.
    public func check(_ values: [Float], step: Int) throws {
        guard every > 0, step % every == 0 else { return }
        let mine = Self.hash(values)
        let all = try communicator.allGather(withUnsafeBytes(of: mine.littleEndian) { Array($0) })
        let hashes = all.map { bytes in bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) } }
        if Set(hashes).count > 1 { throw Diverged(step: step, hashes: hashes) }
    }
}
