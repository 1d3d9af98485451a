import Distributed
import Foundation
import Logging
import XCTest

/// Launcher detection from synthetic environments, the world-size check, threads per rank, and the
/// rank-tagged logger.
final class LaunchTests: XCTestCase {
    func detect(_ env: [String: String], files: [String: String] = [:], host: String = "node1") throws -> LaunchEnvironment {
        try LaunchEnvironment.detect(env, readFile: { files[$0] }, hostname: host)
    }

    func testNoLauncherIsAWorldOfOne() throws {
        let l = try detect(["PATH": "/usr/bin", "HOME": "/root"])
        XCTAssertEqual(l, .standalone)
        XCTAssertEqual(l.worldSize, 1)
        XCTAssertEqual(l.defaultThreadsPerRank(cores: 16), 16)
    }

    func testOpenMPI() throws {
        let l = try detect(["OMPI_COMM_WORLD_SIZE": "6", "OMPI_COMM_WORLD_RANK": "4",
                            "OMPI_COMM_WORLD_LOCAL_SIZE": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                            // mpirun inside a Slurm allocation: Open MPI's own variables win.
                            "SLURM_NTASKS": "12", "SLURM_PROCID": "0"])
        XCTAssertEqual(l.launcher, .openMPI)
        XCTAssertEqual([l.worldSize, l.rank, l.localSize, l.localRank], [6, 4, 3, 1])
        XCTAssertEqual(l.defaultThreadsPerRank(cores: 32), 10)
        XCTAssertEqual(l.defaultThreadsPerRank(cores: 2), 1, "never fewer than one thread")
        XCTAssertTrue(l.evidence.contains("OMPI_COMM_WORLD_SIZE=6"))
    }

    func testSlurmSrun() throws {
        // srun -N 3 -n 7: tasks per node "3(x2),1"; this is node 2 (the one with 1 task).
        let l = try detect(["SLURM_NTASKS": "7", "SLURM_PROCID": "6", "SLURM_LOCALID": "0", "SLURM_NODEID": "2",
                            "SLURM_TASKS_PER_NODE": "3(x2),1", "SLURM_JOBID": "99"])
        XCTAssertEqual(l.launcher, .slurm)
        XCTAssertEqual([l.worldSize, l.rank, l.localSize, l.localRank], [7, 6, 1, 0])
        let first = try detect(["SLURM_NTASKS": "7", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0",
                                "SLURM_TASKS_PER_NODE": "3(x2),1"])
        XCTAssertEqual(first.localSize, 3)
        XCTAssertEqual(first.defaultThreadsPerRank(cores: 48), 16)
        // --ntasks-per-node wins over the list; a step's own counts win over the allocation's.
        let step = try detect(["SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3",
                               "SLURM_NTASKS_PER_NODE": "2", "SLURM_TASKS_PER_NODE": "4(x2)"])
        XCTAssertEqual([step.worldSize, step.localSize], [4, 2])
        XCTAssertEqual(try LaunchEnvironment.expandSlurmTaskList("2(x3),1,4"), [2, 2, 2, 1, 4])
        XCTAssertThrowsError(try LaunchEnvironment.expandSlurmTaskList("2(y3)"))
    }

    func testPMIxUnderSlurm() throws {
        let l = try detect(["PMIX_RANK": "2", "PMIX_NAMESPACE": "slurm.pmix.5.0", "SLURM_STEP_NUM_TASKS": "4",
                            "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
                            "SLURM_STEP_TASKS_PER_NODE": "2(x2)"])
        XCTAssertEqual(l.launcher, .pmix)
        XCTAssertEqual([l.worldSize, l.rank, l.localSize, l.localRank], [4, 2, 2, 0])
        // PMIx alone (prun) exports the rank but no size.
        let bare = try detect(["PMIX_RANK": "0"])
        XCTAssertEqual(bare.launcher, .pmix)
        XCTAssertNil(bare.worldSize)
        XCTAssertEqual(bare.rank, 0)
    }

    func testHydra() throws {
        let l = try detect(["PMI_SIZE": "4", "PMI_RANK": "3", "MPI_LOCALNRANKS": "2", "MPI_LOCALRANKID": "1"])
        XCTAssertEqual(l.launcher, .hydra)
        XCTAssertEqual([l.worldSize, l.rank, l.localSize, l.localRank], [4, 3, 2, 1])
    }

