import Foundation
import Tensor

/// Errors name the file and what is wrong with it.
public struct SafeTensorsError: Error, CustomStringConvertible {
    public let path: String
    public let problem: String
    public var description: String { "\(path): \(problem)" }
    public init(path: String, problem: String) { self.path = path; self.problem = problem }
}

/// A memory-mapped file; unmapped when the last tensor viewing it is gone.
final class MappedFile {
    let bytes: UnsafeRawBufferPointer
    init(path: String) throws {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else {
            throw SafeTensorsError(path: path, problem: "cannot open (\(String(cString: strerror(errno))))")
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw SafeTensorsError(path: path, problem: "cannot stat") }
        let size = Int(st.st_size)
        guard size > 0 else { throw SafeTensorsError(path: path, problem: "file is empty") }
        guard let p = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0), p != MAP_FAILED else {
            throw SafeTensorsError(path: path, problem: "mmap failed (\(String(cString: strerror(errno))))")
        }
        bytes = UnsafeRawBufferPointer(start: p, count: size)
    }
    deinit { munmap(UnsafeMutableRawPointer(mutating: bytes.baseAddress), bytes.count) }
}

/// A safetensors file: 8-byte little-endian header length, a JSON header, then the tensor bytes.
/// Everything in the header is checked before any tensor is handed out.
public struct SafeTensorsFile {
    public struct Entry { public let dtype: String; public let shape: [Int]; public let range: Range<Int> }

    public let path: String
    public let metadata: [String: String]
    public let entries: [String: Entry]
    private let file: MappedFile
    private let storage: Storage
    private let dataStart: Int

    public var names: [String] { entries.keys.sorted() }

    /// key → shape, for model detection and config inference (no tensor is touched).
    public var shapes: [String: [Int]] { entries.mapValues(\.shape) }

    /// Size of the tensor data in bytes.
    public var dataBytes: Int { entries.values.reduce(0) { $0 + $1.range.count } }

    static let maxHeader = 100 << 20
    static let dtypeSizes: [String: Int] = [
        "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
        "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
    ]

    public init(path: String) throws {
        if path.hasSuffix(".ckpt") || path.hasSuffix(".pt") || path.hasSuffix(".pth") || path.hasSuffix(".bin") {
            throw SafeTensorsError(path: path, problem: """
                pickle checkpoints are refused: loading one runs arbitrary code. Convert it to \
                .safetensors first (e.g. in Python: safetensors.torch.save_file(torch.load(p, weights_only=True), out))
                """)
        }
        self.path = path
        file = try MappedFile(path: path)
        let b = file.bytes
        func fail(_ s: String) -> SafeTensorsError { SafeTensorsError(path: path, problem: s) }
        // A PyTorch checkpoint renamed .safetensors: a zip archive (torch.save since 1.6) or a raw pickle (protocol 2+).
        // (A real safetensors file has its JSON header's "{" at byte 8; its first bytes, the header length, may be anything.)
        if b.count >= 4, !(b.count > 8 && b[8] == UInt8(ascii: "{")),
           (b[0], b[1], b[2], b[3]) == (0x50, 0x4B, 0x03, 0x04) || (b[0] == 0x80 && (2...5).contains(b[1])) {
            throw fail("this is a PyTorch pickle checkpoint (\(b[0] == 0x50 ? "a torch.save zip archive" : "a raw pickle")) with a .safetensors name, not a safetensors file; pickle checkpoints are refused (loading one runs arbitrary code). Convert it first (e.g. in Python: safetensors.torch.save_file(torch.load(p, weights_only=True), out))")
        }
        guard b.count >= 8 else { throw fail("truncated: \(b.count) bytes, shorter than the 8-byte header length") }
        var n: UInt64 = 0
        for i in 0..<8 { n |= UInt64(b[i]) << (8 * UInt64(i)) }
        guard n <= UInt64(Self.maxHeader) else { throw fail("header length \(n) exceeds the \(Self.maxHeader)-byte limit") }
        guard 8 + Int(n) <= b.count else { throw fail("truncated: header says \(n) bytes, file has \(b.count - 8) after the length") }
        let headerData = Data(b[8..<(8 + Int(n))])
        guard let json = try? JSONSerialization.jsonObject(with: headerData), let header = json as? [String: Any] else {
            throw fail("header is not a JSON object")
        }
        dataStart = 8 + Int(n)
        let dataCount = b.count - dataStart
        var meta: [String: String] = [:]
        var entries: [String: Entry] = [:]
        for (name, value) in header {
            if name == "__metadata__" {
                guard let m = value as? [String: Any] else { throw fail("__metadata__ is not an object") }
                for (k, v) in m {
                    guard let s = v as? String else { throw fail("__metadata__[\(k)] is not a string") }
                    meta[k] = s
                }
                continue
            }
            guard let d = value as? [String: Any], let dtype = d["dtype"] as? String,
                  let shapeAny = d["shape"] as? [Any], let offs = d["data_offsets"] as? [Any], offs.count == 2 else {
                throw fail("tensor '\(name)' lacks dtype, shape or data_offsets")
            }
            guard let size = Self.dtypeSizes[dtype] else { throw fail("tensor '\(name)' has unknown dtype \(dtype)") }
            let shape = try shapeAny.map { v -> Int in
                guard let i = (v as? NSNumber)?.intValue, i >= 0 else { throw fail("tensor '\(name)' has a bad shape \(shapeAny)") }
                return i
            }
            guard let lo = (offs[0] as? NSNumber)?.intValue, let hi = (offs[1] as? NSNumber)?.intValue,
                  lo >= 0, hi >= lo, hi <= dataCount else {
                throw fail("tensor '\(name)' data_offsets \(offs) are outside the \(dataCount) data bytes")
            }
            let (elements, overflow) = shape.reduce((1, false)) { acc, d in
                let r = acc.0.multipliedReportingOverflow(by: d); return (r.partialValue, acc.1 || r.overflow)
            }
            guard !overflow, elements * size == hi - lo else {
                throw fail("tensor '\(name)': shape \(shape) × \(dtype) needs \(elements * size) bytes, offsets give \(hi - lo)")
            }
            entries[name] = Entry(dtype: dtype, shape: shape, range: lo..<hi)
        }
        let sorted = entries.sorted { $0.value.range.lowerBound < $1.value.range.lowerBound }
        for (a, b) in zip(sorted, sorted.dropFirst()) where a.value.range.upperBound > b.value.range.lowerBound {
            throw fail("tensors '\(a.key)' and '\(b.key)' overlap")
        }
        self.entries = entries
        self.metadata = meta
        self.storage = Storage(borrowing: file.bytes, owner: file)
    }

