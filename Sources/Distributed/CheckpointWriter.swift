import Base
import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

public struct CheckpointError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// A complete state file found in an output directory.
public struct StateFile: Equatable, Sendable {
    public let step: Int
    public let url: URL
}

/// Rank 0's resumable states, written atomically into the output directory.
///
/// Only the rank constructed with `rank == 0` touches the directory; on every other rank each method is a
/// no-op (returns nil), so shared filesystems see one writer. A state is written as
///   `<dir>/.state-<step>.tmp-<pid>`  (same directory, so the rename cannot cross filesystems)
///   → fsync(file) → rename to `<dir>/state-<step, 8 digits>.ldstate` → fsync(dir)
/// so after a crash at any point the directory holds complete `state-*.ldstate` files plus at most a hidden
/// temporary, which `newestState` ignores and the next writer removes. After a new state is durable the
/// oldest complete ones beyond `keep` are deleted (never before: a crash mid-write leaves the previous one).
public final class CheckpointWriter {
    public let directory: URL
    public let isWriter: Bool
    /// Write every `every` steps (0 = only when asked: at a stop and at the end).
    public let every: Int
    /// Complete states kept (the newest `keep`); at least 1.
    public let keep: Int
    public private(set) var lastWrittenStep: Int?

    static let prefix = "state-"
    static let suffix = ".ldstate"
    static let tempPrefix = ".state-"

    public init(directory: URL, rank: Int, every: Int, keep: Int = 2) throws {
        guard every >= 0 else { throw CheckpointError("checkpoint cadence must be 0 (only at stop/end) or a positive step count (got \(every))") }
        guard keep >= 1 else { throw CheckpointError("checkpoints to keep must be at least 1 (got \(keep))") }
        self.directory = directory; self.isWriter = rank == 0; self.every = every; self.keep = keep
        guard isWriter else { return }
        do {
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        } catch {
            throw CheckpointError("cannot create the output directory \(directory.path): \(error.localizedDescription)")
        }
        // Temporaries left by a writer that died mid-write: never complete, safe to drop (one writer per directory).
        for name in (try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? []
        where name.hasPrefix(Self.tempPrefix) && name.contains(".tmp-") {
            try? FileManager.default.removeItem(at: directory.appendingPathComponent(name))
        }
    }

    /// True when the cadence asks for a state after `step` (steps count from 1).
    public func isDue(step: Int) -> Bool { every > 0 && step > 0 && step % every == 0 }

    public static func fileName(step: Int) -> String { prefix + String(format: "%08d", step) + suffix }

    /// Writes the state of `step` through `body`, which must write the complete file at the path it is given
    /// (a temporary in the output directory). Returns the final URL on rank 0, nil elsewhere.
    @discardableResult
    public func write(step: Int, _ body: (URL) throws -> Void) throws -> URL? {
        guard isWriter else { return nil }
        guard step >= 0 else { throw CheckpointError("state step must be non-negative (got \(step))") }
        let temp = directory.appendingPathComponent("\(Self.tempPrefix)\(String(format: "%08d", step)).tmp-\(getpid())")
        let final = directory.appendingPathComponent(Self.fileName(step: step))
        do {
            try body(temp)
            guard FileManager.default.fileExists(atPath: temp.path) else {
                throw CheckpointError("the state writer for step \(step) did not create \(temp.path)")
            }
            try Self.fsyncPath(temp, directory: false)
            guard rename(temp.path, final.path) == 0 else {
                throw CheckpointError("rename \(temp.path) → \(final.path) failed: \(String(cString: strerror(errno)))")
            }
        } catch {
            try? FileManager.default.removeItem(at: temp)
            throw error
        }
        try Self.fsyncPath(directory, directory: true)
        lastWrittenStep = step
        try prune()
        return final
    }

    /// Writes named blobs as one state file (format in `StateBlobs`).
    @discardableResult
    public func write(step: Int, blobs: StateBlobList) throws -> URL? {
        guard isWriter else { return nil }
        try StateBlobs.validate(blobs)
        return try write(step: step) { url in try StateBlobs.write(blobs, to: url) }
    }

    /// Deletes complete states older than the newest `keep`, then makes the deletions durable.
    func prune() throws {
        let states = try Self.completeStates(in: directory)
        guard states.count > keep else { return }
        for old in states.dropLast(keep) { try? FileManager.default.removeItem(at: old.url) }
        try Self.fsyncPath(directory, directory: true)
    }

    /// Complete states in `directory`, oldest first. Temporaries (hidden `.state-*.tmp-*`) and unrelated files
    /// are ignored. A missing directory has none.
    public static func completeStates(in directory: URL) throws -> [StateFile] {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: directory.path) else { return [] }
        return names.compactMap { name -> StateFile? in
            guard name.hasPrefix(prefix), name.hasSuffix(suffix) else { return nil }
            let digits = name.dropFirst(prefix.count).dropLast(suffix.count)
            guard !digits.isEmpty, digits.allSatisfy(\.isASCII), digits.allSatisfy(\.isNumber), let step = Int(digits) else { return nil }
            return StateFile(step: step, url: directory.appendingPathComponent(name))
        }.sorted { $0.step < $1.step }
    }

