import Foundation
import SafeTensors
import SDXL
import Tensor
import XCTest

/// SDXL's text encoders and conditioning vectors against transformers / diffusers / kohya. Every fixture here was
/// written by Tests/Fixtures/sdxl/make_text.py: text_tiny.safetensors (a tiny CLIPTextModel in the ViT-L role and a
/// tiny CLIPTextModelWithProjection converted to OpenCLIP's layout in the bigG role, under SDXL's
/// conditioner.embedders.* keys) and text_io.safetensors (ids and the reference outputs).
final class TextEncoderTests: XCTestCase {
    static let fixtures = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Fixtures/sdxl")

    static func fixture(_ name: String) throws -> SafeTensorsFile {
        try SafeTensorsFile(path: fixtures.appendingPathComponent(name).path)
    }

    /// max |actual − expected| / max |expected|: the error relative to the tensor's scale.
    func assertRelativelyClose(_ actual: Tensor, _ expected: Tensor, _ tolerance: Float, _ what: String,
                               file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(actual.shape, expected.shape, "\(what): shape", file: file, line: line)
        guard actual.shape == expected.shape else { return }
        let a = actual.scalars, e = expected.scalars
        var worst: Float = 0, scale: Float = 0
        for i in 0..<a.count {
            worst = max(worst, a[i].isNaN ? .infinity : abs(a[i] - e[i]))
            scale = max(scale, abs(e[i]))
        }
        XCTAssertLessThanOrEqual(worst / max(scale, .leastNormalMagnitude), tolerance,
                                 "\(what): max error \(worst) against max |expected| \(scale)", file: file, line: line)
    }

    /// An [R, N] (or [B, n, N]) integer tensor as rows of N ids.
    func rows(_ io: SafeTensorsFile, _ name: String) throws -> [[Int]] {
        let n = io.entries[name]!.shape.last!
        let flat = try io.integers(name)
        return stride(from: 0, to: flat.count, by: n).map { Array(flat[$0..<($0 + n)]) }
    }

    struct Tiny {
        let l: CLIPTextEncoderL
        let g: OpenCLIPTextEncoderG
        let binder: WeightBinder
    }

    func loadTiny(pooledProjection: OpenCLIPTextEncoderG.PooledProjection = .openCLIP) throws -> Tiny {
        let file = try Self.fixture("text_tiny.safetensors")
        let binder = WeightBinder(file)
        let l = CLIPTextEncoderL(binder.scope(CLIPTextEncoderL.keyPrefix), config: try CLIPTextConfig.inferL(shapes: file.shapes))
        let g = OpenCLIPTextEncoderG(binder.scope(OpenCLIPTextEncoderG.keyPrefix),
                                     config: try CLIPTextConfig.inferG(shapes: file.shapes), pooledProjection: pooledProjection)
        try binder.finish(checkingUnusedUnder: ["conditioner.embedders."]) {
            CLIPTextEncoderL.isIgnorable($0) || OpenCLIPTextEncoderG.isIgnorable($0)
        }
        return Tiny(l: l, g: g, binder: binder)
    }

    func testConfigsInferredFromFixtureShapesAndStrictLoad() throws {
        let file = try Self.fixture("text_tiny.safetensors")
        XCTAssertEqual(try CLIPTextConfig.inferL(shapes: file.shapes), .tinyL)
        XCTAssertEqual(try CLIPTextConfig.inferG(shapes: file.shapes), .tinyG)
        XCTAssertEqual(CLIPTextConfig.tinyL.eosTokenID, 511)   // make_text.py's EOS (vocab 512)

        let tiny = try loadTiny()
        // Every tensor in the file except the two known-ignorable ones is bound, final_layer_norm included.
        XCTAssertEqual(tiny.binder.bound.count, file.names.count - 2)
        XCTAssertTrue(tiny.binder.bound.contains { $0.key == "\(CLIPTextEncoderL.keyPrefix).final_layer_norm.weight" })

        // Without the ignorable list, strict loading names exactly those two keys.
        let binder = WeightBinder(file)
        _ = CLIPTextEncoderL(binder.scope(CLIPTextEncoderL.keyPrefix), config: .tinyL)
        _ = OpenCLIPTextEncoderG(binder.scope(OpenCLIPTextEncoderG.keyPrefix), config: .tinyG)
        XCTAssertThrowsError(try binder.finish(checkingUnusedUnder: ["conditioner.embedders."])) { error in
            let text = "\(error)"
            XCTAssertTrue(text.contains("2 unexpected key(s)"), text)
            XCTAssertTrue(text.contains("embeddings.position_ids") && text.contains("logit_scale"), text)
        }
    }

