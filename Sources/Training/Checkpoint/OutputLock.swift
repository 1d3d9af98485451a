import Foundation

#if canImport(Glibc)
import Glibc
#endif

/// One run per output folder. Two runs writing one output_dir used to both exit 0 with every file the second run's
/// (and their metrics interleaved). Rank 0 holds flock(2) on `<output_dir>/.lora-dist.lock` for the whole run: the
/// kernel releases it when the process ends, however it ends, so a lock can never outlive its run. The file also
/// says who holds it (host, pid, start), for the message the second run stops with; a file that names a run but is
/// not locked was left by a run that was killed (a finished run empties it), which is reported and taken over.
final class OutputLock {
    static let fileName = ".lora-dist.lock"
    private let fd: Int32
    let url: URL
    /// Set when the previous holder ended without emptying the file (killed, node lost): what it said.
    let staleHolder: String?

    /// Takes the lock, or throws naming the run that holds it. The folder exists (RunInputs creates it first).
    init(outputDirectory: URL) throws {
        url = outputDirectory.appendingPathComponent(Self.fileName)
        fd = open(url.path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            throw TrainingError("output_dir \(outputDirectory.path): cannot write \(Self.fileName) there (\(String(cString: strerror(errno)))); set output_dir to a folder you can write")
        }
        let holder = Self.read(fd)
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            let e = errno
            close(fd)
            if e == EWOULDBLOCK {
                throw TrainingError("output_dir \(outputDirectory.path) is in use by another lora-dist run (\(holder.isEmpty ? "its holder did not say who it is" : holder)); two runs in one folder overwrite each other's files. Wait for it to end, stop it, or give this run another output_dir")
            }
            throw TrainingError("output_dir \(outputDirectory.path): cannot lock \(Self.fileName) (\(String(cString: strerror(e)))); the filesystem may not support flock")
        }
        staleHolder = holder.isEmpty ? nil : holder
        let me = "host \(ProcessInfo.processInfo.hostName), pid \(getpid()), started \(ISO8601DateFormatter().string(from: Date()))"
        ftruncate(fd, 0)
        _ = me.withCString { pwrite(fd, $0, strlen($0), 0) }
        fsync(fd)
    }

    /// Temporaries a killed writer left in `folders` (`<file>.tmp-<pid>` of a LoRA file, `.state-*.tmp-<pid>` of a
    /// state, Foundation's `.nosync` atomic-write files): never complete, and with this lock held no other run is
    /// writing them. Removed; returns their names.
    func removeLeftovers(in folders: [URL]) -> [String] {
        var removed: [String] = []
        for folder in folders {
            for name in (try? FileManager.default.contentsOfDirectory(atPath: folder.path)) ?? [] {
                let tmp = name.range(of: #"\.tmp-[0-9]+$"#, options: .regularExpression) != nil
                guard tmp || (name.hasPrefix(".") && name.contains("nosync")) else { continue }
                if (try? FileManager.default.removeItem(at: folder.appendingPathComponent(name))) != nil { removed.append(name) }
            }
        }
        return removed
    }

    /// At the end of a run: empty the file (the next run then sees no stale holder); the kernel drops the lock at exit.
    func release() {
        ftruncate(fd, 0)
        flock(fd, LOCK_UN)
        close(fd)
    }

    private static func read(_ fd: Int32) -> String {
        var buffer = [UInt8](repeating: 0, count: 512)
        let n = pread(fd, &buffer, buffer.count, 0)
        return n > 0 ? String(decoding: buffer[0..<n], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines) : ""
    }
}
