import Base
import Dataset
import Foundation
import XCTest

/// Captions against kohya's own `process_caption` / `set_tag_frequency` / caption reading and AI Toolkit's
/// `inject_trigger_into_prompt`: Tests/Fixtures/dataset/captions.json, written by make_captions.py, which runs
/// the copied functions with a scripted random source that `Scripted` below reproduces draw for draw. The
/// SplitMix64 path (which cannot match Python's stream) is checked by properties.
final class CaptionTests: XCTestCase {
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/dataset")

    /// make_captions.py ScriptedRandom: random() = frac((k + 1) * 0.6180339887498949),
    /// _randbelow(n) = (k * 7919 + 13) % n, k counting every call.
    struct Scripted: CaptionRandomSource {
        var k = 0
        mutating func random() -> Double {
            let v = (Double(k + 1) * 0.6180339887498949).truncatingRemainder(dividingBy: 1.0)
            k += 1
            return v
        }
        mutating func below(_ n: Int) -> Int {
            let v = (k * 7919 + 13) % n
            k += 1
            return v
        }
    }

    struct Table: Decodable {
        struct Process: Decodable { let caption: String; let options: CaptionOptions; let epoch: Int; let expected: String }
        struct File: Decodable { let bytes: String; let enableWildcard: Bool; let expected: String }
        struct Tags: Decodable { let captions: [String]; let expected: [String: Int] }
        let process: [Process]
        let files: [File]
        let tagFrequency: [Tags]
    }

    func table() throws -> Table {
        let data = try Data(contentsOf: Self.fixtures.appendingPathComponent("captions.json"))
        return try JSONDecoder().decode(Table.self, from: data)
    }

    func testProcessMatchesKohyaOnScriptedDraws() throws {
        let t = try table()
        XCTAssertGreaterThan(t.process.count, 30)
        for c in t.process {
            var rng = Scripted()
            let got = Captions.process(c.caption, options: c.options, epoch: c.epoch, rng: &rng)
            XCTAssertEqual(got, c.expected, "caption \(c.caption.debugDescription) options \(c.options) epoch \(c.epoch)")
        }
    }

    func tempDir() throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("captions-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        addTeardownBlock { try? FileManager.default.removeItem(at: dir) }
        return dir
    }

    func testReadingMatchesKohya() throws {
        let t = try table()
        let dir = try tempDir()
        for (i, f) in t.files.enumerated() {
            let url = dir.appendingPathComponent("\(i).txt")
            try XCTUnwrap(Data(base64Encoded: f.bytes)).write(to: url)
            XCTAssertEqual(try Captions.read(url, enableWildcard: f.enableWildcard).get(), f.expected, "file \(i)")
            if !f.enableWildcard { XCTAssertEqual(try Captions.firstLine(of: url).get(), f.expected) }
        }
    }

    func testUnusableCaptionFilesAreIssues() throws {
        let dir = try tempDir()
        let cases: [(String, [UInt8], String)] = [
            ("empty.txt", [], "empty"),
            ("blank.txt", Array(" \t\n1girl\n".utf8), "first line is empty"),
            ("latin1.txt", [0x63, 0x61, 0x66, 0xE9, 0x0A], "not UTF-8"),
        ]
        for (name, bytes, reason) in cases {
            let url = dir.appendingPathComponent(name)
            try Data(bytes).write(to: url)
            switch Captions.firstLine(of: url) {
            case .success(let s): XCTFail("\(name) read as \(s.debugDescription)")
            case .failure(let e):
                let issue = e.issue
                XCTAssertEqual(issue.path, url.path)
                XCTAssertTrue(issue.reason.contains(reason), issue.reason)
            }
        }
        let missing = dir.appendingPathComponent("missing.txt")
        guard case .failure = Captions.firstLine(of: missing) else { return XCTFail("missing file read") }
        // A byte-order mark is dropped, not kept in the caption.
        let bom = dir.appendingPathComponent("bom.txt")
        try Data([0xEF, 0xBB, 0xBF] + Array("sks, dog\n".utf8)).write(to: bom)
        XCTAssertEqual(try Captions.firstLine(of: bom).get(), "sks, dog")
    }

    func testTagFrequencyMatchesKohya() throws {
        for s in try table().tagFrequency {
            XCTAssertEqual(Captions.tagFrequency(s.captions), s.expected, "\(s.captions)")
        }
    }

    // MARK: SplitMix64 properties

    static let tags = (0..<12).map { "tag\($0)" }
    static let caption = tags.joined(separator: ", ")

