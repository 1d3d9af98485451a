import Foundation

/// What `lora-dist dataset CONFIG` prints: the scan (images kept and skipped, each with its reason), each kept
/// image's bucket, caption coverage, tag frequency and kohya's steps-per-epoch arithmetic for world size 1.
public struct DatasetReport: Sendable {
    /// One usable image: its size (header only) and the bucket kohya's `select_bucket` gives it.
    public struct Entry: Sendable, Equatable {
        public let image: DatasetImage
        public let width: Int
        public let height: Int
        public let placement: Placement
    }
    /// One row of the bucket table: images in the bucket and samples (images × their repeats).
    public struct BucketRow: Sendable, Equatable {
        public let bucket: BucketSize
        public let images: Int
        public let samples: Int
    }
    public let source: String
    public let subsets: [SubsetConfig]
    public let entries: [Entry]
    /// Every skipped file (scan issues + unreadable images + images no bucket fits) and every kept image without a
    /// caption file, one per line.
    public let issues: [DatasetIssue]
    /// Kept images smaller than the smallest bucket side (upscaled to their bucket, as kohya does).
    public let upscaled: [DatasetIssue]
    /// Kept images with no usable caption file (they train on the class token, or an empty caption).
    public let missingCaptions: Int
    /// kohya `set_tag_frequency` counts, summed over subsets, most frequent first (ties by tag).
    public let tagFrequency: [(tag: String, count: Int)]
    public let batchSize: Int

    /// Per bucket (ascending width, height): images and samples.
    public var buckets: [BucketRow] {
        var images: [BucketSize: Int] = [:], samples: [BucketSize: Int] = [:]
        for e in entries {
            images[e.placement.bucket, default: 0] += 1
            samples[e.placement.bucket, default: 0] += e.image.repeats
        }
        return images.keys.sorted().map { BucketRow(bucket: $0, images: images[$0]!, samples: samples[$0]!) }
    }

    /// kohya `BucketManager` / `BaseDataset.make_buckets`: every bucket's sample list (each image repeated
    /// num_repeats times) is cut into batches of batch_size, the last one short; one epoch is the sum over
    /// buckets of ceil(samples / batch_size) steps (world size 1, no gradient accumulation).
    public var kohyaStepsPerEpoch: Int { buckets.reduce(0) { $0 + ($1.samples + batchSize - 1) / batchSize } }

    public var stepsLine: String {
        let total = buckets.reduce(0) { $0 + $1.samples }
        let parts = buckets.map { "ceil(\($0.samples)/\(batchSize))" }.joined(separator: " + ")
        return "kohya steps per epoch (1 rank, batch \(batchSize)): \(parts) = \(kohyaStepsPerEpoch) (\(total) samples)"
    }

    /// A folder (flat, or kohya `N_name/` subfolders) as a config with aspect-ratio buckets on, which is how
    /// such folders are trained (kohya users pass --enable_bucket; AI Toolkit always buckets).
    public static func folderConfig(_ url: URL, resolution: Int = 1024, captionExtension: String = ".txt",
                                    batchSize: Int = 1) -> DatasetConfig {
        var c = DatasetConfig.folder(url, captionExtension: captionExtension, resolution: [resolution, resolution])
        c.datasets = c.datasets.map { $0.map { s in var s = s; s.enableBucket = true; s.batchSize = batchSize; return s } }
        return c
    }

