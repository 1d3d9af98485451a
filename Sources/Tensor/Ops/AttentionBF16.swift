import Foundation

/// The bf16 family's attention kernels (what PyTorch's CPU autocast does for scaled dot-product attention): the
/// products QKᵀ, P·V and their gradients in bf16 with fp32 accumulation, on oneDNN, all heads of a block of query
/// rows in one batched call; the softmax, its statistics and its gradient in fp32.
///
/// Query rows go in blocks of `rows` so the [H, rows, Nk] score block stays within `blockElements` (16 MB in fp32):
/// O(N·H·D + H·rows·Nk) memory, never the whole [H, Nq, Nk] matrix. Unlike the fp32 kernels' online softmax,
/// each block sees all its keys at once, so its softmax is the exact two-pass one.
extension Attention {
    nonisolated(unsafe) static var blockElements = 1 << 22   // tests lower it to cover several blocks

    /// Query rows per block: the fewest blocks with heads·rows·Nk ≤ blockElements, equal in size (a multiple of 16,
    /// the last one shorter), so no block is a small remainder with a slower product.
    static func bf16Rows(_ g: Geometry) -> Int {
        let fit = max(16, blockElements / max(1, g.heads * g.nk) / 16 * 16)
        if fit >= g.nq { return g.nq }
        let blocks = (g.nq + fit - 1) / fit
        return min(fit, ((g.nq + blocks - 1) / blocks + 15) / 16 * 16)
    }

    /// Work memory of one call: fp32 scores/probabilities and their gradient, and bf16 copies for the products.
    final class BF16Block {
        let s, dp: UnsafeMutablePointer<Float>
        let sb, db: UnsafeMutablePointer<UInt16>
        init(_ n: Int, gradient: Bool) {
            s = .allocate(capacity: n)
            sb = .allocate(capacity: n)
            dp = .allocate(capacity: gradient ? n : 1)
            db = .allocate(capacity: gradient ? n : 1)
        }
        deinit { s.deallocate(); sb.deallocate(); dp.deallocate(); db.deallocate() }
    }

    static func forwardBF16(_ g: Geometry, q: Tensor, k: Tensor, v: Tensor) -> (out: Tensor, logsumexp: Tensor) {
        let q = DNNL.bf16(q), k = DNNL.bf16(k), v = DNNL.bf16(v)   // [B, N, H·D] bf16 (as saved by the tape)
        let out = Tensor(uninitialized: [g.batch, g.nq, g.hd])
        let lse = Tensor(uninitialized: [g.batch, g.heads, g.nq])
        let rows = bf16Rows(g), nk = g.nk, h = g.heads, d = g.d, hd = g.hd
        let work = BF16Block(h * rows * nk, gradient: false)
        let pl = lse.mutablePointer, po = out.mutablePointer
        // Scores in the log₂ domain: exp(scale·s) = 2^(scale·log₂e·s).
        let alpha = g.scale * ExpMath.log2e
        for b in 0..<g.batch {
            var i0 = 0
            while i0 < g.nq {
                let r = min(rows, g.nq - i0)
                // S[h, r, Nk] = alpha · Q[b, i0..<i0+r, h] · K[b, :, h]ᵀ
                DNNL.gemmBatched(batch: h, transA: false, transB: true, m: r, n: nk, k: d, alpha: alpha,
                                 a: q, aOffset: g.qOffset(b, 0, i0), lda: hd, strideA: d,
                                 b: k, bOffset: g.kOffset(b, 0, 0), ldb: hd, strideB: d,
                                 beta: 0, c: work.s, ldc: nk, strideC: r * nk)
                // P = softmax(S) per row (fp32), rounded to bf16 for P·V; lse per row.
                let s = work.s, sb = work.sb
                parallelFor(h * r, grain: max(1, 8192 / nk)) { span in
                    for t in span {
                        let head = t / r, row = t % r
                        let p = s + t * nk
                        let valid = g.validKeys(row: i0 + row, j0: 0, cols: nk)
                        let m = ExpMath.rowMax(p, valid)
                        let sum = ExpMath.exp2Row(p, p, valid, shift: -m)
                        ExpMath.scaleRow(p, valid, 1 / sum)
                        if valid < nk { (p + valid).update(repeating: 0, count: nk - valid) }
                        DNNL.roundToBF16(p, sb + t * nk, nk)
                        pl[(b * h + head) * g.nq + i0 + row] = (m + log2f(sum)) * ExpMath.ln2
                    }
                }
                // O[b, i0..<i0+r, h] = P · V[b, :, h]
                DNNL.gemmBatched(batch: h, transA: false, transB: false, m: r, n: d, k: nk, alpha: 1,
                                 a: sb, lda: nk, strideA: r * nk,
                                 b: v, bOffset: g.kOffset(b, 0, 0), ldb: hd, strideB: d,
                                 beta: 0, c: po + g.qOffset(b, 0, i0), ldc: hd, strideC: d)
                i0 += r
            }
        }
        return (out, lse)
    }

