import Foundation
import SafeTensors
import Tensor

/// What reading one self-validating cache file found (the latent and the text-encoder caches share it).
enum CacheEntryRead {
    case tensors([Tensor])
    case absent
    case stale(path: String, reason: String)
    case corrupt(path: String, reason: String)
}

/// Reads a cache entry written with its key fields in `__metadata__`: a metadata mismatch is stale; an
/// unreadable file, a missing tensor, a non-F32 dtype, a wrong shape (where `shape` is given) or non-finite
/// values are corrupt. Tensors are copied out of the mapping: the file may be rebuilt while they are in use.
func readCacheEntry(path: String, fields: [String: String], tensors specs: [(name: String, shape: [Int]?)]) -> CacheEntryRead {
    guard FileManager.default.fileExists(atPath: path) else { return .absent }
    let file: SafeTensorsFile
    do { file = try SafeTensorsFile(path: path) } catch {
        let problem = (error as? SafeTensorsError)?.problem ?? "\(error)"
        return .corrupt(path: path, reason: "unreadable safetensors: \(problem)")
    }
    for (k, expected) in fields.sorted(by: { $0.key < $1.key }) {
        let found = file.metadata[k]
        if found != expected {
            return .stale(path: path, reason: "metadata '\(k)' is \(found.map { "'\($0)'" } ?? "missing"), expected '\(expected)'")
        }
    }
    var tensors: [Tensor] = []
    for (name, want) in specs {
        guard let e = file.entries[name] else { return .corrupt(path: path, reason: "no tensor '\(name)'") }
        guard e.dtype == "F32" else { return .corrupt(path: path, reason: "tensor '\(name)' is \(e.dtype), expected F32") }
        if let want, e.shape != want {
            return .corrupt(path: path, reason: "tensor '\(name)' has shape \(e.shape), expected \(want)")
        }
        guard let t = try? file.tensor(name) else { return .corrupt(path: path, reason: "tensor '\(name)' unreadable") }
        let values = t.scalars
        guard values.allSatisfy(\.isFinite) else { return .corrupt(path: path, reason: "tensor '\(name)' has non-finite values") }
        tensors.append(Tensor(shape: e.shape, values))
    }
    return .tensors(tensors)
}