    /// The state to resume from: the complete one with the highest step, or nil when there is none.
    public static func newestState(in directory: URL) throws -> StateFile? {
        try completeStates(in: directory).last
    }

    static func fsyncPath(_ url: URL, directory: Bool) throws {
        let fd = open(url.path, directory ? (O_RDONLY | O_DIRECTORY) : O_RDONLY)
        guard fd >= 0 else { throw CheckpointError("cannot open \(url.path) to fsync it: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw CheckpointError("fsync \(url.path) failed: \(String(cString: strerror(errno)))") }
    }
}

/// A state's named blobs: byte arrays, or any contiguous values whose in-memory bytes are the stored bytes (an
/// `[Float]` on a little-endian host: written without a copy — a rank-64 SDXL state is 2 GB).
public typealias StateBlobList = [(name: String, bytes: any ContiguousBytes)]

/// Floats as a blob: their in-memory bytes (little-endian hosts only: the container is little-endian).
public struct FloatBlob: ContiguousBytes {
    public let values: [Float]
    public init(_ values: [Float]) { self.values = values }
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try values.withUnsafeBytes(body)
    }
}

/// A simple named-blob container for states (little-endian):
///   "LDSTATE1" | u32 count | count × (u32 nameLength | name UTF-8 | u64 byteCount | bytes) | u64 FNV-1a of all before
/// The trailing hash makes a truncated or corrupted file an error at resume, not garbage weights.
public enum StateBlobs {
    static let magic = Array("LDSTATE1".utf8)

    static func validate(_ blobs: StateBlobList) throws {
        var seen = Set<String>()
        for (name, _) in blobs where name.isEmpty || !seen.insert(name).inserted {
            throw CheckpointError("state blob names must be unique and non-empty (got \"\(name)\" twice or empty)")
        }
    }

    /// The container's bytes, piece by piece in file order (no concatenated copy of the blobs), to `sink`; returns the
    /// checksum of all of them (FNV-1a over raw bytes: ≈ 1 GB/s, where a generic Collection walk was 50× slower).
    static func emit(_ blobs: StateBlobList, _ sink: (UnsafeRawBufferPointer) throws -> Void) rethrows -> UInt64 {
        var hash = FNV1a64()
        func put(_ bytes: any ContiguousBytes) throws { try bytes.withUnsafeBytes { hash.add($0); try sink($0) } }
        func le(_ v: UInt64, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }
        try put(magic + le(UInt64(UInt32(blobs.count)), 4))
        for (name, bytes) in blobs {
            let n = Array(name.utf8)
            let count = bytes.withUnsafeBytes { $0.count }
            try put(le(UInt64(n.count), 4) + n + le(UInt64(count), 8))
            try put(bytes)
        }
        return hash.value
    }

