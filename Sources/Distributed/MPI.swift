import CMPI
import Foundation

/// Open MPI, behind one file: the only one that imports CMPI. Errors name the MPI call.
public final class MPICommunicator: Communicator {
    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    public let rank: Int
    public let size: Int
    let comm: MPI_Comm
    /// A duplicate of `comm` for "are you there?" messages between waiting ranks (never mixed with the data).
    let control: MPI_Comm
    /// Seconds a wait may last before this rank stops, naming the ranks that did not arrive (nil: forever).
    public var timeout: Double?
    /// What the rank is waiting in, for messages (set by the caller: "the step 12 gradient all-reduce").
    public var waitingFor = "a collective"
    /// Collectives entered so far (the same count on every rank: they call them in one order).
    private(set) var sequence: Int64 = 0
    static let pingTag: Int32 = 1, answerTag: Int32 = 2

    static func check(_ rc: Int32, _ call: String) throws {
        guard rc == lora_mpi_success() else {
            var buf = [CChar](repeating: 0, count: 512)
            var len: Int32 = 0
            MPI_Error_string(rc, &buf, &len)
            throw Failure(description: "\(call) failed: \(String(cString: buf))")
        }
    }

    /// Whether MPI accepts calls from a thread other than the one that initialised it (one thread at a time).
    public let callsFromAnyThread: Bool

    /// Initialises MPI (once per process) and joins MPI_COMM_WORLD. Works without a launcher (world 1).
    public init() throws {
        var initialized: Int32 = 0
        MPI_Initialized(&initialized)
        // SERIALIZED: the overlapped gradient all-reduce calls MPI from its communication thread while the main thread
        // computes backward (never both at once).
        var provided: Int32 = 0
        if initialized == 0 {
            try Self.check(MPI_Init_thread(nil, nil, lora_mpi_thread_serialized(), &provided), "MPI_Init_thread")
        } else {
            MPI_Query_thread(&provided)
        }
        callsFromAnyThread = provided >= lora_mpi_thread_serialized()
        comm = lora_mpi_comm_world()
        var r: Int32 = 0, s: Int32 = 0
        try Self.check(MPI_Comm_rank(comm, &r), "MPI_Comm_rank")
        try Self.check(MPI_Comm_size(comm, &s), "MPI_Comm_size")
        rank = Int(r); size = Int(s)
        var dup: MPI_Comm? = nil
        try Self.check(MPI_Comm_dup(comm, &dup), "MPI_Comm_dup")
        control = dup!
    }

    /// Element-wise sum over ranks, in place (plain MPI_Allreduce: the `none` wire format's baseline). Buffers past
    /// MPI's 2^31−1 count go in chunks.
    public func allReduceSum(_ buffer: inout [Float]) throws {
        try buffer.withUnsafeMutableBufferPointer { p in
            for (start, n) in Self.chunks(p.count) {
                var request: MPI_Request? = nil
                try Self.check(MPI_Iallreduce(lora_mpi_in_place(), p.baseAddress! + start, n, lora_mpi_float(), lora_mpi_sum(),
                                              comm, &request), "MPI_Iallreduce")
                try complete(&request, "MPI_Iallreduce")
            }
        }
    }

    /// Rank `root`'s bytes to every rank (same count everywhere), in chunks of at most 2^30 bytes.
    public func broadcast(_ buffer: inout [UInt8], root: Int) throws {
        try buffer.withUnsafeMutableBufferPointer { p in
            for (start, n) in Self.chunks(p.count) {
                var request: MPI_Request? = nil
                try Self.check(MPI_Ibcast(p.baseAddress! + start, n, lora_mpi_byte(), Int32(root), comm, &request), "MPI_Ibcast")
                try complete(&request, "MPI_Ibcast")
            }
        }
    }

    /// (offset, count) pieces of at most 2^30 elements: every MPI count fits its Int32.
    static func chunks(_ total: Int) -> [(Int, Int32)] {
        let most = 1 << 30
        return stride(from: 0, to: total, by: most).map { ($0, Int32(min(most, total - $0))) }
    }

    public func barrier() throws {
        var request: MPI_Request? = nil
        try Self.check(MPI_Ibarrier(comm, &request), "MPI_Ibarrier")
        try complete(&request, "MPI_Ibarrier")
    }

    // MARK: waiting without spinning, with a deadline

