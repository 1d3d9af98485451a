import Foundation

/// What the training loop needs from its ranks: collectives, and the point-to-point messages of the ring all-reduce.
/// `MPICommunicator` is the real one (one process per rank, any launcher); `LocalGroup` runs ranks as threads of one
/// process, so the loop and its collectives are testable without mpirun.
public protocol Communicator: AnyObject, FlagReducer {
    var rank: Int { get }
    var size: Int { get }
    /// Seconds a wait may last before the rank stops with an error naming the ranks that did not arrive (nil: forever).
    var timeout: Double? { get set }
    /// What the rank is waiting in, for that error ("step 12").
    var waitingFor: String { get set }
    /// Whether another thread may make this rank's calls (one thread at a time): the overlapped all-reduce needs it.
    var callsFromAnyThread: Bool { get }
    func barrier() throws
    /// Rank `root`'s bytes to every rank (same count everywhere).
    func broadcast(_ buffer: inout [UInt8], root: Int) throws
    /// Element-wise sum over ranks, in place.
    func allReduceSum(_ buffer: inout [Float]) throws
    /// Element-wise sum or max of Int64 values over ranks; every rank passes the same count.
    func allReduce(_ values: [Int64], op: ReductionOp) throws -> [Int64]
    /// Every rank's bytes (any length), in rank order.
    func allGather(_ bytes: [UInt8]) throws -> [[UInt8]]
    /// Nonblocking send; the bytes are owned by the request until `wait()`.
    func isend(_ bytes: [UInt8], to: Int, tag: Int) throws -> any PendingSendRequest
    /// Nonblocking receive of at most `capacity` bytes.
    func ireceive(capacity: Int, from: Int, tag: Int) throws -> any PendingReceiveRequest
    /// A message with `tag` from any rank if one has arrived (never waits); nil otherwise.
    func poll(tag: Int) throws -> (from: Int, bytes: [UInt8])?
}

public enum ReductionOp: Sendable { case sum, max }

public protocol PendingSendRequest: AnyObject { func wait() throws }
public protocol PendingReceiveRequest: AnyObject { func wait() throws -> [UInt8] }

public struct CommunicatorFailure: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// N ranks as threads of one process, sharing memory: every collective is an all-gather through one exchange slot
/// (the last rank to arrive publishes the round), and messages queue per (from, to, tag). Reductions add in rank
/// order, so results are the same on every rank.
public final class LocalGroup: @unchecked Sendable {
    public let size: Int
    private let cond = NSCondition()
    private var slots: [[UInt8]?]
    private var arrived = 0
    private var generation = 0
    private var published: [[UInt8]] = []
    private struct Route: Hashable { let from: Int, to: Int, tag: Int }
    private var mailboxes: [Route: [[UInt8]]] = [:]

    public init(size: Int) {
        precondition(size >= 1, "a group needs at least one rank")
        self.size = size
        slots = Array(repeating: nil, count: size)
    }

    /// Rank `rank`'s communicator (one per thread; it keeps the group alive).
    public func communicator(rank: Int) -> LocalCommunicator {
        precondition((0..<size).contains(rank), "rank \(rank) outside 0..<\(size)")
        return LocalCommunicator(group: self, rank: rank)
    }

    /// Runs `body` on every rank, each on its own thread, and returns their results in rank order; rethrows the
    /// first rank's error.
    public func run<T>(_ body: @escaping (LocalCommunicator) throws -> T) throws -> [T] {
        let results = RankResults<T>(size)
        let done = DispatchGroup()
        for r in 0..<size {
            done.enter()
            let comm = self.communicator(rank: r)
            let thread = Thread {
                results.set(r, Result { try body(comm) })
                done.leave()
            }
            thread.stackSize = 64 << 20
            thread.start()
        }
        done.wait()
        return try results.values.map { try $0!.get() }
    }

    func gather(rank: Int, _ bytes: [UInt8]) -> [[UInt8]] {
        cond.lock()
        defer { cond.unlock() }
        let round = generation
        slots[rank] = bytes
        arrived += 1
        if arrived == size {
            published = slots.map { $0! }
            slots = Array(repeating: nil, count: size)
            arrived = 0
            generation += 1
            cond.broadcast()
        } else {
            while generation == round { cond.wait() }
        }
        // `published` is replaced only when every rank has deposited into the next round, i.e. after this read.
        return published
    }

    func post(_ bytes: [UInt8], from: Int, to: Int, tag: Int) {
        cond.lock()
        mailboxes[Route(from: from, to: to, tag: tag), default: []].append(bytes)
        cond.broadcast()
        cond.unlock()
    }

