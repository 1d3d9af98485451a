import Tensor
import XCTest

/// Linear, matmul, broadcasting arithmetic, reductions, shape ops, embeddings and the loss, against
/// fixtures from Tests/Fixtures/ops_core.py (PyTorch 2.13 CPU), plus finite differences.
final class CoreOpsTests: XCTestCase {
    // F.linear(x, w, b) with x [2,5,24], w [40,24], b [40]; and F.linear(x, w) with x [7,33], w [17,33]
    func testLinearGolden() throws {
        try Golden("linear_bias").check(["x", "w", "b"], atol: 1e-4, rtol: 1e-4) { t, v in t.linear(v[0], v[1], v[2]) }
        try Golden("linear_nobias").check(["x", "w"], atol: 1e-4, rtol: 1e-4) { t, v in t.linear(v[0], v[1]) }
    }

    // (a.t() if ta else a) @ (b.t() if tb else b), for all four transpose combinations
    func testMatmulGolden() throws {
        for name in ["matmul_00", "matmul_01", "matmul_10", "matmul_11"] {
            let g = try Golden(name)
            try g.check(["a", "b"], atol: 1e-4, rtol: 1e-4) { t, v in
                t.matmul(v[0], v[1], transA: g.bool("transA"), transB: g.bool("transB"))
            }
        }
    }

    // a + b for [2,6,5,7]+[2,6,1,1], [3,4,9]+[9], [3,1,5]+[4,1]; a - b for [2,3,4]-[1,3,1];
    // a * b for [2,6,5,7]*[1,6,1,7] and [4,10]*[1]; x * -0.37
    func testBroadcastArithmeticGolden() throws {
        for name in ["add_bcast_nc11", "add_bcast_last", "add_bcast_both"] {
            try Golden(name).check(["a", "b"], atol: 1e-5, rtol: 1e-5) { t, v in t.add(v[0], v[1]) }
        }
        try Golden("sub_bcast").check(["a", "b"], atol: 1e-5, rtol: 1e-5) { t, v in t.sub(v[0], v[1]) }
        for name in ["mul_bcast", "mul_scalar_tensor"] {
            try Golden(name).check(["a", "b"], atol: 1e-5, rtol: 1e-5) { t, v in t.mul(v[0], v[1]) }
        }
        let s = try Golden("scale")
        try s.check(["x"], atol: 1e-6, rtol: 1e-6) { t, v in t.scale(v[0], s.float("s")) }
    }

    // x.sum(dim=(1, 3), keepdim=True); x.mean()
    func testReductionsGolden() throws {
        let g = try Golden("sum_axes")
        try g.check(["x"], atol: 1e-5, rtol: 1e-5) { t, v in t.sum(v[0], axes: g.ints("axes")) }
        try Golden("mean_all").check(["x"], atol: 1e-6, rtol: 1e-5) { t, v in t.mean(v[0]) }
    }

    // x.permute(0,2,1,3); x.permute(0,2,3,1); torch.cat([a, b], dim=1); x[:, 2:7, :]
    func testShapeOpsGolden() throws {
        for name in ["permute_0213", "permute_nchw_nhwc"] {
            let g = try Golden(name)
            try g.check(["x"], atol: 0, rtol: 0) { t, v in t.permute(v[0], g.ints("order")) }
        }
        let c = try Golden("concat_channels")
        try c.check(["a", "b"], atol: 0, rtol: 0) { t, v in t.concat(v, axis: c.int("axis")) }
        let s = try Golden("slice_mid")
        try s.check(["x"], atol: 0, rtol: 0) { t, v in
            t.slice(v[0], axis: s.int("axis"), start: s.int("start"), length: s.int("length"))
        }
    }

    // F.embedding(ids, table) with a repeated id (its gradient rows accumulate)
    func testEmbeddingGolden() throws {
        let g = try Golden("embedding")
        let ids = try g.indices("ids")
        try g.check(["table"], atol: 1e-6, rtol: 1e-6) { t, v in t.embedding(v[0], ids: ids) }
    }

    // timestep_embedding(t, dim) from sgm/modules/diffusionmodules/util.py (cos then sin), t up to 1024
    func testTimestepEmbeddingGolden() throws {
        for name in ["timestep_embedding_320", "timestep_embedding_256"] {
            let g = try Golden(name)
            // fp32 angles up to 1024 rad: one ulp of the angle is ~6e-5, so outputs agree to ~1e-4.
            try g.check(["t"], atol: 2e-4, rtol: 1e-4, gradAtol: 5e-2, gradRtol: 1e-3) { t, v in
                t.timestepEmbedding(v[0], dim: g.int("dim"))
            }
        }
    }

