import Base
import Foundation

// The coordinator: which rank trains on which images in which step, and which rank caches which latents.
//
// Everything here is a pure function of (manifest, seed, world size, per-rank batch, cache mode) and, for a plan,
// the epoch. Every rank computes it on its own and gets the same answer, so nothing about the plan is ever sent over
// MPI; resuming with the same world size recomputes the same plan and skips to step k.
//
// Terms. A *sample* is one use of one image (an image with repeats 10 gives 10 samples per epoch). A *step* is one
// micro-step: every rank runs forward/backward on one batch; the gradients are all-reduced; the optimizer is applied
// every `gradientAccumulation` steps (and at the end of an epoch, so that an accumulation window never spans epochs,
// as kohya's does at the end of its dataloader).
//
// Rules (documented for users; `summary` prints the consequences):
// 1. One bucket per step. All ranks' batches in a step share one bucket resolution, so every rank does the same work
//    and no rank waits for a larger image on another. Resolutions are never mixed, in a batch or in a step.
// 2. Ownership (latent-cache sharding). Each image has exactly one owner rank, which encodes its latents once. Per
//    bucket, every rank owns ⌊n/W⌋ or ⌈n/W⌉ of the bucket's n images (equal encoding work), and among the choices that
//    keep that, images are dealt largest-repeats-first to the rank with the fewest samples so far (equal training
//    work). Ownership depends on the seed and the world size but not on the epoch (the cache outlives epochs); a
//    different world size gives different owners, so a cache must be re-sharded (re-encoded) when W changes.
// 3. Each rank draws its batches from its own shard first: with a node-local cache it then reads only its own disk.
//    The tension: "same bucket for every rank in a step" and "each rank only its own images" conflict when a bucket's
//    samples are not spread evenly over the ranks (uneven repeats, n not divisible by W, a bucket with fewer images
//    than ranks). The cache mode decides who gives way:
//    - `.shared` (one cache directory on a shared filesystem, each file written only by its owner): a step takes
//      W×B samples of its bucket; each rank takes up to B of its own; a rank that runs dry *borrows* from the rank
//      with the most samples of that bucket left (reading the lender's latents from the shared cache). The bucket then
//      needs ⌈S/(W·B)⌉ steps for its S samples, and only its last step can be short of samples: it is filled by drawing
//      again from the same bucket (a rank's own images first), always the image with the fewest extra uses so far.
//      Extra uses per bucket per epoch: ⌈S/(W·B)⌉·W·B − S < W·B. Every batch is full (samples == B).
//    - `.nodeLocal` (each rank's cache on its node's scratch, invisible to others): ranks only ever train on images
//      they own, so coverage is per shard. The bucket needs T = max over ranks of ⌈S_r/B⌉ steps; a rank whose shard
//      runs dry before that refills from its own shard (fewest extra uses first). Extra uses for rank r: T·B − S_r,
//      small because shards are balanced by samples (rule 2). A rank that owns no image of the bucket (the bucket
//      has fewer images than ranks) gets an empty batch in that bucket's steps: samples 0, so the weighted all-reduce
//      gives it no weight; it still joins the all-reduce.
// 4. Order. Within an epoch the images of a rank's queue are shuffled; then all steps of all buckets are shuffled
//    together, so buckets interleave (as kohya shuffles its bucketed batches). Different epochs give different orders.
//
// Shuffling uses SplitMix64 (below), seeded from (seed, epoch, bucket, stream): a bucket's order does not change
// when another bucket is added or removed.

/// One image of the dataset manifest: its id (the path or key its latent is cached under), its bucket resolution
/// and how many times an epoch uses it.
public struct ManifestEntry: Codable, Hashable, Sendable {
    public let id: String
    public let width: Int
    public let height: Int
    public let repeats: Int

    public init(id: String, width: Int, height: Int, repeats: Int) {
        self.id = id
        self.width = width
        self.height = height
        self.repeats = repeats
    }

    public var bucket: Bucket { Bucket(width: width, height: height) }
}

/// A bucket resolution in pixels.
public struct Bucket: Codable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public let width: Int
    public let height: Int

    public init(width: Int, height: Int) {
        self.width = width
        self.height = height
    }

    public var description: String { "\(width)x\(height)" }

    public static func < (a: Bucket, b: Bucket) -> Bool {
        (a.width, a.height) < (b.width, b.height)
    }
}

/// Where the latent cache lives; named in the config as `node-local` or `shared`.
public enum CacheMode: String, Codable, Sendable, CaseIterable {
    /// Each rank's shard on its node's local scratch: ranks train only on images they own.
    case nodeLocal = "node-local"
    /// One directory on a shared filesystem: ranks may borrow each other's images to fill a step.
    case shared
}

