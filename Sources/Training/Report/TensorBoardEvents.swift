import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The bytes of a TensorBoard event file, hand-encoded (no protobuf dependency).
///
/// A file is a sequence of TFRecords (tensorflow/core/lib/io/record_writer.cc):
///   uint64 length (little endian) · uint32 masked CRC-32C of those 8 bytes · data · uint32 masked CRC-32C of data
/// and each record's data is an `Event` protobuf (tensorboard/compat/proto/event.proto, proto3):
///   wall_time double = 1, step int64 = 2, file_version string = 3, summary Summary = 5,
///   source_metadata SourceMetadata = 10 (SourceMetadata: writer string = 1).
///   Summary: repeated Value value = 1; Value: tag string = 1, simple_value float = 2.
/// Fields are written in field-number order and proto3 zero scalars (wall_time 0, step 0) are omitted, as the
/// Python protobuf runtime does, so the bytes equal what tensorboard's EventFileWriter writes for the same
/// events (checked against Tests/Fixtures/training/tfevents_golden.bin).
public enum TensorBoardEvent {
    /// The first event of every file: `file_version = "brain.Event:2"` (what makes readers accept the file),
    /// plus `source_metadata.writer` naming the program that wrote it (tensorboard writes its own module name).
    public static func fileVersion(wallTime: Double, writer: String?) -> [UInt8] {
        var event: [UInt8] = []
        appendWallTimeAndStep(&event, wallTime: wallTime, step: 0)
        appendBytesField(&event, field: 3, Array("brain.Event:2".utf8))
        if let writer {
            var metadata: [UInt8] = []
            appendBytesField(&metadata, field: 1, Array(writer.utf8))
            appendBytesField(&event, field: 10, metadata)
        }
        return event
    }

    /// One scalar as `torch.utils.tensorboard.SummaryWriter.add_scalar` writes it: an event holding a summary
    /// with one old-style value (`simple_value`, a float32: the Double is rounded to nearest, as protobuf does).
    public static func scalar(tag: String, value: Double, step: Int, wallTime: Double) -> [UInt8] {
        var summaryValue: [UInt8] = []
        appendBytesField(&summaryValue, field: 1, Array(tag.utf8))
        // simple_value sits in a oneof, so it is written even when 0.
        summaryValue.append(2 << 3 | 5)  // field 2, wire type 5 (fixed32)
        appendLittleEndian(&summaryValue, Float(value).bitPattern)
        return summaryEvent(summaryValue, step: step, wallTime: wallTime)
    }

    /// One image as `SummaryWriter.add_image` writes it: Summary.Value { tag = 1, image = 4 } with Summary.Image
    /// { height = 1, width = 2, colorspace = 3 (3: RGB), encoded_image_string = 4 (the PNG file's bytes) }.
    public static func image(tag: String, png: [UInt8], width: Int, height: Int, step: Int, wallTime: Double) -> [UInt8] {
        var image: [UInt8] = []
        for (field, value) in [(1, height), (2, width), (3, 3)] {
            image.append(UInt8(field << 3))            // wire type 0 (varint)
            appendVarint(&image, UInt64(value))
        }
        if !png.isEmpty { appendBytesField(&image, field: 4, png) }   // proto3 omits an empty bytes field
        var summaryValue: [UInt8] = []
        appendBytesField(&summaryValue, field: 1, Array(tag.utf8))
        appendBytesField(&summaryValue, field: 4, image)
        return summaryEvent(summaryValue, step: step, wallTime: wallTime)
    }

    /// An event (wall_time, step) holding a summary of one Summary.Value.
    static func summaryEvent(_ summaryValue: [UInt8], step: Int, wallTime: Double) -> [UInt8] {
        var summary: [UInt8] = []
        appendBytesField(&summary, field: 1, summaryValue)
        var event: [UInt8] = []
        appendWallTimeAndStep(&event, wallTime: wallTime, step: step)
        appendBytesField(&event, field: 5, summary)
        return event
    }

    /// TFRecord framing of one serialized event.
    public static func record(_ data: [UInt8]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(data.count + 16)
        appendLittleEndian(&out, UInt64(data.count))
        appendLittleEndian(&out, CRC32C.masked(out[0..<8]))
        out += data
        appendLittleEndian(&out, CRC32C.masked(data))
        return out
    }

    /// The data of every record in `bytes`, with both CRCs checked. A torn last record (a run killed mid-write)
    /// is an error naming its offset, as tensorboard's reader reports it.
    public static func records(in bytes: [UInt8]) throws -> [[UInt8]] {
        var records: [[UInt8]] = []
        var offset = 0
        while offset < bytes.count {
            guard bytes.count - offset >= 12 else { throw MetricsError("event record at byte \(offset) is truncated: \(bytes.count - offset) bytes, the header alone is 12") }
            let length = Int(readLittleEndian(bytes, offset, as: UInt64.self))
            guard readLittleEndian(bytes, offset + 8, as: UInt32.self) == CRC32C.masked(bytes[offset..<offset + 8]) else {
                throw MetricsError("event record at byte \(offset): length CRC mismatch (corrupt file)")
            }
            let dataStart = offset + 12
            guard length >= 0, bytes.count - dataStart >= length + 4 else {
                throw MetricsError("event record at byte \(offset) is truncated: length \(length), \(bytes.count - dataStart) bytes left")
            }
            let data = Array(bytes[dataStart..<dataStart + length])
            guard readLittleEndian(bytes, dataStart + length, as: UInt32.self) == CRC32C.masked(data) else {
                throw MetricsError("event record at byte \(offset): data CRC mismatch (corrupt file)")
            }
            records.append(data)
            offset = dataStart + length + 4
        }
        return records
    }

