import XCTest
import TestSupport

/// oneDNN's GNU OpenMP threads must sleep between calls, not spin: libvips loads libgomp at program start (through
/// libimagequant), so the CDNNL shim re-executes the program from its preinit array with OMP_WAIT_POLICY=PASSIVE
/// (Sources/CDNNL/shim.c). What libgomp itself parsed is read back with its own OMP_DISPLAY_ENV=verbose report:
/// GOMP_SPINCOUNT is 0 for PASSIVE, 300000 for GOMP's default, 3·10¹⁰ for ACTIVE (libgomp env.c).
final class OpenMPWaitPolicyTests: XCTestCase {
    private func spinCount(_ environment: [String: String]) throws -> String {
        let r = try TestProcesses.run(try TestProcesses.executable("lora-dist"), ["info"],
                                      environment: environment.merging(["OMP_DISPLAY_ENV": "verbose"]) { a, _ in a },
                                      unsetting: ["OMP_WAIT_POLICY", "GOMP_SPINCOUNT"])
        XCTAssertEqual(r.status, 0, r.output)
        XCTAssertTrue(r.output.contains("OpenBLAS kernel:"), "info ran once to the end: \(r.output)")
        let lines = r.output.split(separator: "\n").filter { $0.contains("GOMP_SPINCOUNT") }
        XCTAssertEqual(lines.count, 1, "libgomp reports once (one process image that ran to the end): \(r.output)")
        return lines.first.map { String($0).trimmingCharacters(in: .whitespaces) } ?? ""
    }

    func testOneDNNThreadsSleepBetweenCalls() throws {
        XCTAssertEqual(try spinCount([:]), "GOMP_SPINCOUNT = '0'")
    }

    func testTheUsersPolicyWins() throws {
        XCTAssertEqual(try spinCount(["OMP_WAIT_POLICY": "active"]), "GOMP_SPINCOUNT = '30000000000'")
    }
}