    /// Scan → size every image from its header → bucket it with its subset's settings. Throws `DatasetError`
    /// when no usable image is left, listing why each was skipped.
    public static func make(_ config: DatasetConfig) throws -> DatasetReport {
        let scan = try DatasetScan.scan(config)
        let subsets = config.subsets
        var issues = scan.issues
        var bucketings: [Int: Bucketing] = [:]
        var entries: [Entry] = [], upscaled: [DatasetIssue] = []
        for img in scan.images {
            let s = subsets[img.subset]
            guard let reso = s.resolution, let w = reso.first else {
                issues.append(DatasetIssue(path: img.path, reason: "subset has no resolution (set resolution in the config)"))
                continue
            }
            let h = reso.count > 1 ? reso[1] : w
            let bucketing: Bucketing
            if let b = bucketings[img.subset] { bucketing = b } else {
                // kohya without enable_bucket trains every image at exactly `resolution`: min = max = the side pins a
                // square resolution to that one bucket (a non-square one gets the few buckets between its sides).
                let cfg = s.enableBucket
                    ? BucketConfig(width: w, height: h, minSize: s.minBucketReso, maxSize: s.maxBucketReso,
                                   step: s.bucketResoSteps, noUpscale: s.bucketNoUpscale)
                    : BucketConfig(width: w, height: h, minSize: min(w, h), maxSize: max(w, h), step: s.bucketResoSteps)
                bucketing = try Bucketing(config: cfg)
                bucketings[img.subset] = bucketing
            }
            let size: (width: Int, height: Int)
            do { size = try ImageIO.size(of: img.path); try ImageIO.checkComplete(img.path) } catch {
                issues.append(DatasetIssue(path: img.path, reason: "unreadable image: \(error)")); continue
            }
            guard let p = bucketing.choose(width: size.width, height: size.height) else {
                issues.append(DatasetIssue(path: img.path, reason: "\(size.width)x\(size.height): no bucket fits (too small for bucket_reso_steps \(bucketing.config.step))"))
                continue
            }
            // Smaller than the smallest bucket side: kohya upscales it to cover its bucket (unless bucket_no_upscale),
            // and so does lora-dist; the report says so (it used to skip such images).
            if size.width < bucketing.minSize && size.height < bucketing.minSize && p.resizedWidth > size.width {
                upscaled.append(DatasetIssue(path: img.path, reason: "\(size.width)x\(size.height) upscaled to \(p.resizedWidth)x\(p.resizedHeight) for bucket \(p.bucket.width)x\(p.bucket.height), as kohya does (bucket_no_upscale = true keeps small images small)"))
            }
            entries.append(Entry(image: img, width: size.width, height: size.height, placement: p))
        }
        if entries.isEmpty {
            let detail = issues.map { "  \($0)" }.joined(separator: "\n")
            throw DatasetError("\(config.source): no usable image (every image was skipped):\n\(detail)")
        }
        // kohya counts tags per image folder; the report sums them over subsets.
        var freq: [String: Int] = [:]
        for si in subsets.indices {
            let caps = entries.filter { $0.image.subset == si }.compactMap { $0.image.caption }
            for (k, v) in Captions.tagFrequency(caps) { freq[k, default: 0] += v }
        }
        let tags = freq.map { (tag: $0.key, count: $0.value) }.sorted { ($0.count, $1.tag) > ($1.count, $0.tag) }
        return DatasetReport(source: config.source, subsets: subsets, entries: entries, issues: issues, upscaled: upscaled,
                             missingCaptions: entries.filter { $0.image.caption == nil }.count,
                             tagFrequency: tags, batchSize: config.subsets.first?.batchSize ?? 1)
    }

    /// The printable report (without the multi-rank arithmetic, which the command adds from its Coordinator).
    public func lines(topTags: Int = 20) -> [String] {
        var out: [String] = ["dataset \(source)"]
        let kept = Set(entries.map(\.image.path))
        let skipped = issues.filter { $0.skipped && !kept.contains($0.path) }
        out.append("images: \(entries.count) usable, \(skipped.count) skipped")
        for i in skipped { out.append("  \(i)") }
        for i in issues where !i.skipped || kept.contains(i.path) { out.append("  note: \(i.path): \(i.reason)") }
        for i in upscaled { out.append("  note: \(i.path): \(i.reason)") }
        for (i, s) in subsets.enumerated() {
            let n = entries.filter { $0.image.subset == i }.count
            out.append("subset \(i): \(s.imageDir ?? "?") — \(n) images × \(s.numRepeats) repeats"
                + (s.classTokens.map { ", class token '\($0)'" } ?? ""))
        }
        out.append("buckets (resolution → images, samples with repeats):")
        for r in buckets { out.append("  \(r.bucket) → \(r.images) images, \(r.samples) samples") }
        out.append("missing captions: \(missingCaptions)")
        out.append("top tags:")
        for t in tagFrequency.prefix(topTags) { out.append("  \(t.count)  \(t.tag)") }
        out.append(stepsLine)
        return out
    }
}
