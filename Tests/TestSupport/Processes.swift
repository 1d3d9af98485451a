import Foundation
import XCTest

/// Running the package's executables (and `mpirun`) from tests, as separate processes: MPI_Init inside a test process
/// leaves OMPI_/PMIX_ variables that break later mpirun children, so multi-rank tests always spawn, and the children
/// never inherit a launcher's variables.
public enum TestProcesses {
    /// The package root (Tests/TestSupport/../..).
    public static let packageRoot = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent()

    /// A built executable of this package: next to the test bundle (.build/<triple>/debug/), else .build/debug.
    public static func executable(_ name: String) throws -> String {
        var candidates: [String] = []
        var dir = Bundle.main.bundleURL
        for _ in 0..<3 { candidates.append(dir.appendingPathComponent(name).path); dir.deleteLastPathComponent() }
        candidates += Bundle.allBundles.map { $0.bundleURL.deletingLastPathComponent().appendingPathComponent(name).path }
        candidates.append(packageRoot.appendingPathComponent(".build/debug/\(name)").path)
        guard let p = candidates.first(where: FileManager.default.isExecutableFile) else {
            throw XCTSkip("\(name) not built: run `swift build --build-tests` first")
        }
        return p
    }

    public static func mpirun() throws -> String {
        for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin").split(separator: ":") {
            let p = "\(dir)/mpirun"
            if FileManager.default.isExecutableFile(atPath: p) { return p }
        }
        throw XCTSkip("mpirun not on PATH: install openmpi-bin")
    }

    /// Runs `executable args` (under `mpirun -np ranks --oversubscribe` when `ranks` is given) with this process's
    /// environment minus MPI launcher variables, plus Open MPI's run-as-root permission and `extra`. Output is stdout
    /// and stderr together. A run past `timeout` seconds is terminated (a hung rank fails the test, not the CI job).
    /// `whileRunning(pid)` runs on another thread once the process has started. `unsetting` names variables of this
    /// process's environment the child must not see.
    public static func run(_ executable: String, _ args: [String], ranks: Int? = nil, environment extra: [String: String] = [:],
                           unsetting: [String] = [],
                           timeout: Double = 300, whileRunning: (@Sendable (Int32) -> Void)? = nil) throws -> (status: Int32, output: String) {
        let process = Process()
        if let ranks {
            process.executableURL = URL(fileURLWithPath: try mpirun())
            process.arguments = ["-np", String(ranks), "--oversubscribe", executable] + args
        } else {
            process.executableURL = URL(fileURLWithPath: executable)
            process.arguments = args
        }
        var env = ProcessInfo.processInfo.environment.filter { !["OMPI_", "PMIX_", "ORTE_", "OPAL_"].contains(where: $0.key.hasPrefix) }
        env["OMPI_ALLOW_RUN_AS_ROOT"] = "1"
        env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
        env["OMPI_MCA_rmaps_base_oversubscribe"] = "1"
        for k in unsetting { env[k] = nil }
        for (k, v) in extra { env[k] = v }
        process.environment = env
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let watchdog = DispatchWorkItem { if process.isRunning { process.terminate() } }
        DispatchQueue.global().asyncAfter(deadline: .now() + timeout, execute: watchdog)
        if let whileRunning {   // e.g. a test's signal to the process (mpirun itself when ranks is given)
            let pid = process.processIdentifier
            DispatchQueue.global().async { whileRunning(pid) }
        }
        let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        watchdog.cancel()
        return (process.terminationStatus, output)
    }
}
