import Foundation
import SafeTensors
import Tensor
import XCTest
@testable import Dataset

final class TextCacheTests: XCTestCase {
    var dir: URL!

    override func setUpWithError() throws {
        dir = FileManager.default.temporaryDirectory.appendingPathComponent("text-cache-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    }

    override func tearDownWithError() throws { try? FileManager.default.removeItem(at: dir) }

    /// A deterministic encoder whose values depend on the caption, so a wrong entry is noticed. Counts calls.
    final class Encoder {
        var calls: [String] = []
        func callAsFunction(_ caption: String) throws -> (context: Tensor, pooled: Tensor) {
            calls.append(caption)
            return Self.output(caption)
        }
        static func output(_ caption: String) -> (context: Tensor, pooled: Tensor) {
            let seed = Float(caption.utf8.reduce(0) { ($0 &* 31 &+ Int($1)) % 1000 })
            return (Tensor(shape: [3, 4], (0..<12).map { seed + Float($0) * 0.25 }),
                    Tensor(shape: [2], [seed, -seed]))
        }
    }

    func cache(_ storage: TextCache.Storage? = nil) throws -> TextCache {
        try TextCache(storage: storage ?? .disk(dir), captionOptions: [CaptionOptions()], contextShape: [3, 4], pooledShape: [2])
    }

    func testMissThenHitAcrossRunsWithStoredValues() throws {
        let c = try cache(), enc = Encoder()
        let caps = ["a cat, sitting", "a dog", "a cat, sitting", ""]
        let r1 = try c.ensure(captions: caps, maxTokenLength: 75, encoderIdentity: "te-1", encode: enc.callAsFunction)
        XCTAssertEqual(r1.misses, 3); XCTAssertEqual(r1.hits, 0); XCTAssertEqual(enc.calls, ["a cat, sitting", "a dog", ""])
        let r2 = try c.ensure(captions: caps, maxTokenLength: 75, encoderIdentity: "te-1", encode: enc.callAsFunction)
        XCTAssertEqual(r2.hits, 3); XCTAssertEqual(r2.encoded, 0)
        let r3 = try cache().ensure(captions: caps, maxTokenLength: 75, encoderIdentity: "te-1", encode: enc.callAsFunction)
        XCTAssertEqual(r3.hits, 3); XCTAssertEqual(enc.calls.count, 3)

        let got = try XCTUnwrap(c.lookup(c.key("a dog", maxTokenLength: 75, encoderIdentity: "te-1")))
        XCTAssertEqual(got.context.shape, [3, 4]); XCTAssertEqual(got.context.dtype, .f32)
        XCTAssertEqual(got.context.scalars, Encoder.output("a dog").context.scalars)
        XCTAssertEqual(got.pooled.scalars, Encoder.output("a dog").pooled.scalars)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path).count, 3)
    }

    func testDifferentIdentityOrTokenLengthIsADifferentEntry() throws {
        let c = try cache(), enc = Encoder()
        try c.ensure(captions: ["x"], maxTokenLength: 75, encoderIdentity: "te-1", encode: enc.callAsFunction)
        let r1 = try c.ensure(captions: ["x"], maxTokenLength: 75, encoderIdentity: "te-2", encode: enc.callAsFunction)
        XCTAssertEqual(r1.misses, 1)
        let r2 = try c.ensure(captions: ["x"], maxTokenLength: 225, encoderIdentity: "te-1", encode: enc.callAsFunction)
        XCTAssertEqual(r2.misses, 1)
        XCTAssertEqual(enc.calls.count, 3)
        let names = Set([c.key("x", maxTokenLength: 75, encoderIdentity: "te-1").fileName,
                         c.key("x", maxTokenLength: 75, encoderIdentity: "te-2").fileName,
                         c.key("x", maxTokenLength: 225, encoderIdentity: "te-1").fileName])
        XCTAssertEqual(names.count, 3)
    }

    func testFileUnderWrongNameIsStaleAndRebuilt() throws {
        let c = try cache(), enc = Encoder()
        try c.ensure(captions: ["x"], maxTokenLength: 75, encoderIdentity: "te-1", encode: enc.callAsFunction)
        let old = try XCTUnwrap(c.path(for: c.key("x", maxTokenLength: 75, encoderIdentity: "te-1")))
        for (caption, len, id, field) in [("x", 75, "te-2", "text_encoder"), ("x", 150, "te-1", "max_token_length"),
                                          ("y", 75, "te-1", "caption")] {
            let k = c.key(caption, maxTokenLength: len, encoderIdentity: id)
            let p = try XCTUnwrap(c.path(for: k))
            try? FileManager.default.removeItem(atPath: p)
            try FileManager.default.copyItem(atPath: old, toPath: p)
            guard case .stale(_, let reason) = c.check(k) else { return XCTFail("expected stale for \(field)") }
            XCTAssertTrue(reason.contains("'\(field)'"), reason)
            let r = try c.ensure(captions: [caption], maxTokenLength: len, encoderIdentity: id, encode: enc.callAsFunction)
            XCTAssertEqual(r.rebuilt.count, 1); XCTAssertEqual(r.rebuilt.first?.path, p)
            XCTAssertTrue(r.rebuilt[0].reason.contains("rebuilt"), r.rebuilt[0].reason)
            XCTAssertEqual(c.lookup(k)?.pooled.scalars, Encoder.output(caption).pooled.scalars)
        }
    }

