import Foundation
import XCTest
@testable import Dataset

/// Golden comparison with kohya's own bucketing code: Tests/Fixtures/dataset/make_buckets.py copies
/// make_bucket_resolutions / BucketManager / trim_and_resize_if_required from sd-scripts and writes buckets.json.
final class BucketTests: XCTestCase {
    private func loadTable() throws -> [String: Any] {
        let url = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Fixtures/dataset/buckets.json")
        let data = try Data(contentsOf: url)
        return try XCTUnwrap(JSONSerialization.jsonObject(with: data) as? [String: Any])
    }

    private func int(_ x: Any) -> Int { (x as! NSNumber).intValue }
    /// Floats travel as Python `float.hex()` strings: exact, unlike decimal JSON parsing.
    private func dbl(_ x: Any) -> Double { Double(x as! String)! }

    func testMatchesKohyaGoldenTable() throws {
        let table = try loadTable()
        let configs = try XCTUnwrap(table["configs"] as? [[String: Any]])
        XCTAssertEqual(configs.count, 9)
        var compared = 0, nils = 0
        for entry in configs {
            let c = entry["config"] as! [String: Any]
            let res = (c["resolution"] as! [Any]).map(int)
            let base = BucketConfig(width: res[0], height: res[1], minSize: int(c["min"]!), maxSize: int(c["max"]!),
                                    step: int(c["step"]!))
            let label = "\(res) min \(base.minSize) max \(base.maxSize) step \(base.step)"
            let up = try Bucketing(config: base)
            var nuConfig = base; nuConfig.noUpscale = true
            let noUp = try Bucketing(config: nuConfig)
            XCTAssertEqual(up.minSize, int(entry["adjusted_min"]!), label)
            XCTAssertEqual(up.maxSize, int(entry["adjusted_max"]!), label)
            let expectedResos = (entry["resolutions"] as! [[Any]]).map { BucketSize(width: int($0[0]), height: int($0[1])) }
            XCTAssertEqual(up.resolutions, expectedResos, label)
            XCTAssertEqual(Buckets.resolutions(maxArea: res[0] * res[1], minSize: up.minSize, maxSize: up.maxSize,
                                               step: base.step), expectedResos, label)
            XCTAssertTrue(noUp.resolutions.isEmpty)

            for row in entry["cases"] as! [[Any]] {
                let w = int(row[0]), h = int(row[1]), nu = int(row[2]) == 1
                let got = (nu ? noUp : up).choose(width: w, height: h)
                let where_ = "\(label) image \(w)x\(h) no_upscale \(nu)"
                guard let r = row[3] as? [Any] else {
                    XCTAssertNil(got, where_); nils += 1; continue
                }
                guard let p = got else { XCTFail("nil for \(where_)"); continue }
                XCTAssertEqual(p.bucket, BucketSize(width: int(r[0]), height: int(r[1])), where_)
                XCTAssertEqual([p.resizedWidth, p.resizedHeight], [int(r[2]), int(r[3])], where_)
                XCTAssertEqual([p.cropLeft, p.cropTop], [int(r[4]), int(r[5])], where_)
                XCTAssertEqual(p.cropBox, CropBox(left: dbl(r[6]), top: dbl(r[7]), right: dbl(r[8]), bottom: dbl(r[9])),
                               where_)
                XCTAssertEqual(p.arError, dbl(r[10]), where_)
                XCTAssertEqual(p.sdxlConditioning(flipped: false),
                               SDXLSizeConditioning(originalHeight: int(r[11]), originalWidth: int(r[12]),
                                                    cropTop: int(r[13]), cropLeft: int(r[14]),
                                                    targetHeight: int(r[15]), targetWidth: int(r[16])), where_)
                let f = p.sdxlConditioning(flipped: true)
                XCTAssertEqual([f.cropTop, f.cropLeft], [int(r[17]), int(r[18])], where_)
                XCTAssertEqual(p.targetSize, p.bucket)
                compared += 1
            }
        }
        // The table must exercise both outcomes, or the comparison proves little.
        XCTAssertGreaterThan(compared, 2500)
        XCTAssertGreaterThan(nils, 10)
    }

    func testKohyaRoundingOfMinMaxIsReported() throws {
        let b = try Bucketing(config: BucketConfig(resolution: 1000, minSize: 300, maxSize: 1000))
        XCTAssertEqual(b.minSize, 256)
        XCTAssertEqual(b.maxSize, 1024)
        XCTAssertEqual(b.adjustments.count, 2)
        XCTAssertTrue(b.adjustments[0].contains("300"), b.adjustments[0])
        XCTAssertTrue(try Bucketing(config: BucketConfig(resolution: 1024)).adjustments.isEmpty)
    }

