import Base
import Foundation
import SafeTensors
import Tensor

// The latent cache: the VAE encodes every (image, bucket, crop, flip) once, and later epochs / runs read the
// latents back. kohya (library/train_util.py, `is_disk_cached_latents_is_expected` + `save_latents_to_disk`)
// names the .npz after the image and only checks that the expected keys exist (and the latent size), so an
// edited image, or a new VAE, silently keeps its old latents. Here every entry is self-validating:
//
// * The key is the image's CONTENT hash (`hashFile`), the bucket, the crop, the original size, the flip and
//   the VAE identity. The file name is a hash of all of them, so any change in an input names a different
//   file (an edited image or a new VAE is simply a miss; the old file is an orphan, see `orphans(keeping:)`).
// * Every key field is also written into the file's `__metadata__` and compared on read, so a file that
//   does not belong to its name (hash collision, an older format, a copied-in file) is reported stale.
// * A file that cannot be read (truncated, garbage, wrong dtype/shape, non-finite values) is reported
//   corrupt with its path and reason, and `ensure` re-encodes it.
//
// What is stored: the VAE posterior's mean and logvar as fp32 [4, h/8, w/8] (fp32, not fp16: a 1024² entry
// is 2 × 256 KiB, small next to the image, and fp16 would round the logvar's exp() noticeably), so training
// can draw `mean + exp(logvar/2)·ε` per step as `latent_dist.sample()` does, plus SDXL's conditioning
// numbers (original size, crop top-left, target size = bucket) and the flip flag.
//
// Writes go through `writeSafeTensors`, which writes a temporary file and renames it into place, so a crash
// or a throwing encoder never leaves a partial entry under a real name.

/// Identifies one cached latent. Two keys are the same entry exactly when every field is equal.
public struct LatentKey: Hashable, Sendable, CustomStringConvertible {
    /// `LatentCache.hashFile` of the image's bytes: editing the image changes it.
    public let imageHash: String
    /// Where the image was read from; for messages only (NOT part of the identity: moving a folder keeps
    /// its latents valid).
    public let imagePath: String
    /// The bucket (= SDXL target size) the image is trimmed to; width and height are multiples of 8.
    public let bucket: BucketSize
    /// Crop top-left in the resized image (kohya's `crop_ltrb` left/top; SDXL's `crop_top_lefts`).
    public let cropLeft: Int
    public let cropTop: Int
    /// The image's size before resizing (SDXL's `original_sizes_hw`).
    public let originalWidth: Int
    public let originalHeight: Int
    public let flip: Bool
    /// `LatentCache.vaeIdentity(weightsPath:)` or any string that changes when the encoder changes (callers
    /// may append the encode precision, e.g. "…/fp32").
    public let vaeIdentity: String

    public init(imageHash: String, imagePath: String = "", bucket: BucketSize, cropLeft: Int, cropTop: Int,
                originalWidth: Int, originalHeight: Int, flip: Bool, vaeIdentity: String) {
        self.imageHash = imageHash
        self.imagePath = imagePath
        self.bucket = bucket
        self.cropLeft = cropLeft
        self.cropTop = cropTop
        self.originalWidth = originalWidth
        self.originalHeight = originalHeight
        self.flip = flip
        self.vaeIdentity = vaeIdentity
    }

    // imagePath is a label, not identity.
    public static func == (a: LatentKey, b: LatentKey) -> Bool { a.fields == b.fields }
    public func hash(into h: inout Hasher) { h.combine(fields) }

    /// The identity fields as stored in the file's `__metadata__` (all strings, as safetensors requires).
    var fields: [String: String] {
        [
            "format": LatentCache.formatVersion,
            "image_hash": imageHash,
            "bucket": "\(bucket.width),\(bucket.height)",
            "crop_left_top": "\(cropLeft),\(cropTop)",
            "original_size": "\(originalWidth),\(originalHeight)",
            "flip": flip ? "1" : "0",
            "vae": vaeIdentity,
        ]
    }

    /// The latent's shape: the SDXL VAE downsamples by 8 into 4 channels.
    public var latentShape: [Int] { [4, bucket.height / 8, bucket.width / 8] }

    /// `<fnv1a64 of the identity fields>.safetensors`.
    public var fileName: String {
        var h = FNV1a64()
        for k in fields.keys.sorted() {
            h.add(Array(k.utf8)); h.add([0]); h.add(Array(fields[k]!.utf8)); h.add([0])
        }
        return h.hex + ".safetensors"
    }

