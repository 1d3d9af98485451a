import Foundation
import SDXL
import XCTest

/// Golden ids from Tests/Fixtures/sdxl/make_tokens.py: transformers 4.54.1's python CLIPTokenizer (ftfy 6.3.1
/// cleaning) on a vocabulary built from open_clip's merges as openai/clip-vit-large-patch14's, tokenizer 1 padded
/// with <|endoftext|>, tokenizer 2 with "!" = 0 (laion bigG, kohya's `pad_token_id = 0`); chunks from kohya's
/// train_util.BaseDataset.get_input_ids. Exact equality throughout.
final class TokenizerTests: XCTestCase {
    struct Case {
        let caption: String
        let encode: [CLIPTokenizer.Padding: [Int]]
        let ids77: [CLIPTokenizer.Padding: [Int]]
        let chunks: [CLIPTokenizer.Padding: [Int: [[Int]]]]   // max_token_length → chunks
    }

    static let fixtures = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Fixtures/sdxl")

    static let golden: (meta: [String: Any], cases: [Case]) = {
        let data = try! Data(contentsOf: fixtures.appendingPathComponent("tokens_golden.json"))
        let json = try! JSONSerialization.jsonObject(with: data) as! [String: Any]
        func ints(_ any: Any?) -> [Int] { (any as! [NSNumber]).map(\.intValue) }
        let cases = (json["cases"] as! [[String: Any]]).map { c -> Case in
            var encode: [CLIPTokenizer.Padding: [Int]] = [:], ids: [CLIPTokenizer.Padding: [Int]] = [:]
            var chunks: [CLIPTokenizer.Padding: [Int: [[Int]]]] = [:]
            for (n, padding) in [("1", CLIPTokenizer.Padding.endOfText), ("2", .zero)] {
                encode[padding] = ints(c["encode" + n])
                ids[padding] = ints(c["ids" + n])
                for length in [150, 225] {
                    chunks[padding, default: [:]][length] = (c["chunks\(n)_\(length)"] as! [Any]).map(ints)
                }
            }
            return Case(caption: c["caption"] as! String, encode: encode, ids77: ids, chunks: chunks)
        }
        return (json, cases)
    }()

    static let tokenizers: [CLIPTokenizer.Padding: CLIPTokenizer] = [
        .endOfText: try! CLIPTokenizer.bundled(padding: .endOfText),
        .zero: try! CLIPTokenizer.bundled(padding: .zero),
    ]

    func testGoldenWasMadeWithFTFY() {
        let meta = Self.golden.meta
        XCTAssertEqual(meta["ftfy"] as? String, "6.3.1")
        XCTAssertTrue((meta["transformers"] as? String)?.hasPrefix("4.") ?? false, "python CLIPTokenizer (ftfy)")
        XCTAssertEqual(Self.golden.cases.count, 43)
        XCTAssertEqual(Self.tokenizers[.endOfText]!.vocabularySize, 49_408)
        XCTAssertEqual(Self.tokenizers[.endOfText]!.padID, 49_407)
        XCTAssertEqual(Self.tokenizers[.zero]!.padID, 0)
    }

    /// Every caption × both tokenizers: raw BPE ids, max_length=77 ids, kohya chunks for 75/150/225.
    func testBundledTokenizersMatchTransformersAndKohya() {
        for (index, c) in Self.golden.cases.enumerated() {
            for (padding, tokenizer) in Self.tokenizers {
                let what = "caption \(index) \(c.caption.debugDescription.prefix(60)) [\(padding)]"
                XCTAssertEqual(tokenizer.encode(c.caption), c.encode[padding]!, "encode: \(what)")
                XCTAssertEqual(tokenizer(c.caption), c.ids77[padding]!, "77: \(what)")
                XCTAssertEqual(tokenizer.chunks(c.caption, maxTokenLength: 75), [c.ids77[padding]!], "75: \(what)")
                for length in [150, 225] {
                    let expected = c.chunks[padding]![length]!
                    XCTAssertEqual(expected.count, length / 75)
                    XCTAssertEqual(tokenizer.chunks(c.caption, maxTokenLength: length), expected, "\(length): \(what)")
                }
            }
        }
    }

    /// The captions cover the chunk boundaries (74…76, 149…151, 224…226 tokens) and beyond 225.
    func testCaptionsCoverChunkBoundaries() {
        let lengths = Set(Self.golden.cases.map { $0.encode[.endOfText]!.count })
        for n in [0, 74, 75, 76, 149, 150, 151, 224, 225, 226] { XCTAssertTrue(lengths.contains(n), "\(n) tokens") }
        XCTAssertTrue(lengths.contains { $0 > 300 })
    }