    func testRealSDXLShapesInferViTLAndBigG() throws {
        // The shapes of sd_xl_base_1.0.safetensors' text towers (the subset inference reads, plus layer indices).
        var shapes: [String: [Int]] = [:]
        let l = CLIPTextEncoderL.keyPrefix, g = OpenCLIPTextEncoderG.keyPrefix
        shapes["\(l).embeddings.token_embedding.weight"] = [49408, 768]
        shapes["\(l).embeddings.position_embedding.weight"] = [77, 768]
        for i in 0..<12 { shapes["\(l).encoder.layers.\(i).mlp.fc1.weight"] = [3072, 768] }
        shapes["\(g).token_embedding.weight"] = [49408, 1280]
        shapes["\(g).positional_embedding"] = [77, 1280]
        for i in 0..<32 { shapes["\(g).transformer.resblocks.\(i).mlp.c_fc.weight"] = [5120, 1280] }
        shapes["\(g).text_projection"] = [1280, 1280]
        XCTAssertEqual(try CLIPTextConfig.inferL(shapes: shapes), .clipL)
        XCTAssertEqual(try CLIPTextConfig.inferG(shapes: shapes), .bigG)
        XCTAssertEqual(CLIPTextConfig.bigG.eosTokenID, 49407)
        shapes["\(g).text_projection"] = nil
        XCTAssertThrowsError(try CLIPTextConfig.inferG(shapes: shapes)) { XCTAssertTrue("\($0)".contains("text_projection"), "\($0)") }
    }

    /// make_text.py: transformers' hidden_states[-2] of both towers, CLIPTextModelWithProjection.text_embeds, and
    /// their channel concat (also cross-checked there against open_clip's TextTransformer on the converted tensors).
    func testPenultimateStatesPooledAndContextMatchTransformers() throws {
        let tiny = try loadTiny(), io = try Self.fixture("text_io.safetensors")
        let idsL = try rows(io, "ids_l"), idsG = try rows(io, "ids_g")
        let t = Tape()
        let penultimateL = tiny.l(t, ids: idsL)
        let (penultimateG, pooled) = tiny.g(t, ids: idsG)
        assertRelativelyClose(penultimateL.value, try io.tensor("l_penultimate"), 1e-4, "L penultimate")
        assertRelativelyClose(penultimateG.value, try io.tensor("g_penultimate"), 1e-4, "G penultimate")
        assertRelativelyClose(pooled.value, try io.tensor("g_pooled"), 1e-4, "G pooled (text_embeds)")
        // Rows padded with EOS: pooled at the first EOS, as transformers (and kohya's pool_workaround) do.
        assertRelativelyClose(tiny.g(t, ids: idsL).pooled.value, try io.tensor("g_pooled_eos_padded"), 1e-4,
                              "G pooled of EOS-padded rows")

        let (context, pooled1) = Conditioning.encode(t, l: tiny.l, g: tiny.g, idsL: idsL.map { [$0] }, idsG: idsG.map { [$0] })
        assertRelativelyClose(context.value, try io.tensor("context"), 1e-4, "context")
        assertRelativelyClose(pooled1.value, try io.tensor("g_pooled"), 1e-4, "encode's pooled")
    }

    /// make_text.py: kohya's pool_workaround on a CLIPTextModelWithProjection whose text_projection.weight is the
    /// file's `text_projection` copied untransposed (sdxl_model_util.convert_sdxl_text_encoder_2_checkpoint).
    func testKohyaSingleFilePooledProjection() throws {
        let tiny = try loadTiny(pooledProjection: .kohyaSingleFile), io = try Self.fixture("text_io.safetensors")
        let pooled = tiny.g(Tape(), ids: try rows(io, "ids_g")).pooled
        assertRelativelyClose(pooled.value, try io.tensor("g_pooled_kohya_single_file"), 1e-4, "kohya single-file pooled")
    }