public enum CoordinatorError: Error, Equatable, CustomStringConvertible {
    case emptyManifest
    case invalidWorldSize(Int)
    case invalidBatchSize(Int)
    case invalidGradientAccumulation(Int)
    case invalidRepeats(id: String, repeats: Int)
    case invalidBucket(id: String, width: Int, height: Int)
    case emptyID
    case duplicateID(String)

    public var description: String {
        switch self {
        case .emptyManifest:
            return "the dataset manifest has no images: point the config's dataset at a folder with images (and captions)"
        case .invalidWorldSize(let w):
            return "world size \(w) is invalid: it must be at least 1 (the number of MPI ranks)"
        case .invalidBatchSize(let b):
            return "per-rank batch size \(b) is invalid: set train_batch_size to 1 or more"
        case .invalidGradientAccumulation(let g):
            return "gradient accumulation \(g) is invalid: set gradient_accumulation_steps to 1 or more"
        case .invalidRepeats(let id, let r):
            return "image '\(id)' has repeats \(r): repeats must be 1 or more (drop the image from the manifest instead)"
        case .invalidBucket(let id, let w, let h):
            return "image '\(id)' has bucket \(w)x\(h): a bucket's width and height must both be positive; re-run bucketing"
        case .emptyID:
            return "an image in the manifest has an empty id: every image needs its path or key"
        case .duplicateID(let id):
            return "image id '\(id)' appears twice in the manifest: ids must be unique (they name the latent cache files)"
        }
    }
}

/// The plan of one epoch: identical on every rank.
public struct EpochPlan: Sendable {
    public struct Step: Sendable, Equatable {
        /// The one resolution every rank's batch has in this step.
        public let bucket: Bucket
        /// `batches[r]`: the image ids rank r trains on (an id may appear twice: repeats are independent draws).
        public let batches: [[String]]
        /// `samples[r] == batches[r].count`: the weight of rank r in this step's gradient average.
        public let samples: [Int]
        /// True on the last micro-step of an accumulation window (every `gradientAccumulation` steps, and the
        /// epoch's last step): all-reduce, then apply the optimizer.
        public let applyOptimizer: Bool
    }

    public let epoch: Int
    public let steps: [Step]
    /// Owner rank of every image id (the rank that encodes and caches its latents). Epoch-independent.
    public let owner: [String: Int]
    /// Samples beyond each image's repeats, drawn to fill steps (rule 3); counted so the cost is visible.
    public let fillSamples: Int
    /// Samples a rank trained on that another rank owns (`.shared` only; 0 in `.nodeLocal`).
    public let borrowedSamples: Int

    /// Optimizer steps in this epoch.
    public var optimizerSteps: Int { steps.reduce(0) { $0 + ($1.applyOptimizer ? 1 : 0) } }
}

public struct Coordinator: Sendable {
    public let worldSize: Int
    public let batchSize: Int
    public let gradientAccumulation: Int
    public let cacheMode: CacheMode
    public let seed: UInt64

    /// Manifest sorted by id: the plan does not depend on the order the manifest was listed in.
    private let entries: [ManifestEntry]
    /// Buckets in ascending (width, height) order, and each bucket's members (indices into `entries`, id order).
    private let buckets: [Bucket]
    private let members: [[Int]]
    /// `ownerOf[i]`: owner rank of entries[i].
    private let ownerOf: [Int]

    public init(manifest: [ManifestEntry], seed: UInt64, worldSize: Int, batchSize: Int,
                gradientAccumulation: Int = 1, cacheMode: CacheMode) throws {
        guard !manifest.isEmpty else { throw CoordinatorError.emptyManifest }
        guard worldSize >= 1 else { throw CoordinatorError.invalidWorldSize(worldSize) }
        guard batchSize >= 1 else { throw CoordinatorError.invalidBatchSize(batchSize) }
        guard gradientAccumulation >= 1 else { throw CoordinatorError.invalidGradientAccumulation(gradientAccumulation) }
        var seen = Set<String>()
        for e in manifest {
            guard !e.id.isEmpty else { throw CoordinatorError.emptyID }
            guard e.width > 0, e.height > 0 else {
                throw CoordinatorError.invalidBucket(id: e.id, width: e.width, height: e.height)
            }
            guard e.repeats >= 1 else { throw CoordinatorError.invalidRepeats(id: e.id, repeats: e.repeats) }
            guard seen.insert(e.id).inserted else { throw CoordinatorError.duplicateID(e.id) }
        }
        self.worldSize = worldSize
        self.batchSize = batchSize
        self.gradientAccumulation = gradientAccumulation
        self.cacheMode = cacheMode
        self.seed = seed
        let sorted = manifest.sorted { $0.id < $1.id }
        entries = sorted
        var byBucket: [Bucket: [Int]] = [:]
        for (i, e) in sorted.enumerated() { byBucket[e.bucket, default: []].append(i) }
        buckets = byBucket.keys.sorted()
        members = buckets.map { byBucket[$0]! }
        ownerOf = Self.assignOwners(entries: sorted, buckets: buckets, members: members,
                                    worldSize: worldSize, seed: seed)
    }