    func testPBS() throws {
        let torque = try detect(["PBS_JOBID": "12.server", "PBS_NP": "8", "PBS_NUM_PPN": "4"])
        XCTAssertEqual(torque.launcher, .pbs)
        XCTAssertEqual([torque.worldSize, torque.localSize], [8, 4])
        XCTAssertNil(torque.rank)
        // PBS Pro: only the node file, one line per slot; this node's lines give the local count.
        let nodes = "node1.cluster\nnode1.cluster\nnode1.cluster\nnode2.cluster\nnode2.cluster\n"
        let pro = try detect(["PBS_JOBID": "13.server", "PBS_NODEFILE": "/var/spool/pbs/aux/13"],
                             files: ["/var/spool/pbs/aux/13": nodes], host: "node1")
        XCTAssertEqual([pro.worldSize, pro.localSize], [5, 3])
    }

    func testMalformedVariablesAreNamed() {
        XCTAssertThrowsError(try detect(["OMPI_COMM_WORLD_SIZE": "three"])) { error in
            XCTAssertTrue("\(error)".contains("OMPI_COMM_WORLD_SIZE=\"three\""), "\(error)")
        }
        XCTAssertThrowsError(try detect(["SLURM_NTASKS": "2", "SLURM_PROCID": "2"])) { error in
            XCTAssertTrue("\(error)".contains("rank 2 in a world of 2"), "\(error)")
        }
        XCTAssertThrowsError(try detect(["PMI_SIZE": "0"]))
    }

    func testWorldSizeTrapMessages() throws {
        let ompi = try detect(["OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_RANK": "0"])
        XCTAssertNil(Launch.mismatch(launch: ompi, mpiRank: 0, mpiSize: 3))
        let trap = try XCTUnwrap(Launch.mismatch(launch: ompi, mpiRank: 0, mpiSize: 1))
        XCTAssertTrue(trap.contains("started 3 tasks but MPI reports a world of 1"), trap)
        XCTAssertTrue(trap.contains("mpirun -np 3"), trap)

        let srun = try detect(["SLURM_NTASKS": "4", "SLURM_PROCID": "0"])
        let slurmTrap = try XCTUnwrap(Launch.mismatch(launch: srun, mpiRank: 0, mpiSize: 1))
        XCTAssertTrue(slurmTrap.contains("--mpi=pmix"), slurmTrap)
        // Inside an allocation a single rank can be asked for; an mpirun world can't be overridden.
        XCTAssertNil(Launch.mismatch(launch: srun, mpiRank: 0, mpiSize: 1, allowWorldOfOne: true))
        XCTAssertNotNil(Launch.mismatch(launch: ompi, mpiRank: 0, mpiSize: 1, allowWorldOfOne: true))

        XCTAssertNotNil(Launch.mismatch(launch: ompi, mpiRank: 0, mpiSize: 2), "any size disagreement is an error")
        let pmix = try detect(["PMIX_RANK": "1"])
        XCTAssertNotNil(Launch.mismatch(launch: pmix, mpiRank: 0, mpiSize: 1), "rank disagreement is an error")
        XCTAssertNil(Launch.mismatch(launch: .standalone, mpiRank: 0, mpiSize: 1))
    }

    func testRankTaggedLines() {
        final class Lines: @unchecked Sendable {
            let lock = NSLock(); var all: [String] = []
            func add(_ s: String) { lock.lock(); all.append(s); lock.unlock() }
        }
        let lines = Lines()
        let identity = RankIdentity()
        var logger = Logger(label: "t") { _ in RankLogHandler(identity: identity, sink: { lines.add($0) }) }
        logger.info("before init")
        identity.set(rank: 1, size: 3)
        logger[metadataKey: "step"] = "7"
        logger.info("loss 0.25")
        logger.warning("slow")
        logger.debug("hidden below the level")
        XCTAssertEqual(lines.all, ["[rank ?/?] before init\n", "[rank 1/3] loss 0.25 step=7\n", "[rank 1/3] warning: slow step=7\n"])

        // Progress: printed by rank 0 only.
        let root = RankLogging.progress(rank: 0, sink: { lines.add("root " + $0) })
        let other = RankLogging.progress(rank: 2, sink: { lines.add("other " + $0) })
        root.info("epoch 1")
        other.info("epoch 1")
        XCTAssertEqual(lines.all.filter { $0.hasPrefix("root") }.count, 1)
        XCTAssertEqual(lines.all.filter { $0.hasPrefix("other") }.count, 0)
    }
}