    /// Gradients of `forwardBF16`, block by block of query rows: P is recomputed from q, k and the saved lse;
    /// with Dᵢ = rowsum(dO ∘ O): dV += Pᵀ·dO, dP = dO·Vᵀ, dS = P ∘ (dP − Dᵢ), dQ = scale·dS·K, dK += scale·dSᵀ·Q.
    static func backwardBF16(_ g: Geometry, dOut: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                             logsumexp: Tensor, wantQ: Bool, wantK: Bool, wantV: Bool)
        -> (dQ: Tensor?, dK: Tensor?, dV: Tensor?) {
        let nq = g.nq, nk = g.nk, h = g.heads, d = g.d, hd = g.hd
        let lse = logsumexp.fp32()
        let q = DNNL.bf16(q), k = DNNL.bf16(k), v = DNNL.bf16(v), dO = DNNL.bf16(dOut), o = DNNL.bf16(out)
        // Dᵢ = Σ_c dO[i, c]·O[i, c] per head: [B, H, Nq], from the bf16 roundings that the products see (as autocast
        // does: its O and dO are bf16), so that dP − Dᵢ cancels where it should (a causal row 0: P = 1, dS = 0).
        let delta = Tensor(uninitialized: [g.batch, h, nq])
        let pdo = dO.rawPointer.assumingMemoryBound(to: UInt16.self), pout = o.rawPointer.assumingMemoryBound(to: UInt16.self)
        let pdelta = delta.mutablePointer
        parallelFor(g.batch * nq, grain: max(1, 4096 / hd)) { span in
            for bi in span {
                let b = bi / nq, i = bi % nq
                for head in 0..<h {
                    let x = pdo + bi * hd + head * d, y = pout + bi * hd + head * d
                    var sum: Float = 0
                    for c in 0..<d {
                        sum += Float(bitPattern: UInt32(x[c]) << 16) * Float(bitPattern: UInt32(y[c]) << 16)
                    }
                    pdelta[(b * h + head) * nq + i] = sum
                }
            }
        }
        let dQ = wantQ ? Tensor(uninitialized: q.shape) : nil
        let dK = wantK ? Tensor(uninitialized: k.shape) : nil
        let dV = wantV ? Tensor(uninitialized: v.shape) : nil
        if nq == 0 {   // no query rows: the key and value gradients are zero (the loop below would not write them)
            dK?.mutablePointer.update(repeating: 0, count: dK!.count)
            dV?.mutablePointer.update(repeating: 0, count: dV!.count)
            return (dQ, dK, dV)
        }
        let rows = bf16Rows(g)
        let work = BF16Block(h * rows * nk, gradient: true)
        let pl = lse.pointer, pd = delta.pointer
        let alpha = g.scale * ExpMath.log2e
        for b in 0..<g.batch {
            var i0 = 0
            while i0 < nq {
                let r = min(rows, nq - i0), first: Float = i0 == 0 ? 0 : 1
                let s = work.s, sb = work.sb, dp = work.dp, db = work.db
                // P = 2^(alpha·Q·Kᵀ − lse·log₂e), fp32 in s and bf16 in sb
                DNNL.gemmBatched(batch: h, transA: false, transB: true, m: r, n: nk, k: d, alpha: alpha,
                                 a: q, aOffset: g.qOffset(b, 0, i0), lda: hd, strideA: d,
                                 b: k, bOffset: g.kOffset(b, 0, 0), ldb: hd, strideB: d,
                                 beta: 0, c: s, ldc: nk, strideC: r * nk)
                parallelFor(h * r, grain: max(1, 8192 / nk)) { span in
                    for t in span {
                        let head = t / r, row = t % r
                        let p = s + t * nk
                        let valid = g.validKeys(row: i0 + row, j0: 0, cols: nk)
                        _ = ExpMath.exp2Row(p, p, valid, shift: -pl[(b * h + head) * nq + i0 + row] * ExpMath.log2e)
                        if valid < nk { (p + valid).update(repeating: 0, count: nk - valid) }
                        DNNL.roundToBF16(p, sb + t * nk, nk)
                    }
                }
                if let dV {
                    // dV[b, :, h] (+)= Pᵀ · dO[b, i0..<i0+r, h]
                    DNNL.gemmBatched(batch: h, transA: true, transB: false, m: nk, n: d, k: r, alpha: 1,
                                     a: sb, lda: nk, strideA: r * nk,
                                     b: dO, bOffset: g.qOffset(b, 0, i0), ldb: hd, strideB: d,
                                     beta: first, c: dV.mutablePointer + g.kOffset(b, 0, 0), ldc: hd, strideC: d)
                }
                guard wantQ || wantK else { i0 += r; continue }
                // dP = dO · Vᵀ, then dS = P ∘ (dP − D) (fp32), rounded to bf16 for the two products
                DNNL.gemmBatched(batch: h, transA: false, transB: true, m: r, n: nk, k: d, alpha: 1,
                                 a: dO, aOffset: g.qOffset(b, 0, i0), lda: hd, strideA: d,
                                 b: v, bOffset: g.kOffset(b, 0, 0), ldb: hd, strideB: d,
                                 beta: 0, c: dp, ldc: nk, strideC: r * nk)
                parallelFor(h * r, grain: max(1, 8192 / nk)) { span in
                    for t in span {
                        let head = t / r, row = t % r
                        ExpMath.softmaxGradRow(s + t * nk, dp + t * nk, nk, pd[(b * h + head) * nq + i0 + row])
                        DNNL.roundToBF16(dp + t * nk, db + t * nk, nk)
                    }
                }
                if let dQ {
                    // dQ[b, i0..<i0+r, h] = scale · dS · K[b, :, h]
                    DNNL.gemmBatched(batch: h, transA: false, transB: false, m: r, n: d, k: nk, alpha: g.scale,
                                     a: db, lda: nk, strideA: r * nk,
                                     b: k, bOffset: g.kOffset(b, 0, 0), ldb: hd, strideB: d,
                                     beta: 0, c: dQ.mutablePointer + g.qOffset(b, 0, i0), ldc: hd, strideC: d)
                }
                if let dK {
                    // dK[b, :, h] (+)= scale · dSᵀ · Q[b, i0..<i0+r, h]
                    DNNL.gemmBatched(batch: h, transA: true, transB: false, m: nk, n: d, k: r, alpha: g.scale,
                                     a: db, lda: nk, strideA: r * nk,
                                     b: q, bOffset: g.qOffset(b, 0, i0), ldb: hd, strideB: d,
                                     beta: first, c: dK.mutablePointer + g.kOffset(b, 0, 0), ldc: hd, strideC: d)
                }
                i0 += r
            }
        }
        return (dQ, dK, dV)
    }
}