    /// A Hugging Face tokenizer folder (vocab.json + merges.txt, written here from the bundled merges the way
    /// openai/clip-vit-large-patch14's files are laid out) loads and gives the bundled tokenizer's ids.
    func testTokenizerFolderMatchesBundled() throws {
        let folder = try Self.writeHuggingFaceFolder()
        defer { try? FileManager.default.removeItem(at: folder) }
        for (padding, bundled) in Self.tokenizers {
            let loaded = try CLIPTokenizer(tokenizerFolder: folder, padding: padding)
            XCTAssertEqual(loaded.vocabularySize, 49_408)
            for c in Self.golden.cases {
                XCTAssertEqual(loaded(c.caption), bundled(c.caption), c.caption)
                XCTAssertEqual(loaded.chunks(c.caption, maxTokenLength: 225), c.chunks[padding]![225]!, c.caption)
            }
        }
    }

    func testInvalidFilesNameTheFile() throws {
        let good = try Self.writeHuggingFaceFolder()
        defer { try? FileManager.default.removeItem(at: good) }
        let bad = FileManager.default.temporaryDirectory.appendingPathComponent("clip-bad-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: bad, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: bad) }
        let vocab = bad.appendingPathComponent("vocab.json"), merges = bad.appendingPathComponent("merges.txt")
        let goodVocab = try Data(contentsOf: good.appendingPathComponent("vocab.json"))
        let goodMerges = try String(contentsOf: good.appendingPathComponent("merges.txt"), encoding: .utf8)

        func expectError(_ fileName: String, _ fragment: String, line: UInt = #line) {
            XCTAssertThrowsError(try CLIPTokenizer(tokenizerFolder: bad, padding: .endOfText), line: line) { error in
                let text = "\(error)"
                XCTAssertTrue(text.contains(fileName) && text.contains(fragment), text, line: line)
            }
        }
        expectError("vocab.json", "missing")                                   // empty folder
        try Data("[1, 2]".utf8).write(to: vocab)
        try goodMerges.write(to: merges, atomically: true, encoding: .utf8)
        expectError("vocab.json", "JSON object")                               // not a token → id map
        try Data("{\"a\": 0}".utf8).write(to: vocab)
        expectError("vocab.json", "byte symbol")                               // not a CLIP vocabulary
        try goodVocab.write(to: vocab)
        try String(goodMerges.drop(while: { $0 != "\n" }).dropFirst()).write(to: merges, atomically: true, encoding: .utf8)
        expectError("merges.txt", "#version")                                  // header line missing
        try goodMerges.replacingOccurrences(of: "\ni n\n", with: "\ni n q\n")
            .write(to: merges, atomically: true, encoding: .utf8)
        expectError("merges.txt", "merge 1 ")                                  // not a pair
        try goodMerges.replacingOccurrences(of: "\ni n\n", with: "\ni ∅\n").write(to: merges, atomically: true, encoding: .utf8)
        expectError("vocab.json", "merge 1 of")                                // merge of unknown symbols
        try goodMerges.write(to: merges, atomically: true, encoding: .utf8)
        XCTAssertNoThrow(try CLIPTokenizer(tokenizerFolder: bad, padding: .zero))
    }

    // MARK: - Helpers

    /// vocab.json + merges.txt in openai/clip-vit-large-patch14's layout, from the bundled merges. Written
    /// independently of the tokenizer's own vocabulary builder: CLIP's bytes_to_unicode, then the vocabulary
    /// order of open_clip's SimpleTokenizer.
    static func writeHuggingFaceFolder() throws -> URL {
        // The source copy of the bundled resource (Sources/SDXL/Resources/clip_bpe_merges.txt).
        let resource = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent().appendingPathComponent("Sources/SDXL/Resources/clip_bpe_merges.txt")
        let mergeLines = try String(contentsOf: resource, encoding: .utf8).split(separator: "\n").map(String.init)
        var printable = Array(33...126) + Array(161...172) + Array(174...255)
        var symbols = printable.map { String(UnicodeScalar(UInt8($0))) }
        var n = 0
        for b in 0..<256 where !printable.contains(b) {
            printable.append(b)
            symbols.append(String(Character(Unicode.Scalar(UInt32(256 + n))!)))
            n += 1
        }
        var vocab = symbols + symbols.map { $0 + "</w>" } + mergeLines.map { $0.replacingOccurrences(of: " ", with: "") }
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        var map: [String: Int] = [:]
        for (i, token) in vocab.enumerated() { map[token] = i }
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("clip-tokenizer-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        try JSONSerialization.data(withJSONObject: map).write(to: folder.appendingPathComponent("vocab.json"))
        try ("#version: 0.2\n" + mergeLines.joined(separator: "\n") + "\n")
            .write(to: folder.appendingPathComponent("merges.txt"), atomically: true, encoding: .utf8)
        return folder
    }
}
