import Foundation
import XCTest
@testable import Dataset

final class DatasetReportTests: XCTestCase {
    var root: URL!
    override func setUpWithError() throws {
        root = FileManager.default.temporaryDirectory.appendingPathComponent("report-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
    }
    override func tearDownWithError() throws { try? FileManager.default.removeItem(at: root) }

    func png(_ rel: String, _ w: Int, _ h: Int, caption: String?) throws {
        let u = root.appendingPathComponent(rel)
        try FileManager.default.createDirectory(at: u.deletingLastPathComponent(), withIntermediateDirectories: true)
        let rgb = (0..<(w * h * 3)).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        try ImageIO.writePNG(rgb, width: w, height: h, to: u.path)
        if let c = caption {
            try c.write(to: u.deletingPathExtension().appendingPathExtension("txt"), atomically: true, encoding: .utf8)
        }
    }

    // Issue 13, item 14: JPEG/PNG/WebP files cut short pass the header read; the scan skips them with the reason (they
    // used to stop the run when their latent was encoded). The whole files are kept.
    func testTruncatedImagesAreSkippedAtScan() throws {
        let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Fixtures/dataset/images")
        try png("cut/a.png", 256, 256, caption: "a")
        let pngData = try Data(contentsOf: root.appendingPathComponent("cut/a.png"))
        try pngData.prefix(pngData.count - 20).write(to: root.appendingPathComponent("cut/short.png"))
        for name in ["exif6.jpg", "rgb.webp"] {
            let whole = try Data(contentsOf: fixtures.appendingPathComponent(name))
            let ext = (name as NSString).pathExtension
            try whole.write(to: root.appendingPathComponent("cut/whole.\(ext)"))
            try whole.prefix(whole.count - 24).write(to: root.appendingPathComponent("cut/short.\(ext)"))
            if ext == "jpg" {   // (libwebp already refuses a short file at the header)
                XCTAssertNoThrow(try ImageIO.size(of: root.appendingPathComponent("cut/short.\(ext)").path), "the header must still read")
            }
        }
        let r = try DatasetReport.make(DatasetReport.folderConfig(root.appendingPathComponent("cut"), resolution: 256))
        XCTAssertEqual(Set(r.entries.map { ($0.image.path as NSString).lastPathComponent }), ["a.png", "whole.jpg", "whole.webp"])
        for name in ["short.jpg", "short.png"] {
            XCTAssertTrue(r.issues.contains { $0.path.hasSuffix(name) && $0.skipped && $0.reason.contains("truncated") }, "\(name): \(r.issues)")
        }
        XCTAssertTrue(r.issues.contains { $0.path.hasSuffix("short.webp") && $0.skipped }, "\(r.issues)")
    }

    func testFlatFolderReport() throws {
        let sizes = [("a.png", 1024, 1024), ("b.png", 1344, 768), ("c.png", 600, 900), ("d.png", 2000, 500)]
        try png("flat/a.png", 1024, 1024, caption: "cat, red, Sky")
        try png("flat/b.png", 1344, 768, caption: "cat, blue")
        try png("flat/c.png", 600, 900, caption: "dog, red, cat")
        try png("flat/d.png", 2000, 500, caption: nil)                 // no caption: kept, counted as missing
        try png("flat/tiny.png", 40, 30, caption: "tiny")              // smaller than its bucket: upscaled, as kohya does
        let corrupt = root.appendingPathComponent("flat/bad.png")
        try Data("not a png at all".utf8).write(to: corrupt)
        try "bad".write(to: root.appendingPathComponent("flat/bad.txt"), atomically: true, encoding: .utf8)

        let cfg = DatasetReport.folderConfig(root.appendingPathComponent("flat"), resolution: 1024, batchSize: 2)
        let r = try DatasetReport.make(cfg)
        XCTAssertEqual(r.entries.count, 5)
        XCTAssertEqual(Set(r.entries.map { ($0.image.path as NSString).lastPathComponent }), ["a.png", "b.png", "c.png", "d.png", "tiny.png"])
        XCTAssertEqual(r.upscaled.map { ($0.path as NSString).lastPathComponent }, ["tiny.png"], "only images below the smallest bucket side are reported")
        XCTAssertEqual(r.missingCaptions, 1)
        let skipped = r.issues.filter { !$0.reason.hasPrefix("no caption") }
        XCTAssertEqual(skipped.map { ($0.path as NSString).lastPathComponent }.sorted(), ["bad.png"])
        XCTAssertTrue(r.issues.contains { $0.path.hasSuffix("d.png") && $0.reason.hasPrefix("no caption") })

        // The bucket table agrees with Bucketing.choose on the same sizes.
        let b = try Bucketing(config: BucketConfig(resolution: 1024))
        var expected: [BucketSize: Int] = [:]
        for (_, w, h) in sizes + [("tiny.png", 40, 30)] { expected[b.choose(width: w, height: h)!.bucket, default: 0] += 1 }
        XCTAssertEqual(Dictionary(uniqueKeysWithValues: r.buckets.map { ($0.bucket, $0.images) }), expected)
        XCTAssertEqual(r.buckets.map(\.samples), r.buckets.map(\.images))   // 1 repeat
        for e in r.entries { XCTAssertEqual(e.placement, b.choose(width: e.width, height: e.height)) }

        // Tags: kohya lower-cases and strips; "cat" on 3 captions, "red" on 2 ("tiny" on 1).
        XCTAssertEqual(r.tagFrequency.prefix(2).map(\.tag), ["cat", "red"])
        XCTAssertEqual(r.tagFrequency.prefix(2).map(\.count), [3, 2])
        XCTAssertEqual(r.tagFrequency.first { $0.tag == "sky" }?.count, 1)

        // Steps: per bucket ceil(samples / batch 2), summed.
        let steps = r.buckets.reduce(0) { $0 + ($1.samples + 1) / 2 }
        XCTAssertEqual(r.kohyaStepsPerEpoch, steps)
        XCTAssertTrue(r.stepsLine.hasSuffix("= \(steps) (5 samples)"), r.stepsLine)
        let text = r.lines().joined(separator: "\n")
        XCTAssertTrue(text.contains("images: 5 usable, 1 skipped"), text)
        XCTAssertTrue(text.contains("tiny.png: 40x30 upscaled to"), text)
        XCTAssertTrue(text.contains("missing captions: 1"), text)
    }

    func testKohyaSeedLayout() throws {
        try png("img/1_character_name/a.png", 1024, 1024, caption: "character_name, smile")
        try png("img/1_character_name/b.png", 832, 1216, caption: "character_name, standing")
        try png("img/5_style/c.png", 1216, 832, caption: "style")
        let r = try DatasetReport.make(DatasetReport.folderConfig(root.appendingPathComponent("img")))
        XCTAssertEqual(r.subsets.map(\.numRepeats), [1, 5])
        XCTAssertEqual(r.entries.count, 3)
        XCTAssertEqual(r.buckets.map(\.samples).reduce(0, +), 1 + 1 + 5)
        XCTAssertEqual(r.tagFrequency.first?.tag, "character_name")
        XCTAssertEqual(r.kohyaStepsPerEpoch, r.buckets.reduce(0) { $0 + $1.samples })   // batch 1
    }

    func testNoUsableImageIsAnError() throws {
        let dir = root.appendingPathComponent("only")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        try Data("not a png".utf8).write(to: dir.appendingPathComponent("broken.png"))
        XCTAssertThrowsError(try DatasetReport.make(DatasetReport.folderConfig(dir))) {
            XCTAssertTrue("\($0)".contains("broken.png"), "\($0)")
        }
    }

    // An image smaller than the smallest bucket side is upscaled to its bucket, as kohya does (it used to be skipped),
    // and the report says so; with bucket_no_upscale it keeps its size.
    func testTinyImageIsUpscaledAsKohya() throws {
        try png("small/tiny.png", 16, 16, caption: "x")
        let r = try DatasetReport.make(DatasetReport.folderConfig(root.appendingPathComponent("small")))
        XCTAssertEqual(r.entries.count, 1)
        XCTAssertEqual(r.upscaled.count, 1)
        XCTAssertTrue(r.lines().joined(separator: "\n").contains("16x16 upscaled to"), r.lines().joined(separator: "\n"))
    }
}

/// kohya's fine-tuning subsets (`in_json`, a dataset TOML's `metadata_file`): FineTuningDataset in
/// library/train_util.py — captions and tags per image from the metadata, relative keys under image_dir.
final class FineTuningMetadataTests: XCTestCase {
    var root: URL!
    override func setUpWithError() throws {
        root = FileManager.default.temporaryDirectory.appendingPathComponent("ft-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
        for name in ["a.png", "b.png"] {
            let rgb = [UInt8](repeating: 128, count: 64 * 64 * 3)
            try ImageIO.writePNG(rgb, width: 64, height: 64, to: root.appendingPathComponent(name).path)
        }
    }
    override func tearDownWithError() throws { try? FileManager.default.removeItem(at: root) }

    func testMetadataCaptionsAndTags() throws {
        let meta = root.appendingPathComponent("meta.json")
        try Data("""
            {"a.png": {"caption": "a photo", "tags": "red, circle"},
             "b.png": {"tags": "blue"},
             "missing.png": {"caption": "gone"}}
            """.utf8).write(to: meta)
        var s = SubsetConfig()
        s.imageDir = root.path; s.metadataFile = meta.path; s.numRepeats = 3; s.resolution = [64, 64]
        let scan = try DatasetScan.scan(DatasetConfig(datasets: [[s]], source: meta.path))
        XCTAssertEqual(scan.images.map { ($0.path as NSString).lastPathComponent }, ["a.png", "b.png"])
        // caption + caption_separator + tags (kohya's non-wildcard branch); no caption: the tags alone.
        XCTAssertEqual(scan.images.map(\.caption), ["a photo,red, circle", "blue"])
        XCTAssertEqual(scan.images.map(\.repeats), [3, 3])
        XCTAssertTrue(scan.issues.contains { $0.path.hasSuffix("missing.png") && $0.reason.contains("no such image") })
        // With enable_wildcard: the tags after every caption line.
        s.enableWildcard = true
        try Data(#"{"a.png": {"caption": "one\ntwo", "tags": "x"}}"#.utf8).write(to: meta)
        XCTAssertEqual(try DatasetScan.scan(DatasetConfig(datasets: [[s]], source: meta.path)).images[0].caption, "one,x\ntwo,x")
    }

    func testJSONLAndDatasetTOMLMetadataFile() throws {
        let meta = root.appendingPathComponent("meta.jsonl")
        try Data("""
            {"image_path": "\(root.appendingPathComponent("a.png").path)", "caption": "absolute"}
            {"image_path": "b.png", "caption": "relative"}
            """.utf8).write(to: meta)
        let toml = root.appendingPathComponent("dataset.toml")
        try Data("""
            [general]
            resolution = 64
            [[datasets]]
              [[datasets.subsets]]
              image_dir = "\(root.path)"
              metadata_file = "\(meta.path)"
            """.utf8).write(to: toml)
        let cfg = try DatasetConfig.load(toml: toml)
        XCTAssertEqual(cfg.subsets[0].metadataFile, meta.path)
        let scan = try DatasetScan.scan(cfg)
        XCTAssertEqual(scan.images.map(\.caption), ["absolute", "relative"])
    }
}
