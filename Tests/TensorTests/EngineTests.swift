import Tensor
import XCTest

final class EngineTests: XCTestCase {
    /// The engine loads OpenBLAS on the kernel it asked for, even when the environment carries another
    /// OPENBLAS_CORETYPE (this project's machines export `Haswell`).
    func testOpenBLASRunsTheRequestedKernel() throws {
        guard let requested = BLAS.requestedCore() else { throw XCTSkip("no kernel preference on this CPU") }
        XCTAssertEqual(BLAS.coreName.lowercased(), requested.lowercased())
    }

    /// Threads.set drives the engine's loops and OpenBLAS together.
    func testThreadsSetsEngineAndBLAS() {
        let before = Threads.count
        defer { Threads.set(before) }
        Threads.set(1)
        XCTAssertEqual(Threads.count, 1)
        XCTAssertEqual(BLAS.threads, 1)
        Threads.set(2)
        XCTAssertEqual(Threads.count, 2)
        XCTAssertEqual(BLAS.threads, 2)
    }
}