    // MARK: protobuf wire format

    static func appendWallTimeAndStep(_ out: inout [UInt8], wallTime: Double, step: Int) {
        if wallTime.bitPattern != 0 {
            out.append(1 << 3 | 1)  // field 1, wire type 1 (fixed64)
            appendLittleEndian(&out, wallTime.bitPattern)
        }
        if step != 0 {
            out.append(2 << 3 | 0)  // field 2, varint; a negative int64 is its 10-byte two's complement
            appendVarint(&out, UInt64(bitPattern: Int64(step)))
        }
    }

    static func appendBytesField(_ out: inout [UInt8], field: Int, _ bytes: [UInt8]) {
        appendVarint(&out, UInt64(field << 3 | 2))  // wire type 2 (length-delimited)
        appendVarint(&out, UInt64(bytes.count))
        out += bytes
    }

    static func appendVarint(_ out: inout [UInt8], _ value: UInt64) {
        var v = value
        while v >= 0x80 {
            out.append(UInt8(v & 0x7F) | 0x80)
            v >>= 7
        }
        out.append(UInt8(v))
    }

    static func appendLittleEndian<T: FixedWidthInteger>(_ out: inout [UInt8], _ value: T) {
        withUnsafeBytes(of: value.littleEndian) { out += $0 }
    }

    static func readLittleEndian<T: FixedWidthInteger>(_ bytes: [UInt8], _ offset: Int, as: T.Type) -> T {
        var value: T = 0
        for i in (0..<MemoryLayout<T>.size).reversed() { value = value << 8 | T(bytes[offset + i]) }
        return value
    }
}

/// An open TensorBoard event file. Every `add` is one `write(2)` of whole records, straight to the file (no
/// buffer): a run killed between steps leaves a file every reader accepts.
public final class TensorBoardEventWriter {
    /// `<directory>/events.out.tfevents.<unix time, 10 digits>.<hostname>.<pid>`: TensorBoard reads any file
    /// whose name contains "tfevents"; the pid keeps two runs started in the same second apart.
    public let url: URL
    private let handle: FileHandle

    /// Creates the directory if needed and a new file in it (never overwrites one), and writes the
    /// file_version record at `wallTime` (seconds since 1970).
    public convenience init(directory: URL, wallTime: Double, writer: String? = "lora-dist") throws {
        do {
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        } catch {
            throw MetricsError("cannot create the TensorBoard log directory \(directory.path): \(error.localizedDescription)")
        }
        let name = String(format: "events.out.tfevents.%010d.%@.%d", Int(wallTime), Self.hostname(), Int(getpid()))
        try self.init(file: directory.appendingPathComponent(name), wallTime: wallTime, writer: writer)
    }

    /// A new event file at exactly `file` (it must not exist).
    public init(file: URL, wallTime: Double, writer: String? = "lora-dist") throws {
        let fd = open(file.path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else {
            let reason = String(cString: strerror(errno))
            throw MetricsError("cannot create the TensorBoard event file \(file.path): \(reason)")
        }
        url = file
        handle = FileHandle(fileDescriptor: fd, closeOnDealloc: true)
        try write(TensorBoardEvent.record(TensorBoardEvent.fileVersion(wallTime: wallTime, writer: writer)))
    }

    /// Scalars of one step, in the given order, all at `step` and `wallTime`.
    public func add(scalars: [(tag: String, value: Double)], step: Int, wallTime: Double) throws {
        var bytes: [UInt8] = []
        for (tag, value) in scalars {
            bytes += TensorBoardEvent.record(TensorBoardEvent.scalar(tag: tag, value: value, step: step, wallTime: wallTime))
        }
        try write(bytes)
    }

    /// Images (PNG bytes) at `step`.
    public func add(images: [(tag: String, png: [UInt8], width: Int, height: Int)], step: Int, wallTime: Double) throws {
        var bytes: [UInt8] = []
        for i in images {
            bytes += TensorBoardEvent.record(TensorBoardEvent.image(tag: i.tag, png: i.png, width: i.width, height: i.height,
                                                                    step: step, wallTime: wallTime))
        }
        try write(bytes)
    }

    public func close() { try? handle.close() }

    private func write(_ bytes: [UInt8]) throws {
        do { try handle.write(contentsOf: bytes) } catch {
            throw MetricsError("cannot write the TensorBoard event file \(url.path): \(error.localizedDescription) (disk full?)")
        }
    }

    static func hostname() -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, buffer.count - 1) == 0 else { return "localhost" }
        let name = String(cString: buffer)
        return name.isEmpty ? "localhost" : name
    }
}

/// Metrics files that cannot be created or written; the message names the file.
public struct MetricsError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}