    // (F.mse_loss(pred, target, reduction="none").mean([1,2,3]) * weights).mean() — kohya's reduction
    func testWeightedMSEGolden() throws {
        try Golden("weighted_mse").check(["pred", "target", "weights"], atol: 1e-5, rtol: 1e-5) { t, v in
            t.weightedMSE(v[0], v[1], weights: v[2])
        }
    }

    func testFiniteDifferences() {
        let x = Tensor(randomNormal: [3, 4, 6], seed: 1), w = Tensor(randomNormal: [5, 6], seed: 2)
        let b = Tensor(randomNormal: [5], seed: 3)
        checkGradients([x, w, b], "linear") { t, v in t.linear(v[0], v[1], v[2]) }
        checkGradients([Tensor(randomNormal: [4, 7], seed: 4), Tensor(randomNormal: [5, 7], seed: 5)], "matmul ·ᵀ") { t, v in
            t.matmul(v[0], v[1], transB: true)
        }
        checkGradients([Tensor(randomNormal: [2, 3, 4, 5], seed: 6), Tensor(randomNormal: [2, 3, 1, 1], seed: 7)], "add") { t, v in
            t.add(v[0], v[1])
        }
        checkGradients([Tensor(randomNormal: [3, 1, 5], seed: 8), Tensor(randomNormal: [4, 1], seed: 9)], "mul") { t, v in
            t.mul(v[0], v[1])
        }
        checkGradients([Tensor(randomNormal: [2, 3, 4], seed: 10)], "sum axes") { t, v in t.sum(v[0], axes: [0, 2]) }
        checkGradients([Tensor(randomNormal: [2, 3, 4], seed: 11)], "mean") { t, v in t.mean(v[0]) }
        checkGradients([Tensor(randomNormal: [2, 3, 4, 5], seed: 12)], "permute") { t, v in t.permute(v[0], [3, 1, 0, 2]) }
        checkGradients([Tensor(randomNormal: [2, 2, 3], seed: 13), Tensor(randomNormal: [2, 4, 3], seed: 14)], "concat") { t, v in
            t.concat(v, axis: 1)
        }
        checkGradients([Tensor(randomNormal: [2, 6, 3], seed: 15)], "split") { t, v in
            let parts = t.split(v[0], axis: 1, sizes: [1, 3, 2])
            return t.mul(parts[1], t.concat([parts[0], parts[2]], axis: 1))
        }
        checkGradients([Tensor(randomNormal: [5, 4], seed: 16)], "embedding") { t, v in t.embedding(v[0], ids: [4, 1, 1, 0]) }
        checkGradients([Tensor(shape: [3], [0.5, 3, 40])], eps: 1e-3, atol: 2e-2, "timestep embedding") { t, v in
            t.timestepEmbedding(v[0], dim: 16)
        }
        checkGradients([Tensor(randomNormal: [2, 3, 2, 2], seed: 17), Tensor(randomNormal: [2, 3, 2, 2], seed: 18),
                        Tensor(shape: [2], [0.7, 1.3])], "weighted mse") { t, v in t.weightedMSE(v[0], v[1], weights: v[2]) }
    }

    /// Widening: a bf16/fp16 frozen weight gives the fp32 result of its rounded values.
    func testNarrowWeightsAreWidenedPerOp() {
        let x = Tensor(randomNormal: [3, 8], seed: 20), w = Tensor(randomNormal: [4, 8], seed: 21)
        for dtype in [DType.f16, .bf16] {
            let narrow = w.converted(to: dtype)
            XCTAssertEqual(narrow.dtype, dtype)
            let wide = narrow.fp32()
            let expected = Linear.forward(x, wide, nil)
            assertClose(Linear.forward(x, narrow, nil), expected, atol: 0, rtol: 0, "linear with \(dtype) weight")
            // rounding really happened, and stays within the type's precision
            let err = zip(wide.scalars, w.scalars).map { abs($0 - $1) / max(abs($1), 1e-3) }.max()!
            XCTAssertGreaterThan(err, 0)
            XCTAssertLessThan(err, dtype == .bf16 ? 1.0 / 256 : 1.0 / 2048)
        }
    }
}
