import Foundation

/// A training TOML that cannot be used: names the file, the key and its value, and says what to do.
public struct TrainingConfigError: Error, CustomStringConvertible, Sendable {
    /// The file (or `<demo>` for the embedded demo).
    public let file: String
    /// The offending key, as written in the TOML (nil for whole-file problems such as a syntax error).
    public let key: String?
    public let message: String

    public init(file: String, key: String? = nil, _ message: String) {
        self.file = file; self.key = key; self.message = message
    }

    public var description: String {
        if let key { return "\(file): `\(key)`: \(message)" }
        return "\(file): \(message)"
    }
}

/// Levenshtein distance, for "did you mean" suggestions.
func editDistance(_ a: String, _ b: String) -> Int {
    let a = Array(a), b = Array(b)
    if a.isEmpty { return b.count }
    if b.isEmpty { return a.count }
    var previous = Array(0...b.count)
    var current = [Int](repeating: 0, count: b.count + 1)
    for i in 1...a.count {
        current[0] = i
        for j in 1...b.count {
            let substitution = previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)
            current[j] = min(previous[j] + 1, current[j - 1] + 1, substitution)
        }
        swap(&previous, &current)
    }
    return previous[b.count]
}

/// The closest candidate to `key` when close enough to be a plausible slip: edit distance ≤ max(2, a third of
/// the key's length), else a candidate that contains the key or is contained in it (both ≥ 6 characters, e.g.
/// `caption_ext` → `caption_extension`).
func closestKey(to key: String, in candidates: some Sequence<String>) -> String? {
    var best: (name: String, distance: Int)? = nil
    for c in candidates {
        let d = editDistance(key, c)
        if best == nil || d < best!.distance || (d == best!.distance && c < best!.name) { best = (c, d) }
    }
    guard let best else { return nil }
    let limit = max(2, key.count / 3)
    if best.distance <= limit { return best.name }
    // A key that is another with a prefix or suffix dropped or added (`bucket_reso` for `min_bucket_reso`).
    if let containing = candidates.filter({ $0.contains(key) || key.contains($0) }).min(by: { abs($0.count - key.count) < abs($1.count - key.count) }),
       min(containing.count, key.count) >= 6 {
        return containing
    }
    return nil
}