    /// The sample ids of the manifest (id order): a state records them, so a resume can say what changed.
    public var sampleIDs: [String] { entries.map(\.id) }

    /// The same manifest, seed and batch shape on another number of ranks (an elastic resume's old plan).
    public func resized(worldSize: Int) throws -> Coordinator {
        try Coordinator(manifest: entries, seed: seed, worldSize: worldSize, batchSize: batchSize,
                        gradientAccumulation: gradientAccumulation, cacheMode: cacheMode)
    }

    // MARK: ownership

    /// Rule 2: per bucket, ⌊n/W⌋ or ⌈n/W⌉ images per rank, dealt largest-repeats-first to the rank with the fewest
    /// samples (ties: fewest images, then a rotation carried across buckets so the ⌈⌉ ranks differ per bucket).
    private static func assignOwners(entries: [ManifestEntry], buckets: [Bucket], members: [[Int]],
                                     worldSize w: Int, seed: UInt64) -> [Int] {
        var owner = [Int](repeating: 0, count: entries.count)
        var rotation = 0
        for (b, bucket) in buckets.enumerated() {
            let ids = members[b]
            let n = ids.count
            // Seeded order among equal repeats: which image goes where is not decided by id spelling.
            var rng = SplitMix64.derive(seed, 0x6f77_6e65_7273, bucket.key)  // "owners"
            var order = ids
            rng.shuffle(&order)
            var position = [Int: Int]()
            for (p, i) in order.enumerated() { position[i] = p }
            order.sort { (entries[$0].repeats, position[$1]!) > (entries[$1].repeats, position[$0]!) }

            let floor = n / w, ceil = (n + w - 1) / w
            var count = [Int](repeating: 0, count: w)
            var samples = [Int](repeating: 0, count: w)
            for (k, i) in order.enumerated() {
                let remaining = n - k
                let deficit = count.reduce(0) { $0 + max(0, floor - $1) }
                // When the images left are exactly those needed to bring every rank to ⌊n/W⌋, only short ranks may take.
                let mustFill = remaining <= deficit
                var best = -1
                for r in 0..<w {
                    guard count[r] < ceil, !mustFill || count[r] < floor else { continue }
                    if best < 0 { best = r; continue }
                    let a = (samples[r], count[r], (r - rotation + w) % w)
                    let c = (samples[best], count[best], (best - rotation + w) % w)
                    if a < c { best = r }
                }
                owner[i] = best
                count[best] += 1
                samples[best] += entries[i].repeats
            }
            rotation = (rotation + n) % w
        }
        return owner
    }

    /// Owner rank of every image id (the rank that encodes and writes its latent). Epoch-independent.
    public var owner: [String: Int] {
        var map = [String: Int](minimumCapacity: entries.count)
        for (i, e) in entries.enumerated() { map[e.id] = ownerOf[i] }
        return map
    }

    /// The image ids rank `rank` owns (encodes and caches), in id order.
    public func shard(rank: Int) -> [String] {
        entries.indices.filter { ownerOf[$0] == rank }.map { entries[$0].id }
    }

    // MARK: counts (no plan needed)

    public var imageCount: Int { entries.count }
    /// Samples per epoch before fills: Σ repeats.
    public var samplesPerEpoch: Int { entries.reduce(0) { $0 + $1.repeats } }
    /// Samples per optimizer step over all ranks: batch × world × accumulation.
    public var globalBatch: Int { batchSize * worldSize * gradientAccumulation }

    /// Per bucket: the steps it takes and the fill samples it adds, for this world size (rule 3).
    private struct BucketCount { let bucket: Bucket; let images: Int; let samples: Int; let steps: Int; let fills: Int; let idleRankSteps: Int }