    func testConfigurationErrorsNameTheValue() {
        func message(_ c: BucketConfig) -> String? {
            do { _ = try Bucketing(config: c); return nil } catch { return (error as? DatasetError)?.description }
        }
        XCTAssertTrue(message(BucketConfig(resolution: 0))?.contains("0") == true)
        XCTAssertTrue(message(BucketConfig(resolution: 1024, step: -64))?.contains("-64") == true)
        XCTAssertTrue(message(BucketConfig(resolution: 1024, minSize: -1))?.contains("min_bucket_reso is -1") == true)
        // SDXL: kohya's verify_bucket_reso_steps(32)
        XCTAssertTrue(message(BucketConfig(resolution: 1024, step: 48))?.contains("48") == true)
        XCTAssertNil(message(BucketConfig(resolution: 1024, step: 48, stepMultiple: 0)))
        // kohya's adjust_min_max_bucket_reso_by_steps asserts
        XCTAssertTrue(message(BucketConfig(resolution: 512, minSize: 576))?.contains("576") == true)
        XCTAssertTrue(message(BucketConfig(width: 1024, height: 1536, maxSize: 1024))?.contains("1536") == true)
        XCTAssertNil(message(BucketConfig(resolution: 1024)))
    }

    func testImagesKohyaCannotBucket() throws {
        let nu = try Bucketing(config: BucketConfig(resolution: 1024, noUpscale: true))
        XCTAssertNil(nu.choose(width: 40, height: 900))   // zero-width bucket
        XCTAssertNil(nu.choose(width: 900, height: 63))   // zero-height bucket
        XCTAssertEqual(nu.choose(width: 100, height: 900)?.bucket, BucketSize(width: 64, height: 896))
        let up = try Bucketing(config: BucketConfig(resolution: 1024))
        XCTAssertNil(up.choose(width: 0, height: 10))
        XCTAssertEqual(up.choose(width: 40, height: 40)?.bucket, BucketSize(width: 1024, height: 1024))
    }

    func testEveryLevelOfAResolutionListBucketsIndependently() throws {
        let configs = [512, 768, 1024].map { BucketConfig(resolution: $0, maxSize: 2048) }
        let multi = try MultiResolutionBucketing(configs: configs)
        let singles = try configs.map { try Bucketing(config: $0) }
        for (w, h) in [(1920, 1080), (333, 2999), (1024, 1024), (50, 50)] {
            let all = multi.choose(width: w, height: h)
            XCTAssertEqual(all.count, 3)
            for (i, s) in singles.enumerated() { XCTAssertEqual(all[i], s.choose(width: w, height: h)) }
            XCTAssertNotEqual(all[0]?.bucket, all[2]?.bucket)
        }
        XCTAssertThrowsError(try MultiResolutionBucketing(configs: []))
    }

    func testRandomCropIsSeededAndInRange() throws {
        struct SplitMix: RandomNumberGenerator {
            var state: UInt64
            mutating func next() -> UInt64 {
                state &+= 0x9E37_79B9_7F4A_7C15
                var z = state
                z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
                z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
                return z ^ (z >> 31)
            }
        }
        let p = try XCTUnwrap(try Bucketing(config: BucketConfig(resolution: 1024)).choose(width: 3000, height: 1000))
        let excessW = p.resizedWidth - p.bucket.width, excessH = p.resizedHeight - p.bucket.height
        XCTAssertGreaterThan(max(excessW, excessH), 10)
        var a = SplitMix(state: 7), b = SplitMix(state: 7)
        var seen = Set<Int>()
        for _ in 0..<200 {
            let x = p.randomCrop(using: &a), y = p.randomCrop(using: &b)
            XCTAssertEqual(x.left, y.left)
            XCTAssertEqual(x.top, y.top)
            XCTAssertTrue((0...excessW).contains(x.left))
            XCTAssertTrue((0...excessH).contains(x.top))
            seen.insert(excessW > excessH ? x.left : x.top)
        }
        XCTAssertGreaterThan(seen.count, 5)
        // kohya keeps the SDXL crop conditioning of the centred placement for random crops.
        XCTAssertEqual(p.sdxlConditioning().cropLeft, Int(p.cropBox.left))
    }
}
