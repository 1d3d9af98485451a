import Distributed
import Foundation
import TestSupport
import XCTest

/// Multi-rank tests of GradientAllReduce: each spawns `mpirun -np N --oversubscribe MPIHarness check`, which
/// runs every wire format (none, fp32, bf16) × algorithm (ring, allGather, auto) × size (0, 1, 2, 5, 7, 1000,
/// 10007 — not multiples of the world size or the piece size) × sample pattern (1,2,3… and 3,0,1: a rank
/// with a short or empty batch) and exits nonzero on the first failed check:
/// - all ranks hold bit-identical results (hash all-gather);
/// - every format within tolerance of the exact weighted average (double): 1e-5 relative to the weighted
///   magnitude for none/fp32, 1e-2 for bf16 — this checks the weighting itself;
/// - fp32 and bf16 bit-equal to the reference sum Σ Float(s_q)·x_q in the algorithm's fixed order (ring:
///   chunk c summed in ring order c, c+1, …; all-gather: rank order), x_q = bf16 rounding for bf16;
/// - bf16 error feedback: over 100 steps of a gradient bf16 rounds the same way, the running sum stays
///   within 0.01 of the exact one with feedback and drifts past 0.05 without;
/// - total samples 0 and ranks disagreeing on the size are refused with a named error.
final class AllReduceTests: XCTestCase {
    /// np = nil: the harness alone, with no launcher (an MPI singleton: world of one).
    func runHarness(np: Int?, mode: String = "check") throws {
        let (status, output) = try TestProcesses.run(try TestProcesses.executable("MPIHarness"), [mode], ranks: np, timeout: 120)
        XCTAssertEqual(status, 0, "mpirun -np \(np ?? 1) MPIHarness \(mode) failed:\n\(output)")
        XCTAssertTrue(output.contains("OK np=\(np ?? 1) "), "no OK line from the harness:\n\(output)")
    }

    /// No launcher: MPI initialises as a singleton, world of one. (Run as a child process: MPI_Init in the
    /// test process would leave OMPI_/PMIX_ variables that confuse every mpirun the later tests start.)
    func testSingletonWithoutLauncher() throws { try runHarness(np: nil) }
    func testOneRank() throws { try runHarness(np: 1) }

    /// ParameterSync at np = 3: rank 0's initial parameters reach every rank; the hash check passes on equal
    /// parameters and, with one rank one ulp off, stops every rank naming it.
    func testParameterBroadcastAndDivergenceCheck() throws { try runHarness(np: 3, mode: "sync") }
    func testTwoRanks() throws { try runHarness(np: 2) }

    /// np = 3: a rank waiting for a late one sleeps (CPU ≤ half the wait), and with the last rank stopped (SIGSTOP) the
    /// others' collective ends after the timeout with an error naming it (it used to spin at 100 % CPU forever).
    func testWaitingSleepsAndAStoppedRankIsNamed() throws {
        let started = Date()
        let (_, output) = try TestProcesses.run(try TestProcesses.executable("MPIHarness"), ["wait"], ranks: 3, timeout: 90)
        XCTAssertTrue(output.contains("WAIT OK np=3"), output)
        XCTAssertTrue(output.contains("Rank(s) 2 did not answer"), output)
        XCTAssertTrue(output.contains("RING TIMEOUT") && output.contains("RING OK"), output)
        XCTAssertLessThan(Date().timeIntervalSince(started), 60, output)
    }
    func testThreeRanks() throws { try runHarness(np: 3) }

    /// In-process (world of one): bf16 rounding and byte grouping round-trips.
    func testByteGroupingRoundTrip() {
        let values: [Float] = [0, -0, 1, -1.5, 3.4e38, 1e-40, .infinity, -.infinity, 0.1, 123.456]
        XCTAssertEqual(ByteGrouping.ungroupFloat32(ByteGrouping.groupFloat32(values[...]), count: values.count)
            .map(\.bitPattern), values.map(\.bitPattern))
        XCTAssertEqual(ByteGrouping.groupFloat32([Float(bitPattern: 0x4433_2211)][...]), [0x11, 0x22, 0x33, 0x44])
        // Round to nearest even at the bf16 boundary: 1 + 2^-8 is a tie → 1; 1 + 3·2^-8 → 1 + 2^-6.
        XCTAssertEqual(ByteGrouping.bfloat16(1 + 0x1p-8), 0x3F80)
        XCTAssertEqual(ByteGrouping.bfloat16(1 + 3 * 0x1p-8), 0x3F82)
        XCTAssertTrue(ByteGrouping.float(fromBFloat16: ByteGrouping.bfloat16(.nan)).isNaN)
        let bits: [UInt16] = [0x3F80, 0xBF82, 0x0001]
        XCTAssertEqual(ByteGrouping.ungroupBFloat16(ByteGrouping.groupBFloat16(bits), count: 3),
                       bits.map { ByteGrouping.float(fromBFloat16: $0) })
    }
}