    func testCorruptFilesAreRebuiltWithReason() throws {
        let c = try cache(), enc = Encoder()
        let k = c.key("x", maxTokenLength: 75, encoderIdentity: "te-1")
        let p = try XCTUnwrap(c.path(for: k))
        // Truncated garbage.
        try Data([1, 2, 3]).write(to: URL(fileURLWithPath: p))
        guard case .corrupt(_, let r1) = c.check(k) else { return XCTFail("garbage not corrupt") }
        XCTAssertTrue(r1.contains("unreadable"), r1)
        var rep = try c.ensure(captions: ["x"], maxTokenLength: 75, encoderIdentity: "te-1", encode: enc.callAsFunction)
        XCTAssertEqual(rep.rebuilt.count, 1); XCTAssertNotNil(c.lookup(k))
        // Right metadata, wrong shape.
        try writeSafeTensors(["context": Tensor(shape: [2, 2], [0, 0, 0, 0]), "pooled": Tensor(shape: [2], [0, 0])],
                             metadata: k.fields, to: p)
        guard case .corrupt(_, let r2) = c.check(k) else { return XCTFail("wrong shape not corrupt") }
        XCTAssertTrue(r2.contains("shape"), r2)
        // Non-finite values.
        try writeSafeTensors(["context": Tensor(shape: [3, 4], Array(repeating: .nan, count: 12)), "pooled": Tensor(shape: [2], [0, 0])],
                             metadata: k.fields, to: p)
        guard case .corrupt(_, let r3) = c.check(k) else { return XCTFail("NaN not corrupt") }
        XCTAssertTrue(r3.contains("non-finite"), r3)
        // Missing tensor.
        try writeSafeTensors(["context": Tensor(shape: [3, 4], Array(repeating: 0, count: 12))], metadata: k.fields, to: p)
        guard case .corrupt(_, let r4) = c.check(k) else { return XCTFail("missing tensor not corrupt") }
        XCTAssertTrue(r4.contains("pooled"), r4)
        rep = try c.ensure(captions: ["x"], maxTokenLength: 75, encoderIdentity: "te-1", encode: enc.callAsFunction)
        XCTAssertEqual(rep.rebuilt.count, 1)
        XCTAssertEqual(c.lookup(k)?.context.scalars, Encoder.output("x").context.scalars)
    }

    func testMemoryModeWritesNoFiles() throws {
        let c = try cache(.memory), enc = Encoder()
        XCTAssertNil(c.path(for: c.key("x", maxTokenLength: 75, encoderIdentity: "te")))
        let r1 = try c.ensure(captions: ["x", "y", "x"], maxTokenLength: 75, encoderIdentity: "te", encode: enc.callAsFunction)
        XCTAssertEqual(r1.misses, 2)
        let r2 = try c.ensure(captions: ["x", "y"], maxTokenLength: 75, encoderIdentity: "te", encode: enc.callAsFunction)
        XCTAssertEqual(r2.hits, 2); XCTAssertEqual(enc.calls, ["x", "y"])
        XCTAssertEqual(c.lookup(c.key("y", maxTokenLength: 75, encoderIdentity: "te"))?.context.scalars,
                       Encoder.output("y").context.scalars)
        XCTAssertNil(c.lookup(c.key("y", maxTokenLength: 150, encoderIdentity: "te")))
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path), [])
    }

    func testWrongEncoderShapeIsRejectedAndNothingWritten() throws {
        let c = try cache()
        XCTAssertThrowsError(try c.ensure(captions: ["x"], maxTokenLength: 75, encoderIdentity: "te") { _ in
            (Tensor(shape: [4, 3], Array(repeating: 0, count: 12)), Tensor(shape: [2], [0, 0]))
        }) { XCTAssertTrue("\($0)".contains("context of shape [4, 3]"), "\($0)") }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir.path), [])
    }

    func testIsStaticForEachOption() {
        XCTAssertTrue(TextCache.isStatic(options: CaptionOptions()))
        // Fixed text and options that only matter with shuffle/tag dropout keep captions static.
        XCTAssertTrue(TextCache.isStatic(options: CaptionOptions(keepTokens: 2, keepTokensSeparator: "|||",
            captionSeparator: ";", secondarySeparator: ";;;", prefix: "pre", suffix: "suf", trigger: "ohwx")))
        let varying: [(CaptionOptions, String)] = [
            (CaptionOptions(shuffle: true), "shuffle_caption"),
            (CaptionOptions(captionDropoutRate: 0.1), "caption_dropout_rate"),
            (CaptionOptions(dropoutEveryNEpochs: 3), "caption_dropout_every_n_epochs"),
            (CaptionOptions(tagDropoutRate: 0.2), "caption_tag_dropout_rate"),
            (CaptionOptions(enableWildcard: true), "enable_wildcard"),
        ]
        for (o, name) in varying {
            XCTAssertFalse(TextCache.isStatic(options: o), name)
            XCTAssertEqual(TextCache.varyingOption(o)?.hasPrefix(name), true, name)
        }
    }

    func testRefusalNamesSubsetAndOption() {
        let opts = [CaptionOptions(), CaptionOptions(tagDropoutRate: 0.25)]
        XCTAssertThrowsError(try TextCache(storage: .memory, captionOptions: opts)) { e in
            let m = "\(e)"
            XCTAssertTrue(m.contains("subset 1"), m)
            XCTAssertTrue(m.contains("caption_tag_dropout_rate = 0.25"), m)
            XCTAssertTrue(m.contains("encoded each step"), m)
        }
        XCTAssertThrowsError(try TextCache(storage: .memory, captionOptions: [CaptionOptions()], textEncodersTrained: true)) {
            XCTAssertTrue("\($0)".contains("text encoders are being trained"), "\($0)")
        }
        XCTAssertNoThrow(try TextCache(storage: .memory, captionOptions: [CaptionOptions(), CaptionOptions(prefix: "p")]))
    }
}