    public static func encode(_ blobs: StateBlobList) throws -> Data {
        try validate(blobs)
        var out = Data()
        let hash = emit(blobs) { out.append(contentsOf: $0) }
        var tail: [UInt8] = []
        appendLE(&tail, hash, bytes: 8)
        out.append(contentsOf: tail)
        return out
    }

    /// Writes the container straight to `url` (the state writer's temporary), blob by blob.
    static func write(_ blobs: StateBlobList, to url: URL) throws {
        let fd = open(url.path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw CheckpointError("cannot create \(url.path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        func sink(_ p: UnsafeRawBufferPointer) throws {
            var done = 0
            while done < p.count {
                let n = Glibc.write(fd, p.baseAddress! + done, min(p.count - done, 1 << 26))
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { throw CheckpointError("cannot write \(url.path): \(String(cString: strerror(errno)))") }
                done += n
            }
        }
        let hash = try emit(blobs, sink)
        var tail: [UInt8] = []
        appendLE(&tail, hash, bytes: 8)
        try tail.withUnsafeBytes { try sink($0) }
    }

    public static func decode(_ data: Data, source: String = "state") throws -> [String: [UInt8]] {
        let b = [UInt8](data)
        func bad(_ why: String) -> CheckpointError {
            CheckpointError("\(source) is not a complete lora-dist state (\(why)); resume from an older state file")
        }
        guard b.count >= magic.count + 4 + 8, Array(b[0..<magic.count]) == magic else { throw bad("bad header") }
        let body = b.count - 8
        var hash = FNV1a64()
        b.withUnsafeBytes { hash.add(UnsafeRawBufferPointer(rebasing: $0[0..<body])) }
        guard readLE(b, body, 8) == hash.value else { throw bad("checksum mismatch: truncated or corrupted") }
        var at = magic.count
        let count = Int(readLE(b, at, 4)); at += 4
        var out: [String: [UInt8]] = [:]
        for _ in 0..<count {
            guard at + 4 <= body else { throw bad("truncated entry") }
            let n = Int(readLE(b, at, 4)); at += 4
            guard at + n + 8 <= body else { throw bad("truncated name") }
            let name = String(decoding: b[at..<at + n], as: UTF8.self); at += n
            let len = readLE(b, at, 8); at += 8
            guard len <= UInt64(body - at) else { throw bad("truncated blob \(name)") }
            out[name] = Array(b[at..<at + Int(len)]); at += Int(len)
        }
        guard at == body else { throw bad("trailing bytes") }
        return out
    }

    /// One blob of a state, read without the rest of the file and without the checksum (for a look at `info.json`
    /// before any expensive work; `read` verifies the whole file when the state is used). nil when absent or cut.
    public static func peek(_ url: URL, blob wanted: String) -> [UInt8]? {
        guard let h = FileHandle(forReadingAtPath: url.path) else { return nil }
        defer { try? h.close() }
        func take(_ n: Int) -> [UInt8]? { let d = h.readData(ofLength: n); return d.count == n ? [UInt8](d) : nil }
        guard let m = take(magic.count), m == magic, let c = take(4) else { return nil }
        for _ in 0..<Int(readLE(c, 0, 4)) {
            guard let nl = take(4), let name = take(Int(readLE(nl, 0, 4))), let bl = take(8) else { return nil }
            let length = readLE(bl, 0, 8)
            if String(decoding: name, as: UTF8.self) == wanted { return length < 1 << 30 ? take(Int(length)) : nil }
            guard let offset = try? h.offset(), (try? h.seek(toOffset: offset + length)) != nil else { return nil }
        }
        return nil
    }

    public static func read(_ url: URL) throws -> [String: [UInt8]] {
        try decode(try Data(contentsOf: url), source: url.path)
    }

    static func appendLE(_ out: inout [UInt8], _ v: UInt64, bytes: Int) {
        for i in 0..<bytes { out.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) }
    }
    static func readLE(_ b: [UInt8], _ at: Int, _ bytes: Int) -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<bytes { v |= UInt64(b[at + i]) << (8 * UInt64(i)) }
        return v
    }
}
