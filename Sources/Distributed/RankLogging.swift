import Foundation
import Logging

/// Which rank this process is, for log tags. Set once MPI has told it (before: "[rank ?/?]").
public final class RankIdentity: @unchecked Sendable {
    private let lock = NSLock()
    private var _rank: Int?
    private var _size: Int?
    public init(rank: Int? = nil, size: Int? = nil) { _rank = rank; _size = size }
    public func set(rank: Int, size: Int) { lock.lock(); _rank = rank; _size = size; lock.unlock() }
    public var rank: Int? { lock.lock(); defer { lock.unlock() }; return _rank }
    public var tag: String {
        lock.lock(); defer { lock.unlock() }
        return "[rank \(_rank.map(String.init) ?? "?")/\(_size.map(String.init) ?? "?")]"
    }
}

/// A swift-log handler that prefixes every line with the rank: "[rank 1/3] message key=value".
/// Warnings and worse also name their level ("[rank 1/3] error: …"). Each line goes out in one write, so
/// lines of one process never interleave (mpirun forwards each rank's output line by line).
public struct RankLogHandler: LogHandler {
    public var logLevel: Logger.Level
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    let identity: RankIdentity
    let sink: @Sendable (String) -> Void

    public init(identity: RankIdentity, level: Logger.Level = .info,
                sink: @escaping @Sendable (String) -> Void = RankLogHandler.standardError) {
        self.identity = identity; self.logLevel = level; self.sink = sink
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        let level = event.level, message = event.message, explicit = event.metadata
        var all = metadata
        if let provided = metadataProvider?.get() { all.merge(provided) { _, new in new } }
        if let explicit { all.merge(explicit) { _, new in new } }
        var text = identity.tag + " "
        if level >= .warning { text += "\(level): " }
        text += message.description
        if !all.isEmpty {
            text += " " + all.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        }
        sink(text + "\n")
    }

    public static let standardError: @Sendable (String) -> Void = { line in
        line.withCString { p in _ = fputs(p, stderr) }
        fflush(stderr)
    }
    public static let standardOutput: @Sendable (String) -> Void = { line in
        line.withCString { p in _ = fputs(p, stdout) }
        fflush(stdout)
    }
}

/// Logging for a rank: `bootstrap` once per process, then `Logger(label:)` anywhere tags lines with the rank,
/// and `progress(_:)` is the user-facing logger that only rank 0 prints through (a no-op elsewhere, so N
/// ranks do not print N copies of the same progress line).
public enum RankLogging {
    public static let identity = RankIdentity()
    private static let lock = NSLock()
    nonisolated(unsafe) private static var bootstrapped = false
    nonisolated(unsafe) private static var level: Logger.Level = .info

    /// Installs the rank-tagging handler as the process's LoggingSystem (only the first call does: swift-log
    /// allows one bootstrap per process) and records the rank; later calls just update rank, size and level.
    public static func bootstrap(rank: Int? = nil, size: Int? = nil, level: Logger.Level = .info) {
        if let rank, let size { identity.set(rank: rank, size: size) }
        lock.lock(); defer { lock.unlock() }
        Self.level = level
        guard !bootstrapped else { return }
        bootstrapped = true
        LoggingSystem.bootstrap { _ in RankLogHandler(identity: identity, level: RankLogging.currentLevel) }
    }

    static var currentLevel: Logger.Level { lock.lock(); defer { lock.unlock() }; return level }

    /// A logger that prints on rank 0 and nowhere else (`rank` defaults to the bootstrapped identity's).
    public static func progress(_ label: String = "progress", rank: Int? = nil,
                                sink: @escaping @Sendable (String) -> Void = RankLogHandler.standardError) -> Logger {
        let isRoot = (rank ?? identity.rank ?? 0) == 0
        let level = currentLevel
        return Logger(label: label) { _ in
            isRoot ? RankLogHandler(identity: identity, level: level, sink: sink) as LogHandler : SwiftLogNoOpLogHandler()
        }
    }
}
