import Base
import Foundation
import SafeTensors
import Tensor

// The text-encoder output cache: with frozen text encoders and captions that are the same every step, the
// encoders' outputs (SDXL: the concatenated hidden states "context" and text encoder 2's pooled output) are a
// pure function of the processed caption, so each distinct caption is encoded once and read back afterwards.
// kohya does this with `--cache_text_encoder_outputs` (library/train_util.py `cache_text_encoder_outputs`,
// guarded by `BaseDataset.is_text_encoder_output_cacheable`, which rejects shuffle_caption,
// caption_dropout_rate, caption_tag_dropout_rate and token warm-up). Here the check is stricter, see
// `varyingOption`.
//
// Entries are self-validating like `LatentCache`'s: the file name is an FNV-1a 64 hash of the identity
// fields (the processed caption, the max token length and the caller's text-encoder identity), and every
// field is written into `__metadata__` and compared on read, so a changed encoder or token length is a
// different entry, a file that does not belong to its name is stale, and an unreadable one is corrupt; both
// are re-encoded by `ensure` with the reason reported.

/// Identifies one cached text-encoder output. Equal exactly when every field is equal.
public struct TextKey: Hashable, Sendable, CustomStringConvertible {
    /// The caption after `Captions.process` (prefix/suffix, first line, trigger): exactly what is tokenized.
    public let caption: String
    /// kohya `max_token_length` (75, 150 or 225 → 77, 152, 227 tokens with BOS/EOS): changes the context length.
    public let maxTokenLength: Int
    /// Any string that changes when an encoder changes (weights identity, precision, clip skip, …).
    public let encoderIdentity: String

    public init(caption: String, maxTokenLength: Int, encoderIdentity: String) {
        self.caption = caption
        self.maxTokenLength = maxTokenLength
        self.encoderIdentity = encoderIdentity
    }

    /// The identity fields as stored in the file's `__metadata__`.
    var fields: [String: String] {
        [
            "format": TextCache.formatVersion,
            "caption": caption,
            "max_token_length": String(maxTokenLength),
            "text_encoder": encoderIdentity,
        ]
    }

    /// `text-<fnv1a64 of the identity fields>.safetensors`.
    public var fileName: String {
        var h = FNV1a64()
        for k in fields.keys.sorted() {
            h.add(Array(k.utf8)); h.add([0]); h.add(Array(fields[k]!.utf8)); h.add([0])
        }
        return "text-" + h.hex + ".safetensors"
    }

    public var description: String {
        let short = caption.count > 60 ? String(caption.prefix(57)) + "..." : caption
        return "caption \"\(short)\" (max_token_length \(maxTokenLength))"
    }
}

/// One entry read back from the cache.
public struct CachedText: @unchecked Sendable {
    public let key: TextKey
    /// fp32 encoder hidden states, e.g. [77, 2048] for SDXL.
    public let context: Tensor
    /// fp32 pooled output, e.g. [1280] for SDXL.
    public let pooled: Tensor
}

/// What a lookup found.
public enum TextLookup {
    case hit(CachedText)
    case absent
    /// The file under the key's name belongs to other inputs (a field differs).
    case stale(path: String, reason: String)
    /// The file cannot be used (unreadable, missing tensor, wrong dtype/shape, non-finite values).
    case corrupt(path: String, reason: String)
}

/// The text-encoder output cache, on disk (one safetensors file per caption) or in memory. Thread-safe.
public final class TextCache: @unchecked Sendable {
    public enum Storage: Sendable { case disk(URL), memory }

    static let formatVersion = "lora-dist.text.v1"

    public let storage: Storage
    /// When set, every entry read or stored must have these shapes (e.g. [77, 2048] and [1280]).
    public let contextShape: [Int]?
    public let pooledShape: [Int]?
    private let lock = NSLock()
    private var memory: [TextKey: CachedText] = [:]

    /// The kohya option (by its config name) that makes a subset's processed caption differ between steps,
    /// or nil when the caption is a fixed function of the caption file. Checked in this order:
    /// * `shuffle_caption`: tag order is redrawn every step.
    /// * `caption_dropout_rate` > 0: the caption is replaced by "" at random.
    /// * `caption_dropout_every_n_epochs` > 0: the caption is "" on every n-th epoch (kohya's
    ///   `is_text_encoder_output_cacheable` misses this one and would keep using the cached non-empty caption).
    /// * `caption_tag_dropout_rate` > 0: tags are dropped at random.
    /// * `enable_wildcard`: a multi-line caption picks one line per step and `{a|b}` picks one alternative
    ///   (kohya misses this too). Judged from the options alone, so it counts even if no caption has either.
    /// Not varying: keep_tokens / separators (only matter with shuffle or tag dropout), prefix, suffix and
    /// trigger (fixed text). kohya's `token_warmup_step` is not part of `CaptionOptions`.
    public static func varyingOption(_ o: CaptionOptions) -> String? {
        if o.shuffle { return "shuffle_caption = true" }
        if o.captionDropoutRate > 0 { return "caption_dropout_rate = \(o.captionDropoutRate)" }
        if o.dropoutEveryNEpochs > 0 { return "caption_dropout_every_n_epochs = \(o.dropoutEveryNEpochs)" }
        if o.tagDropoutRate > 0 { return "caption_tag_dropout_rate = \(o.tagDropoutRate)" }
        if o.enableWildcard { return "enable_wildcard = true" }
        return nil
    }