    /// Waits for `request` like MPI_Wait, but: after 20 ms of polling it sleeps between tests (50 µs doubling to 1 ms:
    /// a rank waiting for a slower one costs no core), answers other ranks' "are you there?" meanwhile, and after
    /// `timeout` seconds throws, naming the ranks that did not answer. `peer`: the rank whose message this is.
    @discardableResult
    func complete(_ request: inout MPI_Request?, _ call: String, peer: Int? = nil, counted: Bool = true) throws -> MPI_Status {
        if counted { sequence += 1 }
        var status = MPI_Status(), flag: Int32 = 0
        let start = DispatchTime.now().uptimeNanoseconds
        var pause: UInt32 = 50
        while true {
            try Self.check(MPI_Test(&request, &flag, &status), call)
            if flag != 0 { return status }
            try answerPings()
            let waited = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
            if let timeout, timeout > 0, waited > timeout { throw try timedOut(call, waited: waited, peer: peer) }
            if waited > 0.02 {
                usleep(pause)
                pause = min(pause * 2, 1000)
            }
        }
    }

    /// Answers every pending "are you there?" with this rank's collective count.
    private func answerPings() throws {
        var flag: Int32 = 0, status = MPI_Status()
        while true {
            try Self.check(MPI_Iprobe(lora_mpi_any_source(), Self.pingTag, control, &flag, &status), "MPI_Iprobe")
            guard flag != 0 else { return }
            var asked: Int64 = 0, mine = sequence
            try Self.check(MPI_Recv(&asked, 1, lora_mpi_int64(), status.MPI_SOURCE, Self.pingTag, control, &status), "MPI_Recv(ping)")
            // 8 bytes go eagerly: MPI_Send returns at once, whatever the asking rank does next.
            try Self.check(MPI_Send(&mine, 1, lora_mpi_int64(), status.MPI_SOURCE, Self.answerTag, control), "MPI_Send(answer)")
        }
    }

    /// Asks every other rank whether it is waiting too (5 s for answers) and builds the error.
    private func timedOut(_ call: String, waited: Double, peer: Int?) throws -> Failure {
        var mine = sequence
        for r in 0..<size where r != rank {
            _ = MPI_Send(&mine, 1, lora_mpi_int64(), Int32(r), Self.pingTag, control)   // eager; a dead rank just stays silent
        }
        var answers: [Int: Int64] = [:]
        let deadline = Date().addingTimeInterval(5)
        while answers.count < size - 1 && Date() < deadline {
            var flag: Int32 = 0, status = MPI_Status()
            try Self.check(MPI_Iprobe(lora_mpi_any_source(), Self.answerTag, control, &flag, &status), "MPI_Iprobe")
            if flag != 0 {
                var theirs: Int64 = 0
                try Self.check(MPI_Recv(&theirs, 1, lora_mpi_int64(), status.MPI_SOURCE, Self.answerTag, control, &status),
                               "MPI_Recv(answer)")
                answers[Int(status.MPI_SOURCE)] = theirs
            } else {
                try answerPings()
                usleep(1000)
            }
        }
        let silent = (0..<size).filter { $0 != rank && answers[$0] == nil }
        let elsewhere = answers.filter { $0.value != mine }.keys.sorted()
        var text = "rank \(rank): no progress for \(Int(waited)) s in \(waitingFor) (\(call)"
            + (peer.map { ", waiting for rank \($0)'s message" } ?? "") + "). "
        if silent.isEmpty {
            text += "Every rank answered while waiting"
                + (elsewhere.isEmpty ? "" : "; rank(s) \(elsewhere.map(String.init).joined(separator: ", ")) at collective #\(elsewhere.map { String(answers[$0]!) }.joined(separator: ", ")), this rank at #\(mine) (point-to-point waits inside the gradient ring are not counted): if they are all still waiting, the ranks disagree on the order of collectives — a lora-dist bug, please report it)")
        } else {
            text += "Rank(s) \(silent.map(String.init).joined(separator: ", ")) did not answer: stopped (SIGSTOP, a suspended job), hung, dead, or still computing a step longer than the timeout"
        }
        text += ". The limit (\(Int((timeout ?? 0).rounded())) s) is [lora_dist] collective_timeout plus twice the slowest step so far; states already written are intact"
        return Failure(description: text)
    }

    /// Ends every rank of the job with `code` (MPI_Abort): for a failure on one rank that would otherwise leave the
    /// others waiting forever in a collective.
    public func abort(code: Int32) -> Never {
        MPI_Abort(comm, code)
        exit(code)
    }

    /// Ends MPI for this process; call once, at exit.
    public func finalize() throws {
        var finalized: Int32 = 0
        MPI_Finalized(&finalized)
        if finalized == 0 { try Self.check(MPI_Finalize(), "MPI_Finalize") }
    }
}