    private func bucketCounts(worldSize w: Int, ownerOf owners: [Int]) -> [BucketCount] {
        let bs = batchSize
        return buckets.indices.map { b in
            let ids = members[b]
            let s = ids.reduce(0) { $0 + entries[$1].repeats }
            switch cacheMode {
            case .shared:
                let t = (s + w * bs - 1) / (w * bs)
                return BucketCount(bucket: buckets[b], images: ids.count, samples: s, steps: t,
                                   fills: t * w * bs - s, idleRankSteps: 0)
            case .nodeLocal:
                var perRank = [Int](repeating: 0, count: w)
                for i in ids { perRank[owners[i]] += entries[i].repeats }
                let t = perRank.map { ($0 + bs - 1) / bs }.max()!
                let fills = perRank.reduce(0) { $0 + ($1 > 0 ? t * bs - $1 : 0) }
                let idle = perRank.filter { $0 == 0 }.count * t
                return BucketCount(bucket: buckets[b], images: ids.count, samples: s, steps: t,
                                   fills: fills, idleRankSteps: idle)
            }
        }
    }

    /// Micro-steps per epoch (each rank one batch per micro-step). The same every epoch.
    public var stepsPerEpoch: Int { bucketCounts(worldSize: worldSize, ownerOf: ownerOf).reduce(0) { $0 + $1.steps } }

    /// Optimizer steps per epoch: ⌈micro-steps / accumulation⌉ (a window never spans two epochs).
    public var optimizerStepsPerEpoch: Int {
        (stepsPerEpoch + gradientAccumulation - 1) / gradientAccumulation
    }

    /// Where training resumes after `completedOptimizerSteps` optimizer steps: the epoch, and the index of the
    /// micro-step in `plan(epoch:).steps` to start from.
    public func resumePoint(completedOptimizerSteps n: Int) -> (epoch: Int, step: Int) {
        precondition(n >= 0, "completed optimizer steps must be non-negative, got \(n)")
        let perEpoch = optimizerStepsPerEpoch
        return (n / perEpoch, (n % perEpoch) * gradientAccumulation)
    }

    // MARK: the plan

    public func plan(epoch: Int) -> EpochPlan {
        let w = worldSize, bs = batchSize
        let e = UInt64(bitPattern: Int64(epoch))
        var steps: [(bucket: Bucket, batches: [[Int]])] = []
        var fillSamples = 0, borrowed = 0
        var extra = [Int](repeating: 0, count: entries.count)

        for (b, bucket) in buckets.enumerated() {
            var rng = SplitMix64.derive(seed, e, bucket.key)
            // Fill preference order among a bucket's images, fresh each epoch.
            var fillOrder = members[b]
            rng.shuffle(&fillOrder)
            var own = [[Int]](repeating: [], count: w)
            for i in fillOrder { own[ownerOf[i]].append(i) }
            // Each rank's queue: its own images × repeats, shuffled; consumed from the end.
            var queue = own.map { imgs -> [Int] in
                var q = imgs.flatMap { [Int](repeating: $0, count: entries[$0].repeats) }
                rng.shuffle(&q)
                return q
            }
            // The image with the fewest extra uses, first in this epoch's fill order among equals.
            func fill(from candidates: [Int]) -> Int {
                var best = candidates[0]
                for i in candidates.dropFirst() where extra[i] < extra[best] { best = i }
                extra[best] += 1
                fillSamples += 1
                return best
            }
            let s = queue.reduce(0) { $0 + $1.count }
            switch cacheMode {
            case .shared:
                let t = (s + w * bs - 1) / (w * bs)
                for _ in 0..<t {
                    var batches = [[Int]](repeating: [], count: w)
                    for r in 0..<w {
                        while batches[r].count < bs, let i = queue[r].popLast() { batches[r].append(i) }
                    }
                    for r in 0..<w where batches[r].count < bs {
                        while batches[r].count < bs {
                            // Lender: most samples left; ties to the lowest rank.
                            var lender = 0
                            for q in 1..<w where queue[q].count > queue[lender].count { lender = q }
                            guard let i = queue[lender].popLast() else { break }
                            batches[r].append(i)
                            borrowed += 1
                        }
                        while batches[r].count < bs {
                            batches[r].append(fill(from: own[r].isEmpty ? fillOrder : own[r]))
                        }
                    }
                    steps.append((bucket, batches))
                }
            case .nodeLocal:
                let t = queue.map { ($0.count + bs - 1) / bs }.max()!
                for _ in 0..<t {
                    var batches = [[Int]](repeating: [], count: w)
                    for r in 0..<w where !own[r].isEmpty {
                        while batches[r].count < bs, let i = queue[r].popLast() { batches[r].append(i) }
                        while batches[r].count < bs { batches[r].append(fill(from: own[r])) }
                    }
                    steps.append((bucket, batches))
                }
            }
        }

        // Interleave buckets: shuffle all steps of the epoch together.
        var rng = SplitMix64.derive(seed, e, 0x7374_6570_73)  // "steps"
        rng.shuffle(&steps)
        let last = steps.count - 1
        let planned = steps.enumerated().map { k, step in
            EpochPlan.Step(
                bucket: step.bucket,
                batches: step.batches.map { $0.map { entries[$0].id } },
                samples: step.batches.map(\.count),
                applyOptimizer: (k + 1) % gradientAccumulation == 0 || k == last)
        }
        return EpochPlan(epoch: epoch, steps: planned, owner: owner,
                         fillSamples: fillSamples, borrowedSamples: borrowed)
    }

