import XCTest
@testable import Training

/// The coordinator's invariants over many seeded random manifests, world sizes 1–5, batches 1–4, both cache modes,
/// plus hand-checked arithmetic. Pure Swift: no MPI needed (every rank computes the same function).
final class CoordinatorTests: XCTestCase {
    /// A test-local generator (independent of the one under test), to draw random manifests.
    private struct Gen {
        var s: UInt64
        mutating func next() -> UInt64 {
            s = s &* 6364136223846793005 &+ 1442695040888963407
            return s >> 11
        }
        mutating func int(_ range: ClosedRange<Int>) -> Int {
            range.lowerBound + Int(next() % UInt64(range.count))
        }
    }

    private static let resolutions = [(1024, 1024), (896, 1152), (1152, 896), (832, 1216), (1216, 832), (768, 1344)]

    /// 1–60 images over 1–5 buckets, repeats 1–10, ids in an arbitrary (not sorted) order.
    private func randomManifest(_ k: Int) -> [ManifestEntry] {
        var g = Gen(s: UInt64(k) &* 0x9E37_79B9 &+ 17)
        let n = g.int(1...60)
        let nb = g.int(1...5)
        let res = Array(Self.resolutions.prefix(nb))
        return (0..<n).map { i in
            let (w, h) = res[g.int(0...(nb - 1))]
            return ManifestEntry(id: "img\((i * 7919 + k) % 1000)-\(i).png", width: w, height: h, repeats: g.int(1...10))
        }
    }