// MARK: - Point-to-point, gather and integer reductions (for the compressed gradient all-reduce).
//
// Nonblocking operations copy or own their memory in an allocation that lives until `wait()`: MPI reads
// (Isend) or writes (Irecv) the buffer after the call returns, which a Swift array's scoped pointer does not
// allow. Every pointer stays in this file; callers see byte arrays.
extension MPICommunicator {
    /// Element-wise sum or max of Int64 values over ranks; every rank passes the same count.
    public func allReduce(_ values: [Int64], op: ReductionOp) throws -> [Int64] {
        var buffer = values
        let n = try Self.mpiCount(values.count, "MPI_Allreduce(Int64)")
        let mpiOp = op == .sum ? lora_mpi_sum() : lora_mpi_max()
        try buffer.withUnsafeMutableBufferPointer { p in
            var request: MPI_Request? = nil
            try Self.check(MPI_Iallreduce(lora_mpi_in_place(), p.baseAddress, n, lora_mpi_int64(), mpiOp, comm, &request),
                           "MPI_Iallreduce(Int64)")
            try complete(&request, "MPI_Iallreduce(Int64)")
        }
        return buffer
    }

    static func mpiCount(_ n: Int, _ what: String) throws -> Int32 {
        guard n >= 0, n <= Int(Int32.max) else {
            throw Failure(description: "\(what): \(n) bytes exceeds MPI's 2^31-1 element count; use smaller chunks")
        }
        return Int32(n)
    }

    /// Gives up on a request that did not complete (a timeout, or a pending operation dropped on an error path)
    /// without blocking: cancel, then free the handle. MPI may still read (a send) or write (a receive) the buffer
    /// afterwards, so the caller leaks it rather than freeing it; this happens once, on the way to ending the run.
    static func abandon(_ request: inout MPI_Request?) {
        guard let r = request, r != lora_mpi_request_null() else { return }
        _ = MPI_Cancel(&request)
        _ = MPI_Request_free(&request)
    }

    /// True when `request` completed (MPI_Test once, never blocks); false if it is still in flight or the test failed.
    static func completed(_ request: inout MPI_Request?) -> Bool {
        var flag: Int32 = 0, status = MPI_Status()
        return MPI_Test(&request, &flag, &status) == lora_mpi_success() && flag != 0
    }

    /// An MPI_Isend in flight. Owns a copy of the message until `wait()` completes it. Never blocks outside `wait()`:
    /// dropped unfinished (an error elsewhere in the exchange), it is abandoned and its buffer leaked — waiting in
    /// deinit for a peer that is gone would hang the rank past its collective timeout.
    public final class PendingSend: PendingSendRequest {
        private var request: MPI_Request?
        private let storage: UnsafeMutableRawBufferPointer
        private var done = false

        private unowned let owner: MPICommunicator
        private let peer: Int

        fileprivate init(bytes: [UInt8], to: Int, tag: Int, owner: MPICommunicator) throws {
            self.owner = owner
            peer = to
            let comm = owner.comm
            let n = try MPICommunicator.mpiCount(bytes.count, "MPI_Isend")
            storage = .allocate(byteCount: max(bytes.count, 1), alignment: 16)
            bytes.withUnsafeBytes { storage.copyMemory(from: $0) }
            var req: MPI_Request? = nil
            let rc = MPI_Isend(storage.baseAddress, n, lora_mpi_byte(), Int32(to), Int32(tag), comm, &req)
            if rc != lora_mpi_success() {
                storage.deallocate()
                done = true
                try MPICommunicator.check(rc, "MPI_Isend")
            }
            request = req
        }

        /// Blocks (sleeping, with the communicator's timeout) until MPI no longer needs the buffer.
        public func wait() throws {
            guard !done else { return }
            done = true
            do {
                try owner.complete(&request, "MPI_Isend", peer: peer, counted: false)
            } catch {
                MPICommunicator.abandon(&request)
                throw error
            }
            storage.deallocate()
        }

        deinit {
            guard !done else { return }
            if MPICommunicator.completed(&request) { storage.deallocate() } else { MPICommunicator.abandon(&request) }
        }
    }

    /// An MPI_Irecv in flight into an owned buffer of `capacity` bytes; `wait()` returns the bytes received.
    /// Dropped unfinished, it is cancelled without blocking (see PendingSend).
    public final class PendingReceive: PendingReceiveRequest {
        private var request: MPI_Request?
        private let storage: UnsafeMutableRawBufferPointer
        private var done = false

        private unowned let owner: MPICommunicator
        private let peer: Int

        fileprivate init(capacity: Int, from: Int, tag: Int, owner: MPICommunicator) throws {
            self.owner = owner
            peer = from
            let comm = owner.comm
            let n = try MPICommunicator.mpiCount(capacity, "MPI_Irecv")
            storage = .allocate(byteCount: max(capacity, 1), alignment: 16)
            var req: MPI_Request? = nil
            let rc = MPI_Irecv(storage.baseAddress, n, lora_mpi_byte(), Int32(from), Int32(tag), comm, &req)
            if rc != lora_mpi_success() {
                storage.deallocate()
                done = true
                try MPICommunicator.check(rc, "MPI_Irecv")
            }
            request = req
        }