    /// A zero-copy view of a float tensor (F32, F16, BF16).
    public func tensor(_ name: String) throws -> Tensor {
        guard let e = entries[name] else {
            throw SafeTensorsError(path: path, problem: "no tensor named '\(name)'")
        }
        let dtype: DType
        switch e.dtype {
        case "F32": dtype = .f32
        case "F16": dtype = .f16
        case "BF16": dtype = .bf16
        default: throw SafeTensorsError(path: path, problem: "tensor '\(name)' is \(e.dtype), not a float type")
        }
        return Tensor(shape: e.shape, dtype: dtype, storage: storage, byteOffset: dataStart + e.range.lowerBound)
    }

    /// An integer tensor (I64/I32) as Ints.
    public func integers(_ name: String) throws -> [Int] {
        guard let e = entries[name] else { throw SafeTensorsError(path: path, problem: "no tensor named '\(name)'") }
        let raw = UnsafeRawBufferPointer(rebasing: file.bytes[(dataStart + e.range.lowerBound)..<(dataStart + e.range.upperBound)])
        switch e.dtype {
        case "I64": return (0..<(raw.count / 8)).map { Int(raw.loadUnaligned(fromByteOffset: $0 * 8, as: Int64.self)) }
        case "I32": return (0..<(raw.count / 4)).map { Int(raw.loadUnaligned(fromByteOffset: $0 * 4, as: Int32.self)) }
        default: throw SafeTensorsError(path: path, problem: "tensor '\(name)' is \(e.dtype), not I64/I32")
        }
    }
}

/// Writes tensors + string metadata to `path` atomically: a temporary file in the same folder,
/// written tensor by tensor (a 7 GB checkpoint never sits in memory twice), fsynced, then renamed over
/// the target. On any failure the temporary file is removed and the target is left as it was.
public func writeSafeTensors(_ tensors: [String: Tensor], metadata: [String: String] = [:], to path: String) throws {
    var header: [String: Any] = [:]
    if !metadata.isEmpty { header["__metadata__"] = metadata }
    var offset = 0
    let names = tensors.keys.sorted()
    for name in names {
        let t = tensors[name]!
        let bytes = t.count * t.dtype.byteSize
        let dt = t.dtype == .f32 ? "F32" : t.dtype == .f16 ? "F16" : "BF16"
        header[name] = ["dtype": dt, "shape": t.shape, "data_offsets": [offset, offset + bytes]]
        offset += bytes
    }
    var json = try JSONSerialization.data(withJSONObject: header, options: [.sortedKeys])
    while json.count % 8 != 0 { json.append(0x20) }   // pad so tensor data is 8-byte aligned
    var prefix = Data()
    var n = UInt64(json.count).littleEndian
    withUnsafeBytes(of: &n) { prefix.append(contentsOf: $0) }
    prefix.append(json)

    let tmp = path + ".tmp-\(getpid())"
    let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    guard fd >= 0 else {
        throw SafeTensorsError(path: path, problem: "cannot create temporary file \(tmp) (\(String(cString: strerror(errno))))")
    }
    func fail(_ what: String) -> SafeTensorsError {
        let reason = String(cString: strerror(errno))
        close(fd)
        unlink(tmp)
        return SafeTensorsError(path: path, problem: "\(what) failed (\(reason)); nothing was replaced")
    }
    func writeAll(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var done = 0
        while done < bytes.count {
            let r = write(fd, bytes.baseAddress! + done, min(bytes.count - done, 1 << 30))
            if r < 0 { if errno == EINTR { continue }; return false }
            done += r
        }
        return true
    }
    guard prefix.withUnsafeBytes(writeAll) else { throw fail("write") }
    for name in names {
        guard tensors[name]!.withUnsafeBytes(writeAll) else { throw fail("write") }
    }
    guard fsync(fd) == 0 else { throw fail("fsync") }
    guard close(fd) == 0 else { unlink(tmp); throw SafeTensorsError(path: path, problem: "close failed") }
    guard rename(tmp, path) == 0 else {
        let reason = String(cString: strerror(errno))
        unlink(tmp)
        throw SafeTensorsError(path: path, problem: "rename into place failed (\(reason))")
    }
}