    /// Checks every invariant of one plan; returns nothing, fails the test with context on a violation.
    private func checkPlan(_ plan: EpochPlan, _ c: Coordinator, _ manifest: [ManifestEntry], _ ctx: String,
                           file: StaticString = #filePath, line: UInt = #line) {
        let w = c.worldSize, bs = c.batchSize
        let byID = Dictionary(uniqueKeysWithValues: manifest.map { ($0.id, $0) })

        // One owner per image, in range; the owner map is the coordinator's and is consistent with shard(rank:).
        XCTAssertEqual(Set(plan.owner.keys), Set(byID.keys), "owner covers the manifest \(ctx)", file: file, line: line)
        XCTAssertTrue(plan.owner.values.allSatisfy { (0..<w).contains($0) }, "owner in range \(ctx)", file: file, line: line)
        let shards = (0..<w).map { Set(c.shard(rank: $0)) }
        XCTAssertEqual(shards.reduce(0) { $0 + $1.count }, manifest.count, "shards partition \(ctx)", file: file, line: line)
        for (id, r) in plan.owner where !shards[r].contains(id) {
            XCTFail("\(id) owned by \(r) but not in its shard \(ctx)", file: file, line: line)
        }

        // Per bucket: ⌊n/W⌋ or ⌈n/W⌉ images per rank; samples balanced within the bucket's largest repeat.
        var bucketImages: [Bucket: [ManifestEntry]] = [:]
        for e in manifest { bucketImages[e.bucket, default: []].append(e) }
        for (bucket, imgs) in bucketImages {
            var count = [Int](repeating: 0, count: w), samples = [Int](repeating: 0, count: w)
            for e in imgs { count[plan.owner[e.id]!] += 1; samples[plan.owner[e.id]!] += e.repeats }
            let n = imgs.count
            XCTAssertTrue(count.allSatisfy { $0 == n / w || $0 == (n + w - 1) / w },
                          "bucket \(bucket) image counts \(count) for n \(n) \(ctx)", file: file, line: line)
            let maxRepeats = imgs.map(\.repeats).max()!
            XCTAssertLessThanOrEqual(samples.max()! - samples.min()!, maxRepeats,
                                     "bucket \(bucket) sample balance \(samples) \(ctx)", file: file, line: line)
        }

        // Steps: one bucket per step, W batches, samples == batch sizes; uses counted per image and per bucket.
        XCTAssertEqual(plan.steps.count, c.stepsPerEpoch, "steps per epoch \(ctx)", file: file, line: line)
        var uses = [String: Int]()
        var stepsPerBucket = [Bucket: Int]()
        var nonOwn = 0
        for step in plan.steps {
            stepsPerBucket[step.bucket, default: 0] += 1
            XCTAssertEqual(step.batches.count, w, ctx, file: file, line: line)
            XCTAssertEqual(step.samples, step.batches.map(\.count), ctx, file: file, line: line)
            for (r, batch) in step.batches.enumerated() {
                XCTAssertLessThanOrEqual(batch.count, bs, ctx, file: file, line: line)
                for id in batch {
                    guard let e = byID[id] else { return XCTFail("unknown id \(id) \(ctx)", file: file, line: line) }
                    XCTAssertEqual(e.bucket, step.bucket, "mixed resolutions in a step \(ctx)", file: file, line: line)
                    uses[id, default: 0] += 1
                    if plan.owner[id] != r { nonOwn += 1 }
                }
                switch c.cacheMode {
                case .shared:
                    XCTAssertEqual(batch.count, bs, "shared: every batch full \(ctx)", file: file, line: line)
                case .nodeLocal:
                    // Full if the rank owns any image of this bucket, empty (weight 0) if it owns none.
                    let ownsAny = bucketImages[step.bucket]!.contains { plan.owner[$0.id] == r }
                    XCTAssertEqual(batch.count, ownsAny ? bs : 0, "node-local batch size \(ctx)", file: file, line: line)
                }
            }
        }

        // Coverage: every image at least `repeats` times; the excess is exactly the counted fill samples.
        var extras = 0
        for e in manifest {
            let u = uses[e.id] ?? 0
            XCTAssertGreaterThanOrEqual(u, e.repeats, "\(e.id) used \(u) < repeats \(e.repeats) \(ctx)", file: file, line: line)
            extras += u - e.repeats
        }
        XCTAssertEqual(extras, plan.fillSamples, "fills counted \(ctx)", file: file, line: line)

        // Fill bounds, per the documented rule.
        for (bucket, imgs) in bucketImages {
            let t = stepsPerBucket[bucket] ?? 0
            let s = imgs.reduce(0) { $0 + $1.repeats }
            let bucketExtras = imgs.reduce(0) { $0 + uses[$1.id]! - $1.repeats }
            switch c.cacheMode {
            case .shared:
                XCTAssertEqual(t, (s + w * bs - 1) / (w * bs), "shared steps for \(bucket) \(ctx)", file: file, line: line)
                XCTAssertEqual(bucketExtras, t * w * bs - s, ctx, file: file, line: line)
                XCTAssertLessThan(bucketExtras, w * bs, "shared fills < W·B \(ctx)", file: file, line: line)
            case .nodeLocal:
                // Per shard: rank r fills exactly T·B − S_r, and T is set by the fullest shard.
                var perRank = [Int](repeating: 0, count: w), perRankUses = [Int](repeating: 0, count: w)
                for e in imgs { perRank[plan.owner[e.id]!] += e.repeats; perRankUses[plan.owner[e.id]!] += uses[e.id]! }
                XCTAssertEqual(t, perRank.map { ($0 + bs - 1) / bs }.max()!, "node-local steps \(ctx)", file: file, line: line)
                for r in 0..<w where perRank[r] > 0 {
                    XCTAssertEqual(perRankUses[r] - perRank[r], t * bs - perRank[r], ctx, file: file, line: line)
                    XCTAssertLessThan(t * bs - perRank[r], bs + imgs.map(\.repeats).max()!,
                                      "node-local fills bounded \(ctx)", file: file, line: line)
                }
            }
        }
        if c.cacheMode == .nodeLocal {
            XCTAssertEqual(nonOwn, 0, "node-local: a rank trained on an image it does not own \(ctx)", file: file, line: line)
            XCTAssertEqual(plan.borrowedSamples, 0, ctx, file: file, line: line)
        } else {
            XCTAssertLessThanOrEqual(nonOwn, plan.borrowedSamples + plan.fillSamples, ctx, file: file, line: line)
        }

        // Accumulation: the optimizer runs every G steps and at the epoch's end.
        XCTAssertEqual(plan.optimizerSteps, c.optimizerStepsPerEpoch, ctx, file: file, line: line)
        XCTAssertEqual(plan.steps.last?.applyOptimizer, true, ctx, file: file, line: line)
    }

