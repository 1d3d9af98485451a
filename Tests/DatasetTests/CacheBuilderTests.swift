import Dataset
import Foundation
import SafeTensors
import Tensor
import XCTest

/// CacheBuilder over real PNGs and a real on-disk LatentCache. The encoder is a deterministic 8×8 average pool
/// (4 channels: RGB means and their negated mean), so stored latents can be checked against the image.
final class CacheBuilderTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("cache-builder-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir.appendingPathComponent("img"), withIntermediateDirectories: true)
    }
    override func tearDownWithError() throws { try? FileManager.default.removeItem(at: dir) }

    /// image [1, 3, H, W] → ([1, 4, H/8, W/8], same); counts calls.
    final class PoolEncoder {
        var calls = 0
        func callAsFunction(_ x: Tensor) -> (mean: Tensor, logvar: Tensor) {
            calls += 1
            let h = x.shape[2], w = x.shape[3], v = x.scalars
            var out = [Float](repeating: 0, count: 4 * (h / 8) * (w / 8))
            for c in 0..<3 { for y in 0..<h { for xx in 0..<w {
                out[(c * (h / 8) + y / 8) * (w / 8) + xx / 8] += v[(c * h + y) * w + xx] / 64
            } } }
            let plane = (h / 8) * (w / 8)
            for i in 0..<plane { out[3 * plane + i] = -(out[i] + out[plane + i] + out[2 * plane + i]) / 3 }
            return (Tensor(shape: [1, 4, h / 8, w / 8], out), Tensor(shape: [1, 4, h / 8, w / 8], out.map { $0 - 1 }))
        }
    }

    /// Left half red, right half blue, so a flip is visible in the latent.
    func writeImage(_ name: String, width: Int, height: Int) throws {
        var rgb = [UInt8](repeating: 0, count: width * height * 3)
        for y in 0..<height { for x in 0..<width {
            let i = (y * width + x) * 3
            if x < width / 2 { rgb[i] = 255 } else { rgb[i + 2] = 255 }
        } }
        try ImageIO.writePNG(rgb, width: width, height: height, to: dir.appendingPathComponent("img/\(name)").path)
    }

    func report(flip: Bool) throws -> DatasetReport {
        var cfg = DatasetReport.folderConfig(dir.appendingPathComponent("img"), resolution: 256)
        cfg.datasets = cfg.datasets.map { $0.map { s in var s = s; s.flipAug = flip; return s } }
        return try DatasetReport.make(cfg)
    }

    func testBuildThenAllHitsWithFlip() throws {
        try writeImage("a.png", width: 256, height: 256)
        try writeImage("b.png", width: 320, height: 192)
        try writeImage("c.png", width: 200, height: 300)
        let rep = try report(flip: true)
        XCTAssertEqual(rep.entries.count, 3)
        let jobs = try CacheBuilder.jobs(rep, vaeIdentity: "test-vae")
        XCTAssertEqual(jobs.count, 6, "flip_aug: each image plain and mirrored")
        XCTAssertEqual(Set(jobs.map(\.key)).count, 6)

        let cacheDir = dir.appendingPathComponent("cache")
        let cache = try LatentCache(storage: .disk(cacheDir))
        let enc = PoolEncoder()
        var progress: [(Int, Int)] = []
        let first = try CacheBuilder.build(jobs, cache: cache, encode: enc.callAsFunction, progress: { progress.append(($0, $1)) })
        XCTAssertEqual(first.misses, 6)
        XCTAssertEqual(first.hits, 0)
        XCTAssertEqual(enc.calls, 6)
        XCTAssertEqual(progress.map(\.0), [1, 2, 3, 4, 5, 6])
        XCTAssertTrue(progress.allSatisfy { $0.1 == 6 })
        for job in jobs {
            XCTAssertTrue(FileManager.default.fileExists(atPath: cache.path(for: job.key)!), "\(job.key)")
            let got = try XCTUnwrap(cache.lookup(job.key))
            XCTAssertEqual(got.mean.shape, [4, job.key.bucket.height / 8, job.key.bucket.width / 8])
            // The encoder saw the bucket-sized image: red (channel 0 ≈ +1) on the left unless mirrored.
            let w = job.key.bucket.width / 8, m = got.mean.scalars
            XCTAssertEqual(m[0], job.flip ? -1 : 1, accuracy: 0.05, "\(job.key)")
            XCTAssertEqual(m[w - 1], job.flip ? 1 : -1, accuracy: 0.05, "\(job.key)")
            XCTAssertEqual(got.logvar.scalars[0], m[0] - 1, accuracy: 1e-6)
        }

        // Second run over a fresh cache object: every entry is a hit, nothing is encoded.
        let again = try CacheBuilder.build(jobs, cache: try LatentCache(storage: .disk(cacheDir)), encode: enc.callAsFunction)
        XCTAssertEqual(again.hits, 6)
        XCTAssertEqual(again.encoded, 0)
        XCTAssertEqual(enc.calls, 6)

        // A corrupted file is rebuilt with its reason.
        let victim = cache.path(for: jobs[0].key)!
        try Data("garbage".utf8).write(to: URL(fileURLWithPath: victim))
        let third = try CacheBuilder.build(jobs, cache: cache, encode: enc.callAsFunction)
        XCTAssertEqual(third.hits, 5)
        XCTAssertEqual(third.rebuilt.count, 1)
        XCTAssertEqual(third.rebuilt.first?.path, victim)
        XCTAssertEqual(enc.calls, 7)

        // Issue 13, item 7: a VAE giving NaN is refused at encode, naming the image and the VAE; nothing is cached.
        let nanDir = dir.appendingPathComponent("nancache")
        XCTAssertThrowsError(try CacheBuilder.build(jobs, cache: try LatentCache(storage: .disk(nanDir)), encode: { x in
            let (m, l) = enc(x)
            return (Tensor(shape: m.shape, m.scalars.map { _ in Float.nan }), l)
        })) { error in
            XCTAssertTrue("\(error)".contains("non-finite latents") && "\(error)".contains("test-vae") && "\(error)".contains(".png"), "\(error)")
        }
        XCTAssertTrue(((try? FileManager.default.contentsOfDirectory(atPath: nanDir.path)) ?? []).allSatisfy { !$0.hasSuffix(".safetensors") })
        // A well-formed entry holding NaN is rebuilt, not trained on (CacheEntry's validation).
        let nanEntry = cache.path(for: jobs[1].key)!
        let good = try XCTUnwrap(cache.lookup(jobs[1].key))
        try writeSafeTensors(["mean": Tensor(shape: good.mean.shape, good.mean.scalars.map { _ in Float.nan }), "logvar": good.logvar],
                             metadata: try SafeTensorsFile(path: nanEntry).metadata, to: nanEntry)
        let fourth = try CacheBuilder.build(jobs, cache: try LatentCache(storage: .disk(cacheDir)), encode: enc.callAsFunction)
        XCTAssertEqual(fourth.rebuilt.map(\.path), [nanEntry])
        XCTAssertTrue(try XCTUnwrap(cache.lookup(jobs[1].key)).mean.scalars.allSatisfy(\.isFinite))
    }

    func testSharesAreDisjointAndCoverEverything() throws {
        for (i, size) in [(256, 256), (320, 192), (192, 320), (256, 256)].enumerated() {
            try writeImage("i\(i).png", width: size.0 + i * 8, height: size.1)
        }
        let jobs = try CacheBuilder.jobs(try report(flip: false), vaeIdentity: "v")
        XCTAssertEqual(jobs.count, 4)
        let cache = try LatentCache(storage: .disk(dir.appendingPathComponent("cache")))
        // Two "ranks" by image path parity; each encodes only its share, together they cover every key.
        let paths = jobs.map(\.entry.image.path).sorted()
        let ownerOf = Dictionary(uniqueKeysWithValues: paths.enumerated().map { ($1, $0 % 2) })
        var encodedBy: [[LatentKey]] = [[], []]
        for rank in 0..<2 {
            let enc = PoolEncoder()
            let r = try CacheBuilder.build(jobs, cache: cache, isAssigned: { ownerOf[$0.entry.image.path] == rank },
                                           encode: enc.callAsFunction)
            XCTAssertEqual(r.misses, 2)
            XCTAssertEqual(r.skippedNotAssigned, 2)
            encodedBy[rank] = jobs.filter { ownerOf[$0.entry.image.path] == rank }.map(\.key)
            XCTAssertEqual(enc.calls, 2)
        }
        XCTAssertTrue(Set(encodedBy[0]).isDisjoint(with: encodedBy[1]))
        for job in jobs { XCTAssertNotNil(cache.lookup(job.key), "\(job.key)") }
    }
}