    // MARK: the arithmetic rank 0 prints

    /// Lines rank 0 prints at start: the arithmetic users always ask about, for `epochs` epochs.
    public func summary(epochs: Int) -> [String] {
        let counts = bucketCounts(worldSize: worldSize, ownerOf: ownerOf)
        let micro = counts.reduce(0) { $0 + $1.steps }
        let fills = counts.reduce(0) { $0 + $1.fills }
        let opt = optimizerStepsPerEpoch
        let s = samplesPerEpoch
        let perStep = batchSize * worldSize
        let ranks = worldSize == 1 ? "1 rank" : "\(worldSize) ranks"
        var lines: [String] = []
        lines.append("dataset: \(imageCount) images in \(buckets.count) bucket\(buckets.count == 1 ? "" : "s"); "
            + "images × repeats = \(s) samples per epoch")
        lines.append("per-rank batch \(batchSize) × world size \(worldSize) = \(perStep) samples per micro-step; "
            + "× gradient accumulation \(gradientAccumulation) = global batch \(globalBatch) samples per optimizer step")
        let ideal = Double(s) / Double(perStep)
        lines.append("steps per epoch: \(opt) optimizer steps (\(micro) micro-steps; \(s) / \(perStep) = "
            + String(format: "%.1f", ideal) + " before rounding each bucket up to whole steps, "
            + "which adds \(fills) fill sample\(fills == 1 ? "" : "s"))")
        if epochs >= 1 {
            lines.append("total for \(epochs) epoch\(epochs == 1 ? "" : "s"): \(opt * epochs) optimizer steps "
                + "(\(micro * epochs) micro-steps, \((s + fills) * epochs) samples seen)")
        }
        for c in counts {
            var line = "  bucket \(c.bucket): \(c.images) images, \(c.samples) samples → \(c.steps) micro-step\(c.steps == 1 ? "" : "s")"
            if c.fills > 0 { line += ", \(c.fills) fill" }
            if c.idleRankSteps > 0 { line += ", \(c.idleRankSteps) empty rank-batches (ranks owning none of it)" }
            lines.append(line)
        }
        switch cacheMode {
        case .shared:
            lines.append("latent cache: shared — each rank encodes its shard (\(shardRange())) into one directory; "
                + "a rank short of its own images in a step borrows another's from the shared cache")
        case .nodeLocal:
            lines.append("latent cache: node-local — each rank encodes and trains on its own shard only (\(shardRange())); "
                + "a rank whose shard of a bucket runs dry refills from the same shard")
        }
        // How it changes with N: the same dataset and batch at other world sizes.
        var sizes = [1, 2, 4, 8, 16]
        if !sizes.contains(worldSize) { sizes.append(worldSize); sizes.sort() }
        let alternatives = sizes.map { n -> String in
            let owners = n == worldSize ? ownerOf
                : Self.assignOwners(entries: entries, buckets: buckets, members: members, worldSize: n, seed: seed)
            let m = bucketCounts(worldSize: n, ownerOf: owners).reduce(0) { $0 + $1.steps }
            let o = (m + gradientAccumulation - 1) / gradientAccumulation
            return "\(n) → \(o)"
        }
        lines.append("optimizer steps per epoch by world size (batch \(batchSize), accumulation \(gradientAccumulation)): "
            + alternatives.joined(separator: ", ") + "; with \(ranks): \(opt) per epoch")
        return lines
    }

    private func shardRange() -> String {
        var counts = [Int](repeating: 0, count: worldSize)
        for r in ownerOf { counts[r] += 1 }
        let lo = counts.min()!, hi = counts.max()!
        return lo == hi ? "\(lo) images per rank" : "\(lo)–\(hi) images per rank"
    }
}

extension Bucket {
    /// Stable per-bucket stream key: a bucket's shuffle does not depend on which other buckets exist.
    fileprivate var key: UInt64 { UInt64(truncatingIfNeeded: width) << 32 | UInt64(truncatingIfNeeded: height) }
}