    /// make_text.py: diffusers' get_timestep_embedding(time_ids.flatten(), 256, flip_sin_to_cos=True,
    /// downscale_freq_shift=0) reshaped [B, 1536] after text_embeds.
    func testYMatchesDiffusersTextTimeEmbedding() throws {
        let io = try Self.fixture("text_io.safetensors")
        let timeIDs = try io.tensor("time_ids").scalars.map { Int($0) }      // [2, 6]
        let row = { (b: Int) in Array(timeIDs[(6 * b)..<(6 * b + 6)]) }
        let pooled = Var(try io.tensor("g_pooled"))
        let y = Conditioning.y(Tape(), pooled: pooled,
                               originalSize: [0, 1].map { (h: row($0)[0], w: row($0)[1]) },
                               cropTopLeft: [0, 1].map { (top: row($0)[2], left: row($0)[3]) },
                               targetSize: [0, 1].map { (h: row($0)[4], w: row($0)[5]) })
        let expected = try io.tensor("y"), p = pooled.shape[1], b = pooled.shape[0]
        XCTAssertEqual(y.shape, [b, p + 6 * 256])
        let t = Tape()
        assertRelativelyClose(t.slice(y, axis: 1, start: 0, length: p).value,
                              t.slice(Var(expected), axis: 1, start: 0, length: p).value, 0, "y: pooled part")
        // The sinusoids are compared absolutely: arguments reach 1216·f, where one fp32 ulp of a frequency (the
        // engine rounds exp() from Double, torch evaluates it in fp32) plus the product's rounding (ulp(1216)/2 =
        // 6e-5) move sin/cos by up to ~1.3e-4 (measured: 1.0e-4).
        let embedded = t.slice(y, axis: 1, start: p, length: 6 * 256).value.scalars
        let reference = t.slice(Var(expected), axis: 1, start: p, length: 6 * 256).value.scalars
        let worst = zip(embedded, reference).map { abs($0 - $1) }.max()!
        XCTAssertLessThanOrEqual(worst, 3e-4, "y: size/crop embeddings")
    }

    /// make_text.py: kohya's get_hidden_states_sdxl with max_token_length 150 (2 chunks per prompt, ids cut as
    /// kohya's TokenizeStrategy._get_input_ids does), stitched and pooled from each prompt's first chunk.
    func testLongCaptionStitchingMatchesKohya() throws {
        let tiny = try loadTiny(), io = try Self.fixture("text_io.safetensors")
        let chunksL = try rows(io, "long_ids_l"), chunksG = try rows(io, "long_ids_g")   // [4 rows of 77], prompt-major
        let perPrompt = { (r: [[Int]]) in stride(from: 0, to: r.count, by: 2).map { Array(r[$0..<($0 + 2)]) } }
        let (context, pooled) = Conditioning.encode(Tape(), l: tiny.l, g: tiny.g, idsL: perPrompt(chunksL), idsG: perPrompt(chunksG))
        XCTAssertEqual(context.shape, [2, 75 * 2 + 2, 32 + 48])
        assertRelativelyClose(context.value, try io.tensor("long_context"), 1e-4, "stitched context")
        assertRelativelyClose(pooled.value, try io.tensor("long_pooled"), 1e-4, "first-chunk pooled")
    }

    /// make_text.py: PyTorch's gradient of Σ(hidden_states[-2] · seed) with respect to the L tower's position embedding.
    func testBackwardThroughViTLReachesAParameter() throws {
        let tiny = try loadTiny(), io = try Self.fixture("text_io.safetensors")
        let l = tiny.l
        l.positionEmbedding = Var(l.positionEmbedding.value, requiresGrad: true)
        let t = Tape()
        let out = l(t, ids: try rows(io, "ids_l"))
        let grads = t.backward(from: out, seed: try io.tensor("l_grad_seed"))
        let g = try XCTUnwrap(grads[l.positionEmbedding])
        assertRelativelyClose(g, try io.tensor("l_position_embedding_grad"), 1e-4, "d position_embedding")
    }
}
