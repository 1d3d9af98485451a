import Foundation
import XCTest

/// cluster/netns/harness.sh end to end: "hosts" as network namespaces joined by (rate-shaped) veth links,
/// an Open MPI job across them, and cleanup. Needs root (or CAP_NET_ADMIN + CAP_SYS_ADMIN), `ip`, `tc`
/// and `mpirun`; skips naming what is missing. CI runs as root.
final class NetnsHarnessTests: XCTestCase {
    /// A prefix of its own, so the test never touches instances a benchmark run has up.
    private static let prefix = "ldnt"

    private static let repoRoot = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    private static let harness = repoRoot.appendingPathComponent("cluster/netns/harness.sh").path

    private var upIDs: [String] = []

    override func tearDown() {
        // A failed assertion must not leave namespaces behind.
        for id in upIDs { _ = try? Self.sh([Self.harness, "down", id], timeout: 30) }
        upIDs = []
        super.tearDown()
    }

    struct Result { let status: Int32; let out: String; let err: String }

    /// Runs argv with the test prefix in the environment; output through files (no pipe deadlock),
    /// killed after `timeout` seconds so a hung mpirun fails the test instead of hanging CI.
    @discardableResult
    private static func sh(_ argv: [String], env extra: [String: String] = [:], timeout: Double = 60) throws -> Result {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("netns-test-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let outURL = dir.appendingPathComponent("out"), errURL = dir.appendingPathComponent("err")
        FileManager.default.createFile(atPath: outURL.path, contents: nil)
        FileManager.default.createFile(atPath: errURL.path, contents: nil)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = argv
        var env = ProcessInfo.processInfo.environment
        env["LORA_NETNS_PREFIX"] = prefix
        for (k, v) in extra { env[k] = v }
        p.environment = env
        p.standardOutput = try FileHandle(forWritingTo: outURL)
        p.standardError = try FileHandle(forWritingTo: errURL)
        try p.run()
        let killer = DispatchWorkItem { if p.isRunning { p.terminate() } }
        DispatchQueue.global().asyncAfter(deadline: .now() + timeout, execute: killer)
        p.waitUntilExit()
        killer.cancel()
        return Result(status: p.terminationStatus,
                      out: (try? String(contentsOf: outURL, encoding: .utf8)) ?? "",
                      err: (try? String(contentsOf: errURL, encoding: .utf8)) ?? "")
    }

    private static func which(_ tool: String) -> Bool {
        (try? sh(["sh", "-c", "command -v \(tool)"], timeout: 10).status) == 0
    }

    private func requireEnvironment() throws {
        #if !os(Linux)
        throw XCTSkip("network namespaces are Linux-only")
        #endif
        for tool in ["ip", "tc", "mpirun"] where !Self.which(tool) {
            throw XCTSkip("'\(tool)' is not installed (iproute2 / openmpi-bin)")
        }
        // The permission itself, not the uid: a container can be root without CAP_SYS_ADMIN.
        let probe = "\(Self.prefix)probe\(getpid())"
        let r = try Self.sh(["ip", "netns", "add", probe], timeout: 10)
        guard r.status == 0 else {
            throw XCTSkip("'ip netns add' is not permitted here (needs root or CAP_NET_ADMIN + CAP_SYS_ADMIN): \(r.err)")
        }
        try Self.sh(["ip", "netns", "del", probe], timeout: 10)
    }

    /// Namespace names, and the harness's state folders, carrying the test prefix.
    private static func leftovers(_ id: String) throws -> [String] {
        let ns = try sh(["ip", "netns", "list"], timeout: 10).out
            .split(separator: "\n").map { String($0.split(separator: " ")[0]) }
            .filter { $0.hasPrefix(id + "-") }
        let state = FileManager.default.fileExists(atPath: "/tmp/lora-netns/\(id)") ? ["/tmp/lora-netns/\(id)"] : []
        return ns + state
    }

    private static func linkBytes(_ id: String) throws -> [String: Int] {
        let r = try sh([harness, "stats", id], timeout: 20)
        guard r.status == 0 else { throw NSError(domain: "stats", code: 1, userInfo: [NSLocalizedDescriptionKey: r.err]) }
        var bytes: [String: Int] = [:]
        for line in r.out.split(separator: "\n") {
            let f = line.split(separator: " ")
            if f.count == 3, let rx = Int(f[1]), let tx = Int(f[2]) { bytes[String(f[0])] = rx + tx }
        }
        return bytes
    }

    private static func builtExecutable(_ name: String) -> String? {
        let candidates = [
            Bundle.main.bundleURL.appendingPathComponent(name),
            Bundle.main.bundleURL.deletingLastPathComponent().appendingPathComponent(name),
            repoRoot.appendingPathComponent(".build/debug/\(name)"),
        ]
        return candidates.map(\.path).first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// Three hosts on 1 Gbit/s links; an MPI all-reduce of 4 MiB per rank across them; every host runs a
    /// rank, the sum is right, the bytes went over the veths; then the repository's own binary runs one
    /// rank per host; `down` leaves nothing with the instance's name.
    func testThreeHostsRunAnMPIJobOverShapedLinksAndCleanUp() throws {
        try requireEnvironment()
        let up = try Self.sh([Self.harness, "up", "3", "--rate", "1gbit"], timeout: 30)
        XCTAssertEqual(up.status, 0, "harness up failed: \(up.err)")
        let id = up.out.trimmingCharacters(in: .whitespacesAndNewlines)
        guard up.status == 0, id.hasPrefix(Self.prefix) else { return XCTFail("no instance id from up: '\(up.out)' \(up.err)") }
        upIDs.append(id)
        XCTAssertEqual(try Self.leftovers(id).count, 5, "expected <id>-sw, -h0, -h1, -h2 and the state folder")

        // The shaping is in place on both ends of each link.
        let qdisc = try Self.sh(["ip", "netns", "exec", "\(id)-h1", "tc", "qdisc", "show", "dev", "eth0"], timeout: 10)
        XCTAssertTrue(qdisc.out.contains("tbf") && qdisc.out.contains("1Gbit"), "host side not shaped: \(qdisc.out)")
        let swq = try Self.sh(["ip", "netns", "exec", "\(id)-sw", "tc", "qdisc", "show", "dev", "h2"], timeout: 10)
        XCTAssertTrue(swq.out.contains("tbf") && swq.out.contains("1Gbit"), "switch side not shaped: \(swq.out)")

        let before = try Self.linkBytes(id)
        XCTAssertEqual(before.keys.sorted(), ["h0", "h1", "h2"])

        // 1. A tiny C MPI program (cluster/netns/mpi_probe.c): real MPI_Allreduce traffic over btl tcp.
        if Self.which("mpicc") {
            let dir = FileManager.default.temporaryDirectory.appendingPathComponent("netns-probe-\(getpid())")
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            defer { try? FileManager.default.removeItem(at: dir) }
            let probe = dir.appendingPathComponent("mpi_probe").path
            let cc = try Self.sh(["mpicc", "-O2", "-o", probe,
                                  Self.repoRoot.appendingPathComponent("cluster/netns/mpi_probe.c").path], timeout: 60)
            XCTAssertEqual(cc.status, 0, "mpicc failed: \(cc.err)")
            let run = try Self.sh([Self.harness, "run", id, "-np", "3", "--", probe], timeout: 60)
            XCTAssertEqual(run.status, 0, "probe job failed: \(run.out)\n\(run.err)")
            let lines = run.out.split(separator: "\n").filter { $0.hasPrefix("probe ") }
            XCTAssertEqual(lines.count, 3, run.out)
            var hostOfRank: [String: String] = [:]
            for line in lines {
                let kv = Dictionary(uniqueKeysWithValues: line.split(separator: " ").dropFirst().compactMap { f -> (String, String)? in
                    let p = f.split(separator: "=", maxSplits: 1)
                    return p.count == 2 ? (String(p[0]), String(p[1])) : nil
                })
                XCTAssertEqual(kv["size"], "3", String(line))
                XCTAssertEqual(kv["sum"], "6", "all-reduce of rank+1 over 3 ranks: \(line)")
                hostOfRank[kv["rank"] ?? "?"] = kv["host"]
            }
            XCTAssertEqual(Set(hostOfRank.values), ["h0", "h1", "h2"], "every host runs one rank: \(hostOfRank)")
            let after = try Self.linkBytes(id)
            for host in ["h0", "h1", "h2"] {
                // Each rank sends and receives ≈ 2 × 2/3 × 4 MiB in the ring; require at least 1 MiB.
                let grew = (after[host] ?? 0) - (before[host] ?? 0)
                XCTAssertGreaterThan(grew, 1 << 20, "link of \(host) carried only \(grew) bytes: MPI traffic did not cross it")
            }
        } else {
            print("NetnsHarnessTests: mpicc not installed; the all-reduce probe is skipped, the lora-dist run still checks the links")
        }

        // 2. The repository's binary, one rank per host. `distributed-check` (an MPI self-check) when this
        //    build has it, else `info` (no MPI traffic of its own: mpirun's runtime channel crosses the links).
        guard let loraDist = Self.builtExecutable("lora-dist") else {
            return XCTFail("lora-dist is not built next to the tests (run `swift build --build-tests` first)")
        }
        let hasCheck = try Self.sh([loraDist, "distributed-check", "--help"], timeout: 30).status == 0
        let out = FileManager.default.temporaryDirectory.appendingPathComponent("netns-check-\(getpid())")
        defer { try? FileManager.default.removeItem(at: out) }
        // A short fake training loop: a stop-flag all-reduce per step, rank 0 writes the states.
        let sub = hasCheck ? ["distributed-check", "--steps", "3", "--sleep-ms", "1", "--out", out.path] : ["info"]
        let beforeDist = try Self.linkBytes(id)
        let script = #"echo "identity rank=$OMPI_COMM_WORLD_RANK netns=$(ip netns identify $$) host=$(hostname)"; exec "$@""#
        let run = try Self.sh([Self.harness, "run", id, "-np", "3", "--", "sh", "-c", script, "sh", loraDist] + sub, timeout: 90)
        XCTAssertEqual(run.status, 0, "lora-dist \(sub[0]) across the hosts failed: \(run.out)\n\(run.err)")
        let identities = run.out.split(separator: "\n").filter { $0.hasPrefix("identity ") }.map(String.init)
        XCTAssertEqual(identities.count, 3, run.out)
        for i in 0..<3 {
            XCTAssertTrue(identities.contains("identity rank=\(i) netns=\(id)-h\(i) host=h\(i)"),
                          "rank \(i) should run in namespace \(id)-h\(i): \(identities)")
        }
        if hasCheck {
            let files = (try? FileManager.default.contentsOfDirectory(atPath: out.path)) ?? []
            XCTAssertTrue(files.contains { $0.hasPrefix("state-") }, "rank 0 should have written a state into \(out.path): \(files)")
        } else {
            XCTAssertEqual(run.out.components(separatedBy: "zstd:").count - 1, 3, "every rank prints its info: \(run.out)")
        }
        let afterDist = try Self.linkBytes(id)
        for host in ["h0", "h1", "h2"] {
            XCTAssertGreaterThan((afterDist[host] ?? 0) - (beforeDist[host] ?? 0), 0, "no traffic on the link of \(host)")
        }

        // 3. down removes namespaces (hence veths and the bridge) and the state folder; twice is harmless.
        let down = try Self.sh([Self.harness, "down", id], timeout: 30)
        XCTAssertEqual(down.status, 0, down.err)
        XCTAssertEqual(try Self.leftovers(id), [])
        XCTAssertEqual(try Self.sh([Self.harness, "down", id], timeout: 30).status, 0, "down is idempotent")
        upIDs.removeAll { $0 == id }
    }

    /// An instance whose owner died (a killed run) is removed by `prune` (and by the next `up`);
    /// bad arguments are refused with a message naming them.
    func testLeftoversOfADeadOwnerArePrunedAndBadInputIsRefused() throws {
        try requireEnvironment()
        let owner = Process()
        owner.executableURL = URL(fileURLWithPath: "/bin/sleep")
        owner.arguments = ["30"]
        try owner.run()
        let up = try Self.sh([Self.harness, "up", "2", "--owner", String(owner.processIdentifier)], timeout: 30)
        XCTAssertEqual(up.status, 0, up.err)
        let id = up.out.trimmingCharacters(in: .whitespacesAndNewlines)
        XCTAssertEqual(id, "\(Self.prefix)\(owner.processIdentifier)")
        upIDs.append(id)
        XCTAssertEqual(try Self.leftovers(id).count, 4)

        // Still owned: prune keeps it.
        XCTAssertEqual(try Self.sh([Self.harness, "prune"], timeout: 30).status, 0)
        XCTAssertEqual(try Self.leftovers(id).count, 4, "prune must keep an instance whose owner lives")
        owner.terminate()
        owner.waitUntilExit()
        let prune = try Self.sh([Self.harness, "prune"], timeout: 30)
        XCTAssertEqual(prune.status, 0, prune.err)
        XCTAssertTrue(prune.err.contains("removing leftover instance \(id)"), prune.err)
        XCTAssertEqual(try Self.leftovers(id), [])
        upIDs.removeAll { $0 == id }

        let zero = try Self.sh([Self.harness, "up", "0"], timeout: 10)
        XCTAssertNotEqual(zero.status, 0)
        XCTAssertTrue(zero.err.contains("host count must be"), zero.err)
        let badRate = try Self.sh([Self.harness, "up", "2", "--rate", "fast"], timeout: 10)
        XCTAssertNotEqual(badRate.status, 0)
        XCTAssertTrue(badRate.err.contains("--rate 'fast'"), badRate.err)
        let notUp = try Self.sh([Self.harness, "run", "\(Self.prefix)1", "--", "true"], timeout: 10)
        XCTAssertNotEqual(notUp.status, 0)
        XCTAssertTrue(notUp.err.contains("is not up"), notUp.err)
    }
}