    func testInvariantsOverRandomManifests() throws {
        var orderChanged = 0, comparisons = 0
        for k in 0..<200 {
            let manifest = randomManifest(k)
            for w in 1...5 {
                let bs = 1 + (k + w) % 4
                let accumulation = 1 + k % 3
                for mode in CacheMode.allCases {
                    let ctx = "(manifest \(k): \(manifest.count) images, W \(w), B \(bs), \(mode.rawValue))"
                    let c = try Coordinator(manifest: manifest, seed: UInt64(k), worldSize: w, batchSize: bs,
                                            gradientAccumulation: accumulation, cacheMode: mode)
                    let p0 = c.plan(epoch: 0)
                    checkPlan(p0, c, manifest, ctx + " epoch 0")
                    let p1 = c.plan(epoch: 1)
                    checkPlan(p1, c, manifest, ctx + " epoch 1")
                    // Determinism: another coordinator, manifest listed in reverse, gives the same plan.
                    let again = try Coordinator(manifest: manifest.reversed(), seed: UInt64(k), worldSize: w,
                                                batchSize: bs, gradientAccumulation: accumulation, cacheMode: mode)
                    let q0 = again.plan(epoch: 0)
                    XCTAssertEqual(q0.steps, p0.steps, "same inputs, same plan \(ctx)")
                    XCTAssertEqual(q0.owner, p0.owner, ctx)
                    // Ownership does not depend on the epoch (the cache outlives epochs).
                    XCTAssertEqual(p1.owner, p0.owner, ctx)
                    if manifest.count >= 8 {
                        comparisons += 1
                        if p1.steps != p0.steps { orderChanged += 1 }
                    }
                }
            }
        }
        // Different epochs reorder: with ≥ 8 images every epoch-1 plan should differ from epoch 0.
        XCTAssertGreaterThan(comparisons, 1000)
        XCTAssertEqual(orderChanged, comparisons, "epoch 1 repeated epoch 0's order")
    }

    func testDifferentSeedGivesDifferentOrderAndOwners() throws {
        let manifest = (0..<40).map { ManifestEntry(id: "a\($0)", width: 1024, height: 1024, repeats: 3) }
        let a = try Coordinator(manifest: manifest, seed: 1, worldSize: 3, batchSize: 2, cacheMode: .shared)
        let b = try Coordinator(manifest: manifest, seed: 2, worldSize: 3, batchSize: 2, cacheMode: .shared)
        XCTAssertNotEqual(a.owner, b.owner)
        XCTAssertNotEqual(a.plan(epoch: 0).steps, b.plan(epoch: 0).steps)
    }

    /// 40 images × 10 repeats, batch 2, 2 ranks, accumulation 1 → 400 samples / 4 per step = 100 steps per epoch.
    func testSummaryArithmeticHandChecked() throws {
        let manifest = (0..<40).map { ManifestEntry(id: "p\($0).jpg", width: 1024, height: 1024, repeats: 10) }
        for mode in CacheMode.allCases {
            let c = try Coordinator(manifest: manifest, seed: 42, worldSize: 2, batchSize: 2,
                                    gradientAccumulation: 1, cacheMode: mode)
            XCTAssertEqual(c.samplesPerEpoch, 400)
            XCTAssertEqual(c.globalBatch, 4)
            XCTAssertEqual(c.stepsPerEpoch, 100)
            XCTAssertEqual(c.optimizerStepsPerEpoch, 100)
            XCTAssertEqual(c.plan(epoch: 0).steps.count, 100)
            XCTAssertEqual(c.plan(epoch: 0).fillSamples, 0)
            let lines = c.summary(epochs: 10)
            let text = lines.joined(separator: "\n")
            XCTAssertTrue(text.contains("40 images in 1 bucket; images × repeats = 400 samples per epoch"), text)
            XCTAssertTrue(text.contains("per-rank batch 2 × world size 2 = 4 samples per micro-step"), text)
            XCTAssertTrue(text.contains("global batch 4 samples per optimizer step"), text)
            XCTAssertTrue(text.contains("steps per epoch: 100 optimizer steps (100 micro-steps; 400 / 4 = 100.0"), text)
            XCTAssertTrue(text.contains("adds 0 fill samples"), text)
            XCTAssertTrue(text.contains("total for 10 epochs: 1000 optimizer steps (1000 micro-steps, 4000 samples seen)"), text)
            // With N ranks: 400 / (2N) rounded up per bucket. At 16 ranks shared gives ⌈400/32⌉ = 13; node-local
            // shards are 2 or 3 images (20 or 30 samples), so the fullest shard needs ⌈30/2⌉ = 15 steps.
            let at16 = mode == .shared ? 13 : 15
            XCTAssertTrue(text.contains("1 → 200, 2 → 100, 4 → 50, 8 → 25, 16 → \(at16); with 2 ranks: 100 per epoch"), text)
        }
        // Accumulation 4: global batch 16, 100 micro-steps → 25 optimizer steps.
        let c4 = try Coordinator(manifest: manifest, seed: 42, worldSize: 2, batchSize: 2,
                                 gradientAccumulation: 4, cacheMode: .shared)
        XCTAssertEqual(c4.globalBatch, 16)
        XCTAssertEqual(c4.stepsPerEpoch, 100)
        XCTAssertEqual(c4.optimizerStepsPerEpoch, 25)
        XCTAssertEqual(c4.plan(epoch: 3).optimizerSteps, 25)
        XCTAssertTrue(c4.summary(epochs: 2).joined().contains("total for 2 epochs: 50 optimizer steps"))
        // 3 ranks (not in the 1, 2, 4, 8, 16 list): added to it. ⌈400/6⌉ = 67.
        let c3 = try Coordinator(manifest: manifest, seed: 42, worldSize: 3, batchSize: 2, cacheMode: .shared)
        XCTAssertTrue(c3.summary(epochs: 1).joined().contains("1 → 200, 2 → 100, 3 → 67, 4 → 50"))
    }