    public var description: String {
        "\(imagePath.isEmpty ? imageHash : imagePath) @\(bucket) crop(\(cropLeft),\(cropTop))\(flip ? " flipped" : "")"
    }
}

/// One entry read back from the cache.
public struct CachedLatent: @unchecked Sendable {
    public let key: LatentKey
    /// fp32 [4, h/8, w/8].
    public let mean: Tensor
    public let logvar: Tensor
    /// SDXL micro-conditioning, height first as kohya passes it (`original_sizes_hw`, `crop_top_lefts`,
    /// `target_sizes_hw`).
    public var originalSizeHW: (Int, Int) { (key.originalHeight, key.originalWidth) }
    public var cropTopLeft: (Int, Int) { (key.cropTop, key.cropLeft) }
    public var targetSizeHW: (Int, Int) { (key.bucket.height, key.bucket.width) }
    public var flip: Bool { key.flip }
}

/// What a lookup found.
public enum LatentLookup {
    case hit(CachedLatent)
    case absent
    /// The file under the key's name belongs to other inputs (a field differs).
    case stale(path: String, reason: String)
    /// The file cannot be used (unreadable, truncated, wrong shape/dtype, non-finite values).
    case corrupt(path: String, reason: String)
}

/// What `ensure` did.
public struct CacheReport: Equatable, Sendable {
    /// Keys already cached and valid.
    public var hits = 0
    /// Keys encoded because no entry existed.
    public var misses = 0
    /// Keys whose entry was stale or corrupt and was re-encoded: one issue each, naming the file and reason.
    public var rebuilt: [DatasetIssue] = []
    /// Keys left to other ranks by the assignment.
    public var skippedNotAssigned = 0
    public init() {}
    /// Number of encoder calls this `ensure` made.
    public var encoded: Int { misses + rebuilt.count }
}

/// The latent cache, on disk (one safetensors file per key) or in memory. Safe to use from several threads.
public final class LatentCache: @unchecked Sendable {
    public enum Storage: Sendable { case disk(URL), memory }

    static let formatVersion = "lora-dist.latent.v1"

    public let storage: Storage
    private let lock = NSLock()
    private var memory: [LatentKey: CachedLatent] = [:]

    /// For `.disk`, creates the folder if needed.
    public init(storage: Storage) throws {
        self.storage = storage
        if case .disk(let dir) = storage {
            do {
                try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            } catch {
                throw DatasetError("latent cache folder \(dir.path) cannot be created: \(error.localizedDescription)")
            }
        }
    }

    /// The file an entry lives in (disk mode), nil in memory mode.
    public func path(for key: LatentKey) -> String? {
        if case .disk(let dir) = storage { return dir.appendingPathComponent(key.fileName).path }
        return nil
    }

    /// The entry for `key`, or nil if absent, stale or corrupt (use `check` for the reason).
    public func lookup(_ key: LatentKey) -> CachedLatent? {
        if case .hit(let c) = check(key) { return c }
        return nil
    }

    /// Reads and validates the entry for `key`.
    public func check(_ key: LatentKey) -> LatentLookup {
        guard let path = path(for: key) else {
            lock.lock(); defer { lock.unlock() }
            return memory[key].map { .hit($0) } ?? .absent
        }
        switch readCacheEntry(path: path, fields: key.fields, tensors: [("mean", key.latentShape), ("logvar", key.latentShape)]) {
        case .tensors(let t): return .hit(CachedLatent(key: key, mean: t[0], logvar: t[1]))
        case .absent: return .absent
        case .stale(let path, let reason): return .stale(path: path, reason: reason)
        case .corrupt(let path, let reason): return .corrupt(path: path, reason: reason)
        }
    }

    /// Makes every key this rank is assigned present and valid, encoding the absent, stale and corrupt ones.
    /// `isAssigned` selects this rank's share (e.g. `{ coordinator.owner(of: index) == rank }`, mapped
    /// through the caller's key → index table); keys it rejects are counted and left to their owners.
    /// An encoder error propagates; entries written before it stay (each is complete), and none is written
    /// for the failing key.
    @discardableResult
    public func ensure(_ keys: [LatentKey], isAssigned: (LatentKey) -> Bool = { _ in true },
                       encode: (LatentKey) throws -> (mean: Tensor, logvar: Tensor)) throws -> CacheReport {
        var report = CacheReport()
        var seen = Set<LatentKey>()
        for key in keys where seen.insert(key).inserted {
            guard isAssigned(key) else { report.skippedNotAssigned += 1; continue }
            switch check(key) {
            case .hit: report.hits += 1; continue
            case .absent: report.misses += 1
            case .stale(let path, let reason), .corrupt(let path, let reason):
                report.rebuilt.append(DatasetIssue(path: path, reason: "latent cache entry for \(key) rebuilt: \(reason)"))
            }
            let (mean, logvar) = try encode(key)
            try store(key, mean: mean, logvar: logvar)
        }
        return report
    }