    func testShuffleIsPermutationWithKeptTagsFirst() {
        let o = CaptionOptions(shuffle: true, keepTokens: 3)
        var orders = Set<String>()
        for id in 0..<200 {
            let out = Captions.process(Self.caption, options: o, seed: 42, epoch: 1, imageID: "img\(id)")
            let parts = out.components(separatedBy: ", ")
            XCTAssertEqual(Array(parts.prefix(3)), Array(Self.tags.prefix(3)))
            XCTAssertEqual(parts.dropFirst(3).sorted(), Self.tags.dropFirst(3).sorted())
            orders.insert(out)
        }
        XCTAssertGreaterThan(orders.count, 150, "shuffles should differ between images")

        // Keep-tokens separator: prefix and suffix stay in place, the middle is permuted.
        let sepOpts = CaptionOptions(shuffle: true, keepTokensSeparator: "|||")
        for id in 0..<50 {
            let out = Captions.process("sks, style ||| a, b, c, d, e ||| hi res", options: sepOpts, seed: 1, epoch: 2,
                                       imageID: "\(id)")
            let parts = out.components(separatedBy: ", ")
            XCTAssertEqual(Array(parts.prefix(2)), ["sks", "style"])
            XCTAssertEqual(parts.last, "hi res")
            XCTAssertEqual(parts.dropFirst(2).dropLast().sorted(), ["a", "b", "c", "d", "e"])
        }
    }

    func testTagDropoutKeepsKeptTagsAndDropsAboutRate() {
        let rate = 0.3
        let o = CaptionOptions(keepTokens: 2, tagDropoutRate: rate)
        var dropped = 0, total = 0
        for id in 0..<500 {
            let out = Captions.process(Self.caption, options: o, seed: 7, epoch: 1, imageID: "img\(id)")
            let parts = out.components(separatedBy: ", ")
            XCTAssertEqual(Array(parts.prefix(2)), ["tag0", "tag1"])
            // Order is kept without shuffle: what survives is a subsequence.
            var it = Self.tags.dropFirst(2).makeIterator()
            for p in parts.dropFirst(2) {
                while let t = it.next(), t != p {}
            }
            total += 10
            dropped += 10 - (parts.count - 2)
        }
        // 5000 Bernoulli(0.3) draws: sd = sqrt(5000 * 0.21) ≈ 32.4; 5 sd either side.
        let expected = Double(total) * rate
        XCTAssertLessThan(abs(Double(dropped) - expected), 5 * (Double(total) * rate * (1 - rate)).squareRoot(),
                          "dropped \(dropped) of \(total)")
    }

    func testCaptionDropoutRateAndEveryNEpochs() {
        let rate = 0.25
        let o = CaptionOptions(captionDropoutRate: rate)
        var empties = 0
        let n = 2000
        for id in 0..<n where Captions.process("a, b", options: o, seed: 3, epoch: 1, imageID: "\(id)").isEmpty {
            empties += 1
        }
        let sd = (Double(n) * rate * (1 - rate)).squareRoot()
        XCTAssertLessThan(abs(Double(empties) - Double(n) * rate), 5 * sd, "\(empties) of \(n) dropped")

        let every = CaptionOptions(dropoutEveryNEpochs: 3, trigger: "ohwx")
        for epoch in 1...9 {
            let out = Captions.process("a, b", options: every, seed: 3, epoch: epoch, imageID: "x")
            XCTAssertEqual(out, epoch % 3 == 0 ? "" : "ohwx a, b", "epoch \(epoch)")
        }
    }

    func testDeterministicPerSeedEpochImage() {
        let o = CaptionOptions(shuffle: true, keepTokens: 1, tagDropoutRate: 0.2)
        let a = Captions.process(Self.caption, options: o, seed: 99, epoch: 4, imageID: "dir/001.png")
        XCTAssertEqual(a, Captions.process(Self.caption, options: o, seed: 99, epoch: 4, imageID: "dir/001.png"))
        var differing = 0
        for epoch in 5..<25
        where Captions.process(Self.caption, options: o, seed: 99, epoch: epoch, imageID: "dir/001.png") != a {
            differing += 1
        }
        XCTAssertGreaterThanOrEqual(differing, 18, "other epochs should (almost always) differ")
        XCTAssertNotEqual(a, Captions.process(Self.caption, options: o, seed: 100, epoch: 4, imageID: "dir/001.png"))
    }

    func testSplitMixBelowIsInRangeAndCoversIt() {
        var r = SplitMix64(seed: 1, epoch: 1, imageID: "a")
        var seen = [Int](repeating: 0, count: 7)
        for _ in 0..<7000 {
            let v = r.below(7)
            seen[v] += 1
            let d = r.random()
            XCTAssertTrue(d >= 0 && d < 1)
        }
        XCTAssertTrue(seen.allSatisfy { $0 > 800 && $0 < 1200 }, "\(seen)")
    }

    func testOptionsDecodeWithDefaults() throws {
        let o = try JSONDecoder().decode(CaptionOptions.self, from: Data(#"{"shuffle": true, "trigger": "sks"}"#.utf8))
        XCTAssertEqual(o, CaptionOptions(shuffle: true, trigger: "sks"))
        XCTAssertEqual(o.captionSeparator, ",")
    }
}
