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

    static func check(_ rc: Int32, _ call: String) throws {
        guard rc == lora_mpi_success() else {
            var buf = [CChar](repeating: 0, count: 512)
            var len: Int32 = 0
            MPI_Error_string(rc, &buf, &len)
            throw Failure(description: "\(call) failed: \(String(cString: buf))")
        }
    }

    /// Initialises MPI (once per process) and joins MPI_COMM_WORLD. Works without a launcher (world 1).
    public init() throws {
        var initialized: Int32 = 0
        MPI_Initialized(&initialized)
        if initialized == 0 {
            var provided: Int32 = 0
            try Self.check(MPI_Init_thread(nil, nil, lora_mpi_thread_funneled(), &provided), "MPI_Init_thread")
        }
        comm = lora_mpi_comm_world()
        var r: Int32 = 0, s: Int32 = 0
        try Self.check(MPI_Comm_rank(comm, &r), "MPI_Comm_rank")
        try Self.check(MPI_Comm_size(comm, &s), "MPI_Comm_size")
        rank = Int(r); size = Int(s)
    }

    /// Element-wise sum over ranks, in place (plain MPI_Allreduce: the `none` wire format's baseline). Buffers past
    /// MPI's 2^31−1 count go in chunks.
    public func allReduceSum(_ buffer: inout [Float]) throws {
        try buffer.withUnsafeMutableBufferPointer { p in
            for (start, n) in Self.chunks(p.count) {
                try Self.check(MPI_Allreduce(lora_mpi_in_place(), p.baseAddress! + start, n, lora_mpi_float(), lora_mpi_sum(), comm),
                               "MPI_Allreduce")
            }
        }
    }

    /// Rank `root`'s bytes to every rank (same count everywhere), in chunks of at most 2^30 bytes.
    public func broadcast(_ buffer: inout [UInt8], root: Int) throws {
        try buffer.withUnsafeMutableBufferPointer { p in
            for (start, n) in Self.chunks(p.count) {
                try Self.check(MPI_Bcast(p.baseAddress! + start, n, lora_mpi_byte(), Int32(root), comm), "MPI_Bcast")
            }
        }
    }

    /// (offset, count) pieces of at most 2^30 elements: every MPI count fits its Int32.
    static func chunks(_ total: Int) -> [(Int, Int32)] {
        let most = 1 << 30
        return stride(from: 0, to: total, by: most).map { ($0, Int32(min(most, total - $0))) }
    }

    public func barrier() throws { try Self.check(MPI_Barrier(comm), "MPI_Barrier") }

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
            try Self.check(MPI_Allreduce(lora_mpi_in_place(), p.baseAddress, n, lora_mpi_int64(), mpiOp, comm),
                           "MPI_Allreduce(Int64)")
        }
        return buffer
    }

    static func mpiCount(_ n: Int, _ what: String) throws -> Int32 {
        guard n >= 0, n <= Int(Int32.max) else {
            throw Failure(description: "\(what): \(n) bytes exceeds MPI's 2^31-1 element count; use smaller chunks")
        }
        return Int32(n)
    }

    /// Blocking send of `bytes` to rank `to`.
    public func send(_ bytes: [UInt8], to: Int, tag: Int = 0) throws {
        let n = try Self.mpiCount(bytes.count, "MPI_Send")
        try bytes.withUnsafeBytes { p in
            try Self.check(MPI_Send(p.baseAddress, n, lora_mpi_byte(), Int32(to), Int32(tag), comm), "MPI_Send")
        }
    }

    /// Blocking receive of one message from rank `from`, whatever its length (MPI_Probe sizes it).
    public func receive(from: Int, tag: Int = 0) throws -> [UInt8] {
        var status = MPI_Status()
        try Self.check(MPI_Probe(Int32(from), Int32(tag), comm, &status), "MPI_Probe")
        var count: Int32 = 0
        try Self.check(MPI_Get_count(&status, lora_mpi_byte(), &count), "MPI_Get_count")
        var out = [UInt8](repeating: 0, count: Int(count))
        try out.withUnsafeMutableBytes { p in
            try Self.check(MPI_Recv(p.baseAddress, count, lora_mpi_byte(), Int32(from), Int32(tag), comm, &status),
                           "MPI_Recv")
        }
        return out
    }

    /// An MPI_Isend in flight. Owns a copy of the message until `wait()` (or deinit, which waits).
    public final class PendingSend: PendingSendRequest {
        private var request: MPI_Request?
        private let storage: UnsafeMutableRawBufferPointer
        private var done = false

        fileprivate init(bytes: [UInt8], to: Int, tag: Int, comm: MPI_Comm) throws {
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

        /// Blocks until MPI no longer needs the buffer.
        public func wait() throws {
            guard !done else { return }
            done = true
            var status = MPI_Status()
            defer { storage.deallocate() }
            try MPICommunicator.check(MPI_Wait(&request, &status), "MPI_Wait(send)")
        }

        deinit { try? wait() }
    }

    /// An MPI_Irecv in flight into an owned buffer of `capacity` bytes; `wait()` returns the bytes received.
    public final class PendingReceive: PendingReceiveRequest {
        private var request: MPI_Request?
        private let storage: UnsafeMutableRawBufferPointer
        private var done = false

        fileprivate init(capacity: Int, from: Int, tag: Int, comm: MPI_Comm) throws {
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
            defer { storage.deallocate() }
            var status = MPI_Status()
            try MPICommunicator.check(MPI_Wait(&request, &status), "MPI_Wait(receive)")
            var count: Int32 = 0
            try MPICommunicator.check(MPI_Get_count(&status, lora_mpi_byte(), &count), "MPI_Get_count")
            return Array(UnsafeRawBufferPointer(rebasing: storage[0..<Int(count)]))
        }

        deinit {
            if !done { done = true; var status = MPI_Status(); MPI_Wait(&request, &status); storage.deallocate() }
        }
    }

    /// Nonblocking send; the message is copied, so `bytes` may change right after.
    public func isend(_ bytes: [UInt8], to: Int, tag: Int = 0) throws -> any PendingSendRequest {
        try PendingSend(bytes: bytes, to: to, tag: tag, comm: comm)
    }

    /// Nonblocking receive of at most `capacity` bytes from rank `from`.
    public func ireceive(capacity: Int, from: Int, tag: Int = 0) throws -> any PendingReceiveRequest {
        try PendingReceive(capacity: capacity, from: from, tag: tag, comm: comm)
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
        try bytes.withUnsafeBytes { src in
            try out.withUnsafeMutableBytes { dst in
                try Self.check(MPI_Allgatherv(src.baseAddress, n, lora_mpi_byte(), dst.baseAddress, counts, displs,
                                              lora_mpi_byte(), comm), "MPI_Allgatherv")
            }
        }
        return (0..<size).map { r in Array(out[Int(displs[r])..<(Int(displs[r]) + sizes[r])]) }
    }

    private func allGatherSizes(_ mine: Int) throws -> [Int] {
        var all = [Int64](repeating: 0, count: size)
        var me = Int64(mine)
        try all.withUnsafeMutableBufferPointer { p in
            try Self.check(MPI_Allgather(&me, 1, lora_mpi_int64(), p.baseAddress, 1, lora_mpi_int64(), comm),
                           "MPI_Allgather(sizes)")
        }
        return all.map(Int.init)
    }
}