        /// Blocks until the message arrived; a message longer than the capacity is an MPI_ERR_TRUNCATE error.
        public func wait() throws -> [UInt8] {
            guard !done else { throw MPICommunicator.Failure(description: "PendingReceive.wait called twice") }
            done = true
            var status: MPI_Status
            do {
                status = try owner.complete(&request, "MPI_Irecv", peer: peer, counted: false)
            } catch {
                MPICommunicator.abandon(&request)
                throw error
            }
            defer { storage.deallocate() }
            var count: Int32 = 0
            try MPICommunicator.check(MPI_Get_count(&status, lora_mpi_byte(), &count), "MPI_Get_count")
            return Array(UnsafeRawBufferPointer(rebasing: storage[0..<Int(count)]))
        }

        deinit {
            guard !done else { return }
            if MPICommunicator.completed(&request) { storage.deallocate() } else { MPICommunicator.abandon(&request) }
        }
    }

    /// A message with `tag` from any rank, if one has arrived (MPI_Iprobe, then MPI_Recv of what it found).
    public func poll(tag: Int) throws -> (from: Int, bytes: [UInt8])? {
        var flag: Int32 = 0, status = MPI_Status()
        try Self.check(MPI_Iprobe(lora_mpi_any_source(), Int32(tag), comm, &flag, &status), "MPI_Iprobe")
        guard flag != 0 else { return nil }
        var count: Int32 = 0
        try Self.check(MPI_Get_count(&status, lora_mpi_byte(), &count), "MPI_Get_count")
        let source = status.MPI_SOURCE
        var bytes = [UInt8](repeating: 0, count: max(Int(count), 1))
        try bytes.withUnsafeMutableBytes { p in
            try Self.check(MPI_Recv(p.baseAddress, count, lora_mpi_byte(), source, Int32(tag), comm, &status), "MPI_Recv")
        }
        return (Int(source), Array(bytes.prefix(Int(count))))
    }

    /// Nonblocking send; the message is copied, so `bytes` may change right after.
    public func isend(_ bytes: [UInt8], to: Int, tag: Int = 0) throws -> any PendingSendRequest {
        try PendingSend(bytes: bytes, to: to, tag: tag, owner: self)
    }

    /// Nonblocking receive of at most `capacity` bytes from rank `from`.
    public func ireceive(capacity: Int, from: Int, tag: Int = 0) throws -> any PendingReceiveRequest {
        try PendingReceive(capacity: capacity, from: from, tag: tag, owner: self)
    }

    /// Every rank's byte buffer, in rank order, on every rank (MPI_Allgatherv; sizes may differ per rank).
    public func allGather(_ bytes: [UInt8]) throws -> [[UInt8]] {
        let sizes = try allGatherSizes(bytes.count)
        var displs = [Int32](), counts = [Int32](), total = 0
        for s in sizes {
            displs.append(try Self.mpiCount(total, "MPI_Allgatherv displacement"))
            counts.append(try Self.mpiCount(s, "MPI_Allgatherv count"))
            total += s
        }
        _ = try Self.mpiCount(total, "MPI_Allgatherv total")
        var out = [UInt8](repeating: 0, count: max(total, 1))
        let n = Int32(bytes.count)
        // Every buffer an MPI_Iallgatherv reads or writes stays pinned until it completes.
        try bytes.withUnsafeBytes { src in
            try out.withUnsafeMutableBytes { dst in
                try counts.withUnsafeBufferPointer { c in
                    try displs.withUnsafeBufferPointer { d in
                        var request: MPI_Request? = nil
                        try Self.check(MPI_Iallgatherv(src.baseAddress, n, lora_mpi_byte(), dst.baseAddress, c.baseAddress,
                                                       d.baseAddress, lora_mpi_byte(), comm, &request), "MPI_Iallgatherv")
                        try complete(&request, "MPI_Iallgatherv")
                    }
                }
            }
        }
        return (0..<size).map { r in Array(out[Int(displs[r])..<(Int(displs[r]) + sizes[r])]) }
    }

    private func allGatherSizes(_ mine: Int) throws -> [Int] {
        var all = [Int64](repeating: 0, count: size)
        var me = [Int64(mine)]
        try me.withUnsafeMutableBufferPointer { m in
            try all.withUnsafeMutableBufferPointer { p in
                var request: MPI_Request? = nil
                try Self.check(MPI_Iallgather(m.baseAddress, 1, lora_mpi_int64(), p.baseAddress, 1, lora_mpi_int64(), comm, &request),
                               "MPI_Iallgather(sizes)")
                try complete(&request, "MPI_Iallgather(sizes)")
            }
        }
        return all.map(Int.init)
    }
}
