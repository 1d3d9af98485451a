import CMPI
import Foundation

/// Open MPI, behind one file: the only one that imports CMPI. Errors name the MPI call.
public final class MPICommunicator {
    public struct Failure: Error, CustomStringConvertible {
        public let description: String
    }

    public let rank: Int
    public let size: Int
    private let comm: MPI_Comm

    private static func check(_ rc: Int32, _ call: String) throws {
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

    /// Element-wise sum over ranks, in place (plain MPI_Allreduce: the `none` wire format's baseline).
    public func allReduceSum(_ buffer: inout [Float]) throws {
        let n = Int32(buffer.count)
        try buffer.withUnsafeMutableBufferPointer { p in
            try Self.check(MPI_Allreduce(lora_mpi_in_place(), p.baseAddress, n, lora_mpi_float(), lora_mpi_sum(), comm),
                           "MPI_Allreduce")
        }
    }

    /// Rank `root`'s bytes to every rank (same count everywhere).
    public func broadcast(_ buffer: inout [UInt8], root: Int) throws {
        let n = Int32(buffer.count)
        try buffer.withUnsafeMutableBufferPointer { p in
            try Self.check(MPI_Bcast(p.baseAddress, n, lora_mpi_byte(), Int32(root), comm), "MPI_Bcast")
        }
    }

    public func barrier() throws { try Self.check(MPI_Barrier(comm), "MPI_Barrier") }

    /// Ends MPI for this process; call once, at exit.
    public func finalize() throws {
        var finalized: Int32 = 0
        MPI_Finalized(&finalized)
        if finalized == 0 { try Self.check(MPI_Finalize(), "MPI_Finalize") }
    }
}