    /// Writes one entry (atomically on disk). The tensors must have the key's latent shape.
    public func store(_ key: LatentKey, mean: Tensor, logvar: Tensor) throws {
        for (name, t) in [("mean", mean), ("logvar", logvar)] where t.shape != key.latentShape {
            throw DatasetError("VAE encoder returned \(name) of shape \(t.shape) for \(key); expected \(key.latentShape)")
        }
        let m = mean.fp32(), lv = logvar.fp32()
        guard let path = path(for: key) else {
            // Own copies, so the caller's buffers can be reused.
            let entry = CachedLatent(key: key, mean: Tensor(shape: m.shape, m.scalars), logvar: Tensor(shape: lv.shape, lv.scalars))
            lock.lock(); memory[key] = entry; lock.unlock()
            return
        }
        do {
            try writeSafeTensors(["mean": m, "logvar": lv], metadata: key.fields, to: path)
        } catch {
            throw DatasetError("latent cache entry \(path) cannot be written: \(error)")
        }
    }

    /// Disk mode: cache files that belong to none of `keys` (left by edited images, other buckets or an old
    /// VAE). The caller decides whether to delete them; nothing here deletes on its own.
    public func orphans(keeping keys: [LatentKey]) -> [String] {
        guard case .disk(let dir) = storage else { return [] }
        let wanted = Set(keys.map(\.fileName))
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []
        return names.filter { $0.hasSuffix(".safetensors") && !wanted.contains($0) }.sorted()
            .map { dir.appendingPathComponent($0).path }
    }

    /// A content hash of a file's bytes: "fnv1a64:<16 hex>:<byte count>".
    ///
    /// FNV-1a 64 (no crypto library is a dependency here). It is not collision-resistant against an
    /// adversary, only against accident: for n distinct images the chance of any collision is about
    /// n²/2⁶⁵ (10⁶ images: ~3·10⁻⁸), and the byte count must also match. A collision would need the two
    /// images to also share bucket, crop and original size to alias an entry.
    public static func hashFile(_ path: String) throws -> String {
        guard let handle = FileHandle(forReadingAtPath: path) else {
            throw DatasetError("cannot open \(path) to hash it")
        }
        defer { try? handle.close() }
        var h = FNV1a64()
        var total = 0
        while true {
            let chunk: Data
            do { chunk = try handle.read(upToCount: 1 << 20) ?? Data() } catch {
                throw DatasetError("cannot read \(path) to hash it: \(error.localizedDescription)")
            }
            if chunk.isEmpty { break }
            total += chunk.count
            chunk.withUnsafeBytes { h.add($0) }
        }
        return "fnv1a64:\(h.hex):\(total)"
    }

    /// The identity of a VAE weights file (safetensors): FNV-1a 64 over every tensor's name, dtype and shape
    /// (sorted), the file size, and three 64 KiB samples of the bytes (start, middle, end of the data).
    /// Not path + mtime: copying the same VAE elsewhere keeps the cache, while any retrained/fine-tuned VAE
    /// (every weight changes) or a different architecture changes it. It reads ~200 KiB, not the whole file.
    public static func vaeIdentity(weightsPath: String) throws -> String {
        let file: SafeTensorsFile
        do { file = try SafeTensorsFile(path: weightsPath) } catch {
            throw DatasetError("VAE weights \(weightsPath) unreadable: \(error)")
        }
        var h = FNV1a64()
        for name in file.names {
            let e = file.entries[name]!
            h.add(Array("\(name)|\(e.dtype)|\(e.shape)\n".utf8))
        }
        guard let handle = FileHandle(forReadingAtPath: weightsPath) else {
            throw DatasetError("cannot open VAE weights \(weightsPath)")
        }
        defer { try? handle.close() }
        let size = Int((try? handle.seekToEnd()) ?? 0)
        h.add(Array("size=\(size)".utf8))
        let sample = 64 << 10
        for start in Set([0, max(0, size / 2 - sample / 2), max(0, size - sample)]).sorted() {
            try? handle.seek(toOffset: UInt64(start))
            let d = (try? handle.read(upToCount: sample)) ?? Data()
            d.withUnsafeBytes { h.add($0) }
        }
        return "vae-fnv1a64:\(h.hex)"
    }
}