    func takeAny(to: Int, tag: Int) -> (from: Int, bytes: [UInt8])? {
        cond.lock()
        defer { cond.unlock() }
        for from in 0..<size {
            let route = Route(from: from, to: to, tag: tag)
            if let queue = mailboxes[route], !queue.isEmpty { return (from, mailboxes[route]!.removeFirst()) }
        }
        return nil
    }

    func take(from: Int, to: Int, tag: Int) -> [UInt8] {
        cond.lock()
        defer { cond.unlock() }
        let route = Route(from: from, to: to, tag: tag)
        while mailboxes[route]?.isEmpty ?? true { cond.wait() }
        return mailboxes[route]!.removeFirst()
    }
}

/// Per-rank results of `LocalGroup.run`, written from the ranks' threads.
private final class RankResults<T>: @unchecked Sendable {
    let lock = NSLock()
    var values: [Result<T, Error>?]
    init(_ n: Int) { values = Array(repeating: nil, count: n) }
    func set(_ r: Int, _ v: Result<T, Error>) { lock.lock(); values[r] = v; lock.unlock() }
}

/// One rank of a `LocalGroup`.
public final class LocalCommunicator: Communicator {
    public let rank: Int
    /// Threads of one process cannot stall apart from it: kept for the protocol, not used.
    public var timeout: Double?
    public var waitingFor = "a collective"
    public var size: Int { group.size }
    public var callsFromAnyThread: Bool { true }
    let group: LocalGroup

    init(group: LocalGroup, rank: Int) {
        self.group = group
        self.rank = rank
    }

    public func barrier() throws { _ = group.gather(rank: rank, []) }

    public func broadcast(_ buffer: inout [UInt8], root: Int) throws {
        let all = group.gather(rank: rank, rank == root ? buffer : [])
        guard all[root].count == buffer.count else {
            throw CommunicatorFailure("broadcast: rank \(rank) expects \(buffer.count) bytes, root \(root) sent \(all[root].count)")
        }
        buffer = all[root]
    }

    public func allReduceSum(_ buffer: inout [Float]) throws {
        let all = group.gather(rank: rank, buffer.withUnsafeBytes { Array($0) })
        var sum = [Float](repeating: 0, count: buffer.count)
        for bytes in all {
            guard bytes.count == 4 * buffer.count else { throw CommunicatorFailure("allReduceSum: ranks pass different counts") }
            bytes.withUnsafeBytes { raw in
                let v = raw.bindMemory(to: Float.self)
                for i in 0..<sum.count { sum[i] += v[i] }
            }
        }
        buffer = sum
    }

    public func allReduce(_ values: [Int64], op: ReductionOp) throws -> [Int64] {
        let all = group.gather(rank: rank, values.withUnsafeBytes { Array($0) }).map { bytes in
            bytes.withUnsafeBytes { Array($0.bindMemory(to: Int64.self)) }
        }
        guard all.allSatisfy({ $0.count == values.count }) else { throw CommunicatorFailure("allReduce: ranks pass different counts") }
        return (0..<values.count).map { i in
            op == .sum ? all.reduce(0) { $0 + $1[i] } : all.map { $0[i] }.max()!
        }
    }

    public func allGather(_ bytes: [UInt8]) throws -> [[UInt8]] { group.gather(rank: rank, bytes) }

    final class Sent: PendingSendRequest { func wait() throws {} }
    final class Receiving: PendingReceiveRequest {
        let take: () -> [UInt8]
        let capacity: Int
        init(capacity: Int, take: @escaping () -> [UInt8]) { self.capacity = capacity; self.take = take }
        func wait() throws -> [UInt8] {
            let bytes = take()
            guard bytes.count <= capacity else {
                throw CommunicatorFailure("receive: \(bytes.count) bytes arrived for a \(capacity)-byte buffer")
            }
            return bytes
        }
    }

    public func isend(_ bytes: [UInt8], to: Int, tag: Int) throws -> any PendingSendRequest {
        group.post(bytes, from: rank, to: to, tag: tag)
        return Sent()
    }

    public func poll(tag: Int) throws -> (from: Int, bytes: [UInt8])? { group.takeAny(to: rank, tag: tag) }

    public func ireceive(capacity: Int, from: Int, tag: Int) throws -> any PendingReceiveRequest {
        let (group, me) = (self.group, rank)
        return Receiving(capacity: capacity) { group.take(from: from, to: me, tag: tag) }
    }
}
