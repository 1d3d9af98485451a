import Foundation
import XCTest
@testable import Dataset

final class LayoutTests: XCTestCase {
    var root: URL!
    override func setUpWithError() throws {
        root = FileManager.default.temporaryDirectory.appendingPathComponent("layout-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: root, withIntermediateDirectories: true)
    }
    override func tearDownWithError() throws { try? FileManager.default.removeItem(at: root) }

    @discardableResult
    func put(_ rel: String, _ text: String = "x", data: Data? = nil) -> String {
        let u = root.appendingPathComponent(rel)
        try! FileManager.default.createDirectory(at: u.deletingLastPathComponent(), withIntermediateDirectories: true)
        FileManager.default.createFile(atPath: u.path, contents: data ?? Data(text.utf8))
        return u.path
    }
    func issues(_ s: DatasetScan, _ file: String) -> [DatasetIssue] { s.issues.filter { $0.path.hasSuffix(file) } }

    func testFlatFolderOf15Images() throws {
        for i in 0..<15 { put("flat/img\(i).png"); put("flat/img\(i).txt", "photo \(i)\nsecond line") }
        let s = try DatasetScan.scan(DatasetConfig.folder(root.appendingPathComponent("flat")))
        XCTAssertEqual(s.images.count, 15)
        XCTAssertEqual(s.issues, [])
        let first = s.images.first { $0.path.hasSuffix("img3.png") }!
        XCTAssertEqual(first.caption, "photo 3")
        XCTAssertEqual(first.repeats, 1)
        XCTAssertNil(first.classToken)
    }

    func testKohyaRepeatFolders() throws {
        put("dataset/img/1_character_name/a.png"); put("dataset/img/1_character_name/a.txt", "a cap")
        put("dataset/img/1_character_name/b.JPG")
        put("dataset/img/10_style/c.webp"); put("dataset/img/10_style/c.txt", "c cap")
        put("dataset/img/nonum_x/d.png")
        let cfg = DatasetConfig.folder(root.appendingPathComponent("dataset/img"))
        XCTAssertEqual(cfg.subsets.map(\.numRepeats), [10, 1])   // sorted by folder name
        XCTAssertEqual(cfg.subsets.map(\.classTokens), ["style", "character_name"])
        let s = try DatasetScan.scan(cfg)
        XCTAssertEqual(s.images.count, 3)
        let b = s.images.first { $0.path.hasSuffix("b.JPG") }!
        XCTAssertNil(b.caption); XCTAssertEqual(b.classToken, "character_name"); XCTAssertEqual(b.repeats, 1)
        XCTAssertEqual(s.images.first { $0.path.hasSuffix("c.webp") }!.repeats, 10)
        XCTAssertEqual(issues(s, "nonum_x").count, 1)
        XCTAssertTrue(issues(s, "nonum_x")[0].reason.contains("repeat-count"))
        XCTAssertEqual(issues(s, "b.JPG").map(\.reason), ["no caption file (b.txt): the image trains with class token 'character_name'"])
        XCTAssertEqual(issues(s, "b.JPG").map(\.skipped), [false], "the image is kept: the issue must not say skipped")
    }

    func testBadInputsEachReportedOnceValidImagesKept() throws {
        put("d/ok.png"); put("d/ok.txt", "fine")
        put("d/zero.png", data: Data())
        put("d/a.png"); put("d/a.jpg"); put("d/a.txt", "shared")
        put("d/nocap.webp")
        put("d/empty.png"); put("d/empty.txt", "")
        put("d/latin.png"); put("d/latin.txt", data: Data([0x63, 0x61, 0x66, 0xE9, 0xFF]))
        let fm = FileManager.default
        try fm.createSymbolicLink(atPath: root.appendingPathComponent("d/loop1.png").path, withDestinationPath: root.appendingPathComponent("d/loop2.png").path)
        try fm.createSymbolicLink(atPath: root.appendingPathComponent("d/loop2.png").path, withDestinationPath: root.appendingPathComponent("d/loop1.png").path)
        let s = try DatasetScan.scan(DatasetConfig.folder(root.appendingPathComponent("d")))
        XCTAssertEqual(Set(s.images.map { ($0.path as NSString).lastPathComponent }),
                       ["ok.png", "a.jpg", "nocap.webp", "empty.png"])
        XCTAssertEqual(issues(s, "zero.png").map(\.reason), ["empty image file (0 bytes)"])
        XCTAssertEqual(issues(s, "a.png").count, 1); XCTAssertTrue(issues(s, "a.png")[0].reason.contains("shares caption a.txt"))
        XCTAssertEqual(issues(s, "nocap.webp").count, 1); XCTAssertTrue(issues(s, "nocap.webp")[0].reason.hasPrefix("no caption"))
        XCTAssertEqual(issues(s, "empty.txt").count, 1); XCTAssertTrue(issues(s, "empty.txt")[0].reason.hasPrefix("empty caption"))
        // An unreadable (non-UTF-8) caption skips its image (kohya stops on it); an empty one trains with an empty caption,
        // and the words say which (issue 13, item 13).
        XCTAssertEqual(issues(s, "latin.png").count, 1); XCTAssertTrue(issues(s, "latin.png")[0].reason.contains("not UTF-8"))
        XCTAssertTrue(issues(s, "latin.png")[0].skipped)
        XCTAssertEqual(issues(s, "empty.txt")[0].description, issues(s, "empty.txt")[0].path + ": empty caption: the image trains with an empty caption")
        XCTAssertEqual(issues(s, "loop1.png").map(\.reason), ["symlink loop"])
        XCTAssertEqual(issues(s, "loop2.png").map(\.reason), ["symlink loop"])
        XCTAssertEqual(s.issues.count, 7)
        XCTAssertEqual(s.images.first { $0.path.hasSuffix("ok.png") }!.caption, "fine")
    }

    func testDirectorySymlinkLoopAndMissingFolder() throws {
        put("img/2_x/a.png")
        try FileManager.default.createSymbolicLink(atPath: root.appendingPathComponent("img/3_loop").path,
                                                   withDestinationPath: root.appendingPathComponent("img").path)
        let s = try DatasetScan.scan(DatasetConfig.folder(root.appendingPathComponent("img")))
        XCTAssertEqual(s.images.count, 1)
        XCTAssertEqual(issues(s, "3_loop").count, 1)
        XCTAssertTrue(issues(s, "3_loop")[0].reason.contains("symlink loop"))
        XCTAssertThrowsError(try DatasetScan.scan(DatasetConfig.folder(root.appendingPathComponent("missing")))) {
            XCTAssertTrue("\($0)".contains("folder does not exist"))
        }
    }

    func testNoUsableImageIsError() throws {
        put("e/zero.png", data: Data()); put("e/notes.txt", "hi")
        XCTAssertThrowsError(try DatasetScan.scan(DatasetConfig.folder(root.appendingPathComponent("e")))) {
            XCTAssertTrue("\($0)".contains("no usable image"))
        }
    }

    func writeTOML(_ s: String) -> URL { URL(fileURLWithPath: put("cfg.toml", s)) }

    func testTOMLCascade() throws {
        put("s1/a.png"); put("s1/a.cap", "cap a"); put("s2/b.png"); put("s3/c.png")
        let u = writeTOML("""
        [general]
        shuffle_caption = true
        caption_extension = ".cap"
        keep_tokens = 1
        batch_size = 2
        resolution = 1024

        [[datasets]]
        keep_tokens = 2
        resolution = [768, 512]

          [[datasets.subsets]]
          image_dir = "\(root.path)/s1"
          num_repeats = 5
          keep_tokens = 3
          class_tokens = "sks"
          caption_dropout_rate = 0

          [[datasets.subsets]]
          image_dir = "\(root.path)/s2"

        [[datasets]]
          [[datasets.subsets]]
          image_dir = "\(root.path)/s3"
        """)
        let c = try DatasetConfig.load(toml: u)
        XCTAssertEqual(c.datasets.count, 2)
        let s1 = c.datasets[0][0], s2 = c.datasets[0][1], s3 = c.datasets[1][0]
        XCTAssertEqual([s1.keepTokens, s2.keepTokens, s3.keepTokens], [3, 2, 1])   // subset < dataset < general
        XCTAssertEqual(s1.resolution, [768, 512]); XCTAssertEqual(s3.resolution, [1024, 1024])
        XCTAssertEqual([s1.batchSize, s3.batchSize], [2, 2])
        XCTAssertTrue(s3.shuffleCaption); XCTAssertEqual(s3.captionExtension, ".cap")
        XCTAssertEqual(s1.numRepeats, 5); XCTAssertEqual(s2.numRepeats, 1)
        // Defaults when absent (kohya dataclass / argparse defaults copied into SubsetConfig).
        var d = SubsetConfig(); d.imageDir = "\(root.path)/s3"; d.resolution = [1024, 1024]; d.batchSize = 2
        d.shuffleCaption = true; d.captionExtension = ".cap"; d.keepTokens = 1
        // What the TOML set at s3's levels (its subset: image_dir; [general]: the rest), which a training TOML's flat
        // dataset arguments (kohya's argparse level) must not override.
        d.explicitKeys = ["image_dir", "caption_extension", "shuffle_caption", "batch_size", "keep_tokens", "resolution"]
        XCTAssertEqual(s3, d)
        XCTAssertEqual(d.minBucketReso, 256); XCTAssertEqual(d.maxBucketReso, 1024); XCTAssertEqual(d.bucketResoSteps, 64)
        XCTAssertEqual(SubsetConfig().captionExtension, ".caption"); XCTAssertEqual(SubsetConfig().keepTokensSeparator, "")
        let scan = try DatasetScan.scan(c)
        XCTAssertEqual(scan.images.map(\.subset), [0, 1, 2])
        XCTAssertEqual(scan.images[0].caption, "cap a"); XCTAssertEqual(scan.images[0].repeats, 5)
    }

    func testTOMLErrors() throws {
        XCTAssertThrowsError(try DatasetConfig.load(toml: writeTOML("[general]\nbogus_key = 1\n"))) {
            XCTAssertTrue("\($0)".contains("bogus_key")); XCTAssertTrue("\($0)".contains("cfg.toml"))
        }
        XCTAssertThrowsError(try DatasetConfig.load(toml: writeTOML("[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"x\"\nbatch_size = 2\n"))) {
            XCTAssertTrue("\($0)".contains("batch_size"))   // dataset key not allowed in a subset
        }
        XCTAssertThrowsError(try DatasetConfig.load(toml: writeTOML("[general]\nnum_repeats = \"ten\"\n"))) {
            XCTAssertTrue("\($0)".contains("num_repeats")); XCTAssertTrue("\($0)".contains("ten"))
        }
        XCTAssertThrowsError(try DatasetConfig.load(toml: writeTOML("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 2\n"))) {
            XCTAssertTrue("\($0)".contains("image_dir"))
        }
    }

    // Issue 13, item 11: kohya's caption_extension traps stop with the key and the extension found, instead of training
    // every image captionless (kohya's read_caption: os.path.splitext(image)[0] + caption_extension, read in sd-scripts).
    func testCaptionExtensionTrapsStopNamingTheKey() throws {
        for i in 0..<4 { put("t/img\(i).png"); put("t/img\(i).txt", "photo \(i)") }
        let noDot = DatasetConfig.folder(root.appendingPathComponent("t"), captionExtension: "txt")
        var e = try XCTUnwrap(Result { try DatasetScan.scan(noDot) }.failureDescription)
        XCTAssertTrue(e.contains("caption_extension = \"txt\"") && e.contains("4 of 4 images") && e.contains("needs its dot")
                      && e.contains("Set caption_extension = \".txt\""), e)
        // kohya's own default, with .txt files beside the images
        e = try XCTUnwrap(Result { try DatasetScan.scan(DatasetConfig.folder(root.appendingPathComponent("t"), captionExtension: ".caption")) }.failureDescription)
        XCTAssertTrue(e.contains("caption_extension = \".caption\"") && e.contains("have a .txt file beside them"), e)
        // A few captionless images among captioned ones are not a trap.
        put("t/extra.png")
        XCTAssertEqual(try DatasetScan.scan(DatasetConfig.folder(root.appendingPathComponent("t"), captionExtension: ".txt")).images.count, 5)
    }

    // Issue 13, item 12: train_data_dir pointing at an N_name folder itself keeps its repeats and class token, saying so.
    func testRepeatsFolderGivenItselfKeepsItsRepeats() throws {
        put("parent/10_mychar/a.png"); put("parent/10_mychar/a.txt", "mychar smiling")
        let cfg = DatasetConfig.folder(root.appendingPathComponent("parent/10_mychar"))
        XCTAssertEqual(cfg.subsets.map(\.numRepeats), [10])
        XCTAssertEqual(cfg.subsets.map(\.classTokens), ["mychar"])
        XCTAssertTrue(cfg.issues.contains { !$0.skipped && $0.reason.contains("itself a kohya repeats folder") }, "\(cfg.issues)")
        let scan = try DatasetScan.scan(cfg)
        XCTAssertEqual(scan.images.map(\.repeats), [10])
        XCTAssertEqual(scan.images.map(\.classToken), ["mychar"])
    }
}

private extension Result where Failure == Error {
    init(_ body: () throws -> Success) { do { self = .success(try body()) } catch { self = .failure(error) } }
    var failureDescription: String? { if case .failure(let e) = self { return "\(e)" }; return nil }
}
