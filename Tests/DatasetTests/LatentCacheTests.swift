import Foundation
import SafeTensors
import Tensor
import XCTest
@testable import Dataset

final class LatentCacheTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("latent-cache-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws { try? FileManager.default.removeItem(at: dir) }

    func key(_ hash: String = "img-a", bucket: BucketSize = BucketSize(width: 64, height: 32), crop: (Int, Int) = (0, 0),
             flip: Bool = false, vae: String = "vae-1") -> LatentKey {
        LatentKey(imageHash: hash, imagePath: "/data/\(hash).png", bucket: bucket, cropLeft: crop.0, cropTop: crop.1,
                  originalWidth: 100, originalHeight: 50, flip: flip, vaeIdentity: vae)
    }

    /// A deterministic encoder: values depend on the key's file name, so a wrong entry is noticed. Counts calls.
    final class Encoder {
        var calls: [LatentKey] = []
        func callAsFunction(_ k: LatentKey) throws -> (mean: Tensor, logvar: Tensor) {
            calls.append(k)
            return Self.latent(k)
        }
        static func latent(_ k: LatentKey) -> (mean: Tensor, logvar: Tensor) {
            let seed = Float(k.fileName.utf8.reduce(0) { ($0 &* 31 &+ Int($1)) % 1000 })
            let n = k.latentShape.reduce(1, *)
            return (Tensor(shape: k.latentShape, (0..<n).map { seed + Float($0) * 0.5 }),
                    Tensor(shape: k.latentShape, (0..<n).map { -Float($0) * 0.01 }))
        }
    }

    func testMissThenHitWithStoredValuesAndConditioning() throws {
        let cache = try LatentCache(storage: .disk(dir))
        let enc = Encoder()
        let keys = [key(), key(flip: true), key("img-b")]
        let r1 = try cache.ensure(keys, encode: enc.callAsFunction)
        XCTAssertEqual(r1.misses, 3); XCTAssertEqual(r1.hits, 0); XCTAssertEqual(enc.calls.count, 3)
        let r2 = try cache.ensure(keys, encode: enc.callAsFunction)
        XCTAssertEqual(r2.hits, 3); XCTAssertEqual(r2.encoded, 0); XCTAssertEqual(enc.calls.count, 3)
        // A fresh cache object over the same folder (a new run) also hits.
        let r3 = try LatentCache(storage: .disk(dir)).ensure(keys, encode: enc.callAsFunction)
        XCTAssertEqual(r3.hits, 3); XCTAssertEqual(enc.calls.count, 3)

        let got = try XCTUnwrap(cache.lookup(key(flip: true)))
        let want = Encoder.latent(key(flip: true))
        XCTAssertEqual(got.mean.shape, [4, 4, 8])
        XCTAssertEqual(got.mean.dtype, .f32)
        XCTAssertEqual(got.mean.scalars, want.mean.scalars)
        XCTAssertEqual(got.logvar.scalars, want.logvar.scalars)
        XCTAssertTrue(got.flip)
        XCTAssertTrue(got.originalSizeHW == (50, 100))
        XCTAssertTrue(got.targetSizeHW == (32, 64))
        XCTAssertTrue(got.cropTopLeft == (0, 0))
        XCTAssertEqual(Set(try FileManager.default.contentsOfDirectory(atPath: dir.path)), Set(keys.map(\.fileName)))
    }

    func testStaleInputsMakeNewEntries() throws {
        let cache = try LatentCache(storage: .disk(dir))
        let enc = Encoder()
        try cache.ensure([key()], encode: enc.callAsFunction)
        // Image edited (new content hash), VAE changed, other bucket, other crop: each is a different entry.
        let variants = [key("img-a-edited"), key(vae: "vae-2"), key(bucket: BucketSize(width: 32, height: 64)),
                        key(crop: (8, 0))]
        XCTAssertEqual(Set(variants.map(\.fileName) + [key().fileName]).count, 5)
        for v in variants {
            XCTAssertNil(cache.lookup(v))
            let r = try cache.ensure([v], encode: enc.callAsFunction)
            XCTAssertEqual(r.misses, 1, "\(v)")
        }
        XCTAssertEqual(enc.calls, [key()] + variants)
        XCTAssertEqual(cache.lookup(key(bucket: BucketSize(width: 32, height: 64)))?.mean.shape, [4, 8, 4])
        // With only the edited image and new VAE wanted, the rest are reported as orphans.
        let orphans = cache.orphans(keeping: [variants[0]])
        XCTAssertEqual(orphans.count, 4)
        XCTAssertFalse(orphans.contains { $0.hasSuffix(variants[0].fileName) })
    }

    func testImageBytesChangeTheHash() throws {
        let img = dir.appendingPathComponent("a.png")
        try Data([1, 2, 3, 4]).write(to: img)
        let h1 = try LatentCache.hashFile(img.path)
        XCTAssertEqual(h1, try LatentCache.hashFile(img.path))
        try Data([1, 2, 3, 5]).write(to: img)
        let h2 = try LatentCache.hashFile(img.path)
        XCTAssertNotEqual(h1, h2)
        // FNV-1a 64 reference vectors (Fowler/Noll/Vo test suite): "" → cbf29ce484222325, "a" → af63dc4c8601ec8c.
        try Data().write(to: img)
        XCTAssertEqual(try LatentCache.hashFile(img.path), "fnv1a64:cbf29ce484222325:0")
        try Data("a".utf8).write(to: img)
        XCTAssertEqual(try LatentCache.hashFile(img.path), "fnv1a64:af63dc4c8601ec8c:1")
        XCTAssertThrowsError(try LatentCache.hashFile(dir.appendingPathComponent("missing.png").path))
    }

    func testVAEIdentityChangesWithTheWeights() throws {
        let vae = dir.appendingPathComponent("vae.safetensors").path
        try writeSafeTensors(["w": Tensor(shape: [2, 2], [1, 2, 3, 4])], to: vae)
        let a = try LatentCache.vaeIdentity(weightsPath: vae)
        XCTAssertEqual(a, try LatentCache.vaeIdentity(weightsPath: vae))
        try writeSafeTensors(["w": Tensor(shape: [2, 2], [1, 2, 3, 4.5])], to: vae)
        let b = try LatentCache.vaeIdentity(weightsPath: vae)
        XCTAssertNotEqual(a, b)
        try writeSafeTensors(["w": Tensor(shape: [4], [1, 2, 3, 4.5])], to: vae)
        XCTAssertNotEqual(b, try LatentCache.vaeIdentity(weightsPath: vae))
    }

    func corrupt(_ damage: (String) throws -> Void, expectReason: String, file: StaticString = #filePath,
                 line: UInt = #line) throws {
        let cache = try LatentCache(storage: .disk(dir))
        let enc = Encoder()
        let k = key()
        try cache.ensure([k], encode: enc.callAsFunction)
        let path = try XCTUnwrap(cache.path(for: k))
        try damage(path)
        XCTAssertNil(cache.lookup(k), file: file, line: line)
        let r = try cache.ensure([k], encode: enc.callAsFunction)
        XCTAssertEqual(r.rebuilt.count, 1, file: file, line: line)
        XCTAssertEqual(r.rebuilt.first?.path, path, file: file, line: line)
        XCTAssertTrue(r.rebuilt.first?.reason.contains(expectReason) ?? false,
                      "reason \(r.rebuilt.first?.reason ?? "-") lacks \(expectReason)", file: file, line: line)
        XCTAssertEqual(enc.calls.count, 2, file: file, line: line)
        XCTAssertEqual(cache.lookup(k)?.mean.scalars, Encoder.latent(k).mean.scalars, file: file, line: line)
    }

    func testTruncatedFileIsRebuilt() throws {
        try corrupt({ path in
            let d = try Data(contentsOf: URL(fileURLWithPath: path))
            try d.prefix(d.count - 10).write(to: URL(fileURLWithPath: path))
        }, expectReason: "unreadable safetensors")
    }

    func testGarbageFileIsRebuilt() throws {
        try corrupt({ try Data(repeating: 0xAB, count: 300).write(to: URL(fileURLWithPath: $0)) },
                    expectReason: "unreadable safetensors")
    }

    func testEmptyFileIsRebuilt() throws {
        try corrupt({ try Data().write(to: URL(fileURLWithPath: $0)) }, expectReason: "unreadable safetensors")
    }

    func testWrongShapeIsRebuilt() throws {
        let k = key()
        try corrupt({ path in
            try writeSafeTensors(["mean": Tensor(zeros: [4, 2, 2]), "logvar": Tensor(zeros: [4, 2, 2])],
                                 metadata: k.fields, to: path)
        }, expectReason: "has shape [4, 2, 2], expected [4, 4, 8]")
    }

    func testFp16AndNaNAreRebuilt() throws {
        let k = key()
        try corrupt({ path in
            try writeSafeTensors(["mean": Tensor(zeros: k.latentShape, dtype: .f16), "logvar": Tensor(zeros: k.latentShape)],
                                 metadata: k.fields, to: path)
        }, expectReason: "is F16, expected F32")
        try FileManager.default.removeItem(at: dir)
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        try corrupt({ path in
            let n = k.latentShape.reduce(1, *)
            try writeSafeTensors(["mean": Tensor(shape: k.latentShape, [Float](repeating: .nan, count: n)),
                                  "logvar": Tensor(zeros: k.latentShape)], metadata: k.fields, to: path)
        }, expectReason: "non-finite")
    }

    func testForeignMetadataIsStale() throws {
        // A file under the key's name whose metadata belongs to another image (collision, copied-in file,
        // or an older format): detected by comparing every key field.
        let k = key()
        try corrupt({ path in
            var f = k.fields
            f["image_hash"] = "other"
            let e = Encoder.latent(k)
            try writeSafeTensors(["mean": e.mean, "logvar": e.logvar], metadata: f, to: path)
        }, expectReason: "metadata 'image_hash' is 'other', expected 'img-a'")
        if case .stale = try LatentCache(storage: .disk(dir)).check(k) { XCTFail("rebuilt entry still stale") }
    }

    func testMemoryMode() throws {
        let cache = try LatentCache(storage: .memory)
        let enc = Encoder()
        let keys = [key(), key(flip: true)]
        XCTAssertEqual(try cache.ensure(keys, encode: enc.callAsFunction).misses, 2)
        XCTAssertEqual(try cache.ensure(keys + keys, encode: enc.callAsFunction).hits, 2)
        XCTAssertEqual(enc.calls.count, 2)
        XCTAssertEqual(cache.lookup(key(flip: true))?.mean.scalars, Encoder.latent(key(flip: true)).mean.scalars)
        XCTAssertNil(cache.lookup(key(vae: "vae-2")))
        XCTAssertNil(cache.path(for: key()))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path), [])
    }

    func testAssignmentEncodesOnlyOwnKeys() throws {
        let keys = (0..<6).map { key("img-\($0)") }
        let cache = try LatentCache(storage: .disk(dir))
        // Two ranks, round-robin ownership by index, as a coordinator assignment would give.
        let index = Dictionary(uniqueKeysWithValues: keys.enumerated().map { ($1, $0) })
        let encs = [Encoder(), Encoder()]
        for rank in 0..<2 {
            let r = try cache.ensure(keys, isAssigned: { index[$0]! % 2 == rank }, encode: encs[rank].callAsFunction)
            XCTAssertEqual(r.misses, 3); XCTAssertEqual(r.skippedNotAssigned, 3)
            XCTAssertEqual(encs[rank].calls, keys.enumerated().filter { $0.offset % 2 == rank }.map(\.element))
        }
        // After both ranks, every key is present for everyone.
        let after = Encoder()
        XCTAssertEqual(try cache.ensure(keys, encode: after.callAsFunction).hits, 6)
        XCTAssertTrue(after.calls.isEmpty)
    }

    func testThrowingEncodeLeavesNoPartialFile() throws {
        struct Boom: Error {}
        let cache = try LatentCache(storage: .disk(dir))
        let keys = [key("ok"), key("bad"), key("never")]
        var calls = 0
        XCTAssertThrowsError(try cache.ensure(keys) { k in
            calls += 1
            if k.imageHash == "bad" { throw Boom() }
            return Encoder.latent(k)
        })
        XCTAssertEqual(calls, 2)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path), [key("ok").fileName])
        XCTAssertNotNil(cache.lookup(key("ok")))
    }

    func testEncoderWithWrongShapeIsAnError() throws {
        let cache = try LatentCache(storage: .disk(dir))
        XCTAssertThrowsError(try cache.ensure([key()]) { _ in (Tensor(zeros: [4, 1, 1]), Tensor(zeros: [4, 1, 1])) }) {
            XCTAssertTrue("\($0)".contains("expected [4, 4, 8]"), "\($0)")
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path), [])
    }

    func testImagePathIsNotIdentity() {
        let a = key(), b = LatentKey(imageHash: "img-a", imagePath: "/moved/a.png", bucket: a.bucket, cropLeft: 0,
                                     cropTop: 0, originalWidth: 100, originalHeight: 50, flip: false, vaeIdentity: "vae-1")
        XCTAssertEqual(a, b)
        XCTAssertEqual(a.fileName, b.fileName)
        XCTAssertNotEqual(a.fileName, key(flip: true).fileName)
    }
}
