import Distributed
import XCTest

final class MPITests: XCTestCase {
    /// Without a launcher the process is a world of one (MPI singleton); all-reduce is the identity.
    func testSingletonWorld() throws {
        let comm = try MPICommunicator()
        XCTAssertEqual(comm.rank, 0)
        XCTAssertEqual(comm.size, 1)
        var buffer: [Float] = [1.5, -2, 3.25]
        try comm.allReduceSum(&buffer)
        XCTAssertEqual(buffer, [1.5, -2, 3.25])
        var bytes: [UInt8] = [7, 8, 9]
        try comm.broadcast(&bytes, root: 0)
        XCTAssertEqual(bytes, [7, 8, 9])
        try comm.barrier()
    }
}