    /// Whether captions processed with `options` are the same every step, so their encodings can be cached.
    public static func isStatic(options: CaptionOptions) -> Bool { varyingOption(options) == nil }

    /// Throws, naming the first subset and option that makes captions vary, or the trained text encoder;
    /// the training loop then encodes each step instead.
    public static func requireCacheable(captionOptions: [CaptionOptions], textEncodersTrained: Bool) throws {
        if textEncodersTrained {
            throw DatasetError("text-encoder outputs cannot be cached: the text encoders are being trained, so their "
                + "outputs change every step; turn off cache_text_encoder_outputs (captions are encoded each step)")
        }
        for (i, o) in captionOptions.enumerated() {
            if let why = varyingOption(o) {
                throw DatasetError("text-encoder outputs cannot be cached: subset \(i) has \(why), so its captions "
                    + "change between steps; turn it off or turn off cache_text_encoder_outputs (captions are encoded each step)")
            }
        }
    }

    /// Refuses (throws `DatasetError`) unless every subset's captions are static and the encoders are frozen.
    /// For `.disk`, creates the folder if needed.
    public init(storage: Storage, captionOptions: [CaptionOptions], textEncodersTrained: Bool = false,
                contextShape: [Int]? = nil, pooledShape: [Int]? = nil) throws {
        try Self.requireCacheable(captionOptions: captionOptions, textEncodersTrained: textEncodersTrained)
        self.storage = storage
        self.contextShape = contextShape
        self.pooledShape = pooledShape
        if case .disk(let dir) = storage {
            do {
                try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            } catch {
                throw DatasetError("text-encoder cache folder \(dir.path) cannot be created: \(error.localizedDescription)")
            }
        }
    }

    public func key(_ caption: String, maxTokenLength: Int, encoderIdentity: String) -> TextKey {
        TextKey(caption: caption, maxTokenLength: maxTokenLength, encoderIdentity: encoderIdentity)
    }

    /// The file an entry lives in (disk mode), nil in memory mode.
    public func path(for key: TextKey) -> String? {
        if case .disk(let dir) = storage { return dir.appendingPathComponent(key.fileName).path }
        return nil
    }

    /// The entry for `key`, or nil if absent, stale or corrupt (use `check` for the reason).
    public func lookup(_ key: TextKey) -> CachedText? {
        if case .hit(let c) = check(key) { return c }
        return nil
    }

    /// Reads and validates the entry for `key`.
    public func check(_ key: TextKey) -> TextLookup {
        guard let path = path(for: key) else {
            lock.lock(); defer { lock.unlock() }
            return memory[key].map { .hit($0) } ?? .absent
        }
        switch readCacheEntry(path: path, fields: key.fields, tensors: [("context", contextShape), ("pooled", pooledShape)]) {
        case .tensors(let t): return .hit(CachedText(key: key, context: t[0], pooled: t[1]))
        case .absent: return .absent
        case .stale(let path, let reason): return .stale(path: path, reason: reason)
        case .corrupt(let path, let reason): return .corrupt(path: path, reason: reason)
        }
    }

    /// Makes every processed caption present and valid under (maxTokenLength, encoderIdentity), encoding the
    /// absent, stale and corrupt ones; duplicates are encoded once. An encoder error propagates; entries
    /// written before it stay, and none is written for the failing caption.
    @discardableResult
    public func ensure(captions: [String], maxTokenLength: Int, encoderIdentity: String,
                       encode: (String) throws -> (context: Tensor, pooled: Tensor)) throws -> CacheReport {
        var report = CacheReport()
        var seen = Set<String>()
        for caption in captions where seen.insert(caption).inserted {
            let k = key(caption, maxTokenLength: maxTokenLength, encoderIdentity: encoderIdentity)
            switch check(k) {
            case .hit: report.hits += 1; continue
            case .absent: report.misses += 1
            case .stale(let path, let reason), .corrupt(let path, let reason):
                report.rebuilt.append(DatasetIssue(path: path, reason: "text-encoder cache entry for \(k) rebuilt: \(reason)"))
            }
            let out = try encode(caption)
            try store(k, context: out.context, pooled: out.pooled)
        }
        return report
    }

    /// Writes one entry (atomically on disk), as fp32.
    public func store(_ key: TextKey, context: Tensor, pooled: Tensor) throws {
        for (name, t, want) in [("context", context, contextShape), ("pooled", pooled, pooledShape)] {
            if let want, t.shape != want {
                throw DatasetError("text encoder returned \(name) of shape \(t.shape) for \(key); expected \(want)")
            }
        }
        let c = context.fp32(), p = pooled.fp32()
        guard let path = path(for: key) else {
            let entry = CachedText(key: key, context: Tensor(shape: c.shape, c.scalars), pooled: Tensor(shape: p.shape, p.scalars))
            lock.lock(); memory[key] = entry; lock.unlock()
            return
        }
        do {
            try writeSafeTensors(["context": c, "pooled": p], metadata: key.fields, to: path)
        } catch {
            throw DatasetError("text-encoder cache entry \(path) cannot be written: \(error)")
        }
    }
}