    /// Bucket rounding by hand: 3 + 5 single-repeat images, batch 2, 2 ranks (4 samples per step):
    /// bucket A ⌈3/4⌉ = 1 step (1 fill), bucket B ⌈5/4⌉ = 2 steps (3 fills) → 3 steps, 4 fills.
    func testBucketRoundingHandChecked() throws {
        let manifest = (0..<3).map { ManifestEntry(id: "a\($0)", width: 1024, height: 1024, repeats: 1) }
            + (0..<5).map { ManifestEntry(id: "b\($0)", width: 832, height: 1216, repeats: 1) }
        let c = try Coordinator(manifest: manifest, seed: 7, worldSize: 2, batchSize: 2, cacheMode: .shared)
        let p = c.plan(epoch: 0)
        XCTAssertEqual(p.steps.count, 3)
        XCTAssertEqual(p.fillSamples, 4)
        XCTAssertEqual(p.steps.filter { $0.bucket == Bucket(width: 832, height: 1216) }.count, 2)
        // Fills go to the images with the fewest extra uses: bucket B's 3 fills are 3 different images.
        let bUses = p.steps.flatMap { $0.batches.joined() }.filter { $0.hasPrefix("b") }
        XCTAssertEqual(bUses.count, 8)
        XCTAssertEqual(Dictionary(grouping: bUses, by: { $0 }).values.map(\.count).max(), 2)
        let text = c.summary(epochs: 1).joined(separator: "\n")
        XCTAssertTrue(text.contains("bucket 832x1216: 5 images, 5 samples → 2 micro-steps, 3 fill"), text)
        XCTAssertTrue(text.contains("bucket 1024x1024: 3 images, 3 samples → 1 micro-step, 1 fill"), text)
    }

    /// Node-local with a bucket smaller than the world: ranks owning none of it get empty batches (weight 0).
    func testNodeLocalBucketSmallerThanWorld() throws {
        let manifest = [ManifestEntry(id: "solo", width: 1216, height: 832, repeats: 4)]
            + (0..<9).map { ManifestEntry(id: "m\($0)", width: 1024, height: 1024, repeats: 2) }
        let c = try Coordinator(manifest: manifest, seed: 3, worldSize: 3, batchSize: 2, cacheMode: .nodeLocal)
        let p = c.plan(epoch: 0)
        let soloOwner = p.owner["solo"]!
        let soloSteps = p.steps.filter { $0.bucket == Bucket(width: 1216, height: 832) }
        XCTAssertEqual(soloSteps.count, 2)  // 4 samples / batch 2
        for s in soloSteps {
            XCTAssertEqual(s.samples, (0..<3).map { $0 == soloOwner ? 2 : 0 })
        }
        XCTAssertTrue(c.summary(epochs: 1).joined().contains("4 empty rank-batches"))
        // Shared mode fills the same bucket by borrowing/refilling instead: all batches full.
        let s = try Coordinator(manifest: manifest, seed: 3, worldSize: 3, batchSize: 2, cacheMode: .shared)
        XCTAssertTrue(s.plan(epoch: 0).steps.allSatisfy { $0.samples == [2, 2, 2] })
    }

    /// Resume = skip to step k of the recomputed plan: a fresh coordinator (a restarted job) gives the same steps.
    func testResumeReproducesPlan() throws {
        let manifest = randomManifest(5)
        let c = try Coordinator(manifest: manifest, seed: 99, worldSize: 3, batchSize: 2,
                                gradientAccumulation: 2, cacheMode: .shared)
        let perEpoch = c.optimizerStepsPerEpoch
        XCTAssertGreaterThan(perEpoch, 1)
        let completed = 2 * perEpoch + 1
        let point = c.resumePoint(completedOptimizerSteps: completed)
        XCTAssertEqual(point.epoch, 2)
        XCTAssertEqual(point.step, 2)
        // Counting optimizer steps through the epoch's plan lands on the same micro-step.
        let plan = c.plan(epoch: 2)
        let firstIndexAfterOne = plan.steps.firstIndex { $0.applyOptimizer }! + 1
        XCTAssertEqual(firstIndexAfterOne, point.step)
        let restarted = try Coordinator(manifest: manifest.shuffled(), seed: 99, worldSize: 3, batchSize: 2,
                                        gradientAccumulation: 2, cacheMode: .shared)
        XCTAssertEqual(Array(restarted.plan(epoch: 2).steps[point.step...]), Array(plan.steps[point.step...]))
        XCTAssertEqual(c.resumePoint(completedOptimizerSteps: 0).epoch, 0)
        XCTAssertEqual(c.resumePoint(completedOptimizerSteps: perEpoch).epoch, 1)
        XCTAssertEqual(c.resumePoint(completedOptimizerSteps: perEpoch).step, 0)
    }

    func testErrorsNameTheProblem() {
        let ok = [ManifestEntry(id: "x", width: 1024, height: 1024, repeats: 1)]
        func error(_ manifest: [ManifestEntry], w: Int = 2, b: Int = 1, g: Int = 1) -> CoordinatorError? {
            do {
                _ = try Coordinator(manifest: manifest, seed: 0, worldSize: w, batchSize: b,
                                    gradientAccumulation: g, cacheMode: .shared)
                return nil
            } catch let e as CoordinatorError { return e } catch { return nil }
        }
        XCTAssertEqual(error([]), .emptyManifest)
        XCTAssertEqual(error(ok, w: 0), .invalidWorldSize(0))
        XCTAssertEqual(error(ok, b: 0), .invalidBatchSize(0))
        XCTAssertEqual(error(ok, g: 0), .invalidGradientAccumulation(0))
        XCTAssertEqual(error([ManifestEntry(id: "r", width: 8, height: 8, repeats: 0)]), .invalidRepeats(id: "r", repeats: 0))
        XCTAssertEqual(error([ManifestEntry(id: "z", width: 0, height: 8, repeats: 1)]),
                       .invalidBucket(id: "z", width: 0, height: 8))
        XCTAssertEqual(error([ManifestEntry(id: "z", width: 8, height: -1, repeats: 1)]),
                       .invalidBucket(id: "z", width: 8, height: -1))
        XCTAssertEqual(error(ok + ok), .duplicateID("x"))
        XCTAssertEqual(error([ManifestEntry(id: "", width: 8, height: 8, repeats: 1)]), .emptyID)
        XCTAssertNil(error(ok))
        XCTAssertTrue(CoordinatorError.emptyManifest.description.contains("no images"))
        XCTAssertTrue(CoordinatorError.invalidRepeats(id: "r.png", repeats: 0).description.contains("'r.png' has repeats 0"))
        XCTAssertTrue(CoordinatorError.invalidBucket(id: "z", width: 0, height: 8).description.contains("0x8"))
        XCTAssertTrue(CoordinatorError.invalidWorldSize(0).description.contains("at least 1"))
    }
}
