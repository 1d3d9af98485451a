/// Scaled dot-product attention, tiled with an online softmax (FlashAttention-2), so the
/// [heads, Nq, Nk] score matrix never exists: SDXL at 1024² would need 670 MB of it per layer.
/// Work memory is a few tiles per thread, plus in backward one per-thread copy of the gradient that
/// tiles share (dQ, or dK and dV when keys are fewer): O(N·H·D), never O(N²).
///
/// Independent tiles run on the engine's threads (`parallelFor`); each tile's products are
/// single-threaded sgemm calls on strided views of the [B, N, H·D] tensors (no permute copies).
/// OpenBLAS is set to one thread for the duration, so the engine's threads and OpenBLAS's never run
/// at once.
import Foundation

public enum Attention {
    /// Query rows and key rows per tile: a [qBlock, kBlock] fp32 tile (128 KB) stays in L2.
    static let qBlock = 128
    static let kBlock = 256

    /// Multi-head attention on the heads-interleaved layout the model's linears produce:
    /// q [B, Nq, H·D], k and v [B, Nk, H·D] → out [B, Nq, H·D]; head h uses columns h·D..<(h+1)·D.
    /// scale defaults to 1/√D. causal: query i attends to keys j ≤ i (CLIP's text encoders; Nq == Nk).
    /// Also returns the per-row log-sum-exp [B, H, Nq], which is all backward needs besides q, k, v, out.
    public static func forward(q: Tensor, k: Tensor, v: Tensor, heads: Int, causal: Bool = false, scale: Float? = nil,
                               _ family: KernelFamily = Kernels.family) -> (out: Tensor, logsumexp: Tensor) {
        let g = Geometry(q: q, k: k, v: v, heads: heads, causal: causal, scale: scale)
        if family == .bf16 { return forwardBF16(g, q: q, k: k, v: v) }
        let q = q.fp32(), k = k.fp32(), v = v.fp32()
        let out = Tensor(uninitialized: q.shape)
        let lse = Tensor(uninitialized: [g.batch, heads, g.nq])   // natural log of Σⱼ exp(scale·qᵢ·kⱼ)
        let pq = q.pointer, pk = k.pointer, pv = v.pointer, po = out.mutablePointer, pl = lse.mutablePointer
        let nqb = (g.nq + qBlock - 1) / qBlock
        let d = g.d, hd = g.hd
        // Scores go straight into the log₂ domain: exp(scale·s) = 2^(scale·log₂e·s).
        let alpha = g.scale * ExpMath.log2e

        BLAS.withOneThread {
            runTiles(g.batch * heads * nqb) { next in
                let s = UnsafeMutablePointer<Float>.allocate(capacity: qBlock * kBlock)   // scores, then P
                let o = UnsafeMutablePointer<Float>.allocate(capacity: qBlock * d)        // unnormalised output
                let m = UnsafeMutablePointer<Float>.allocate(capacity: qBlock)            // running max (log₂)
                let l = UnsafeMutablePointer<Float>.allocate(capacity: qBlock)            // running Σ 2^(s − m)
                defer { s.deallocate(); o.deallocate(); m.deallocate(); l.deallocate() }
                while let t = next() {
                    let bh = t / nqb, b = bh / heads, h = bh % heads
                    let i0 = (t % nqb) * qBlock, rows = min(qBlock, g.nq - i0)
                    let qi = pq + g.qOffset(b, h, i0)
                    o.initialize(repeating: 0, count: rows * d)
                    m.initialize(repeating: -.infinity, count: rows)
                    l.initialize(repeating: 0, count: rows)
                    let kEnd = g.causal ? min(g.nk, i0 + rows) : g.nk
                    var j0 = 0
                    while j0 < kEnd {
                        let cols = min(kBlock, kEnd - j0)
                        BLAS.sgemm(transA: false, transB: true, m: rows, n: cols, k: d, alpha: alpha,
                                   a: qi, lda: hd, b: pk + g.kOffset(b, h, j0), ldb: hd, beta: 0, c: s, ldc: kBlock)
                        for r in 0..<rows {
                            let row = s + r * kBlock
                            let valid = g.validKeys(row: i0 + r, j0: j0, cols: cols)
                            if valid <= 0 { row.update(repeating: 0, count: cols); continue }
                            let mNew = max(m[r], ExpMath.rowMax(row, valid))
                            let sum = ExpMath.exp2Row(row, row, valid, shift: -mNew)
                            if valid < cols { (row + valid).update(repeating: 0, count: cols - valid) }
                            let corr = exp2f(m[r] - mNew)   // 0 on the first block (m = −∞)
                            l[r] = l[r] * corr + sum
                            if corr != 1 { ExpMath.scaleRow(o + r * d, d, corr) }
                            m[r] = mNew
                        }
                        BLAS.sgemm(transA: false, transB: false, m: rows, n: d, k: cols,
                                   a: s, lda: kBlock, b: pv + g.kOffset(b, h, j0), ldb: hd, beta: 1, c: o, ldc: d)
                        j0 += kBlock
                    }
                    let dst = po + g.qOffset(b, h, i0), lrow = pl + bh * g.nq + i0
                    for r in 0..<rows {
                        let inv = 1 / l[r]
                        for c in 0..<d { dst[r * hd + c] = o[r * d + c] * inv }
                        lrow[r] = (m[r] + log2f(l[r])) * ExpMath.ln2
                    }
                }
            }
        }
        return (out, lse)
    }

    /// Gradients of `forward` (FlashAttention-2 backward): each tile's P is recomputed from q, k and the
    /// saved log-sum-exp; with Dᵢ = rowsum(dO ∘ O): dV += Pᵀ·dO, dP = dO·Vᵀ, dS = P ∘ (dP − Dᵢ),
    /// dQ += scale·dS·K, dK += scale·dSᵀ·Q. Only the requested gradients are computed.
    public static func backward(dOut: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, logsumexp: Tensor,
                                heads: Int, causal: Bool = false, scale: Float? = nil,
                                wantQ: Bool, wantK: Bool, wantV: Bool, _ family: KernelFamily = Kernels.family)
        -> (dQ: Tensor?, dK: Tensor?, dV: Tensor?) {
        let g = Geometry(q: q, k: k, v: v, heads: heads, causal: causal, scale: scale)
        precondition(dOut.shape == q.shape && out.shape == q.shape,
                     "attention backward: dOut \(dOut.shape) and out \(out.shape) must match q \(q.shape)")
        precondition(logsumexp.shape == [g.batch, heads, g.nq],
                     "attention backward: logsumexp \(logsumexp.shape) must be [\(g.batch), \(heads), \(g.nq)]")
        guard wantQ || wantK || wantV else { return (nil, nil, nil) }
        if family == .bf16 {
            return backwardBF16(g, dOut: dOut, q: q, k: k, v: v, out: out, logsumexp: logsumexp, wantQ: wantQ,
                                wantK: wantK, wantV: wantV)
        }
        let q = q.fp32(), k = k.fp32(), v = v.fp32(), dOut = dOut.fp32(), out = out.fp32(), lse = logsumexp.fp32()
        let d = g.d, hd = g.hd, nq = g.nq

        // Dᵢ = Σ_c dO[i, c]·O[i, c] per head: [B, H, Nq]
        let delta = Tensor(uninitialized: [g.batch, heads, nq])
        let pdo = dOut.pointer, pout = out.pointer, pdelta = delta.mutablePointer
        parallelFor(g.batch * nq, grain: max(1, 4096 / hd)) { rows in
            for bi in rows {
                let b = bi / nq, i = bi % nq
                for h in 0..<heads {
                    pdelta[(b * heads + h) * nq + i] = ExpMath.dot(pdo + bi * hd + h * d, pout + bi * hd + h * d, d)
                }
            }
        }

        let ctx = BackwardContext(g: g, q: q.pointer, k: k.pointer, v: v.pointer, dO: pdo,
                                  lse: lse.pointer, delta: delta.pointer)
        if !(wantK || wantV) || g.nk < g.nq {
            // Query-block tasks: each owns its rows of dQ, so dQ accumulates in place. dK and dV rows are
            // shared between query blocks, so each worker accumulates them in its own [B, Nk, H·D]
            // buffers: the small side when keys are fewer than queries (cross-attention to 77 tokens).
            let dQ = wantQ ? Tensor(zeros: q.shape) : nil
            let dK = wantK ? PerWorker(Tensor(zeros: k.shape)) : nil
            let dV = wantV ? PerWorker(Tensor(zeros: v.shape)) : nil
            let dq = dQ?.mutablePointer
            let nqb = (nq + qBlock - 1) / qBlock
            BLAS.withOneThread {
                runTiles(g.batch * heads * nqb) { next in
                    let dk = dK?.claim(), dv = dV?.claim()
                    let work = TileBuffers(d: d)
                    defer { work.free() }
                    while let t = next() {
                        let bh = t / nqb, b = bh / heads, h = bh % heads
                        let i0 = (t % nqb) * qBlock, rows = min(qBlock, nq - i0)
                        let kEnd = g.causal ? min(g.nk, i0 + rows) : g.nk
                        var j0 = 0
                        while j0 < kEnd {
                            let kOff = g.kOffset(b, h, j0)
                            ctx.tile(b: b, h: h, i0: i0, rows: rows, j0: j0, cols: min(kBlock, kEnd - j0), work: work,
                                     dK: dk.map { $0 + kOff }, dV: dv.map { $0 + kOff }, ldKV: hd,
                                     dQ: dq.map { $0 + g.qOffset(b, h, i0) })
                            j0 += kBlock
                        }
                    }
                }
            }
            return (dQ, dK?.sum(), dV?.sum())
        }

        // Key-block tasks: each owns its rows of dK and dV (accumulated in the tile buffers). dQ rows are
        // shared between key blocks, so each worker accumulates dQ in its own [B, Nq, H·D] buffer.
        let dQ = wantQ ? PerWorker(Tensor(zeros: q.shape)) : nil
        let dK = wantK ? Tensor(uninitialized: k.shape) : nil
        let dV = wantV ? Tensor(uninitialized: v.shape) : nil
        let nkb = (g.nk + kBlock - 1) / kBlock
        let pdk = dK?.mutablePointer, pdv = dV?.mutablePointer
        BLAS.withOneThread {
            runTiles(g.batch * heads * nkb) { next in
                let dq = dQ?.claim()
                let work = TileBuffers(d: d)
                defer { work.free() }
                while let t = next() {
                    let bh = t / nkb, b = bh / heads, h = bh % heads
                    let j0 = (t % nkb) * kBlock, cols = min(kBlock, g.nk - j0)
                    work.dK.initialize(repeating: 0, count: cols * d)
                    work.dV.initialize(repeating: 0, count: cols * d)
                    // causal: queries before j0 see none of these keys
                    var i0 = g.causal ? (j0 / qBlock) * qBlock : 0
                    while i0 < nq {
                        let rows = min(qBlock, nq - i0)
                        ctx.tile(b: b, h: h, i0: i0, rows: rows, j0: j0, cols: cols, work: work,
                                 dK: wantK ? work.dK : nil, dV: wantV ? work.dV : nil, ldKV: d,
                                 dQ: dq.map { $0 + g.qOffset(b, h, i0) })
                        i0 += qBlock
                    }
                    for r in 0..<cols {
                        let off = g.kOffset(b, h, j0 + r)
                        if let pdk = pdk { (pdk + off).update(from: work.dK + r * d, count: d) }
                        if let pdv = pdv { (pdv + off).update(from: work.dV + r * d, count: d) }
                    }
                }
            }
        }
        return (dQ?.sum(), dK, dV)
    }

    /// Runs `worker` once on each of the engine's threads (at most n); workers take tasks 0..<n from
    /// `next()` one at a time until it returns nil. Handing tiles out dynamically keeps both cores busy
    /// when tiles differ in cost (causal masks) or a core is taken by something else.
    static func runTiles(_ n: Int, _ worker: (_ next: () -> Int?) -> Void) {
        let lock = NSLock()
        var taken = 0
        let next: () -> Int? = {
            lock.lock(); defer { lock.unlock() }
            guard taken < n else { return nil }
            taken += 1
            return taken - 1
        }
        parallelFor(min(n, Threads.count)) { _ in worker(next) }
    }

    /// A gradient that several workers accumulate into: the first worker to claim it writes into the
    /// result itself, each later one into a zeroed copy that `sum` adds in at the end.
    final class PerWorker {
        let result: Tensor
        private var copies: [Tensor] = []
        private var claimed = false
        private let lock = NSLock()

        init(_ zeros: Tensor) { result = zeros }

        func claim() -> UnsafeMutablePointer<Float> {
            lock.lock(); defer { lock.unlock() }
            if !claimed { claimed = true; return result.mutablePointer }
            let own = Tensor(zeros: result.shape)
            copies.append(own)
            return own.mutablePointer
        }

        func sum() -> Tensor {
            if copies.isEmpty { return result }
            let dst = result.mutablePointer, parts = copies.map { $0.pointer }
            parallelFor(result.count, grain: 1 << 15) { r in
                for p in parts { for i in r { dst[i] += p[i] } }
            }
            copies = []
            return result
        }
    }

    /// Sizes and index arithmetic of one attention call.
    struct Geometry {
        let batch, nq, nk, heads, d, hd: Int
        let scale: Float
        let causal: Bool

        init(q: Tensor, k: Tensor, v: Tensor, heads: Int, causal: Bool, scale: Float?) {
            precondition(q.rank == 3 && k.rank == 3 && v.rank == 3,
                         "attention takes [B, N, H·D] tensors, got q \(q.shape), k \(k.shape), v \(v.shape)")
            precondition(k.shape == v.shape && k.shape[0] == q.shape[0] && k.shape[2] == q.shape[2],
                         "attention: q \(q.shape), k \(k.shape), v \(v.shape) do not match")
            precondition(heads > 0 && q.shape[2] % heads == 0, "attention: \(q.shape[2]) channels do not split into \(heads) heads")
            precondition(k.shape[1] > 0, "attention needs at least one key")
            precondition(!causal || q.shape[1] == k.shape[1], "causal attention needs Nq == Nk, got \(q.shape[1]) and \(k.shape[1])")
            batch = q.shape[0]; nq = q.shape[1]; nk = k.shape[1]; hd = q.shape[2]
            self.heads = heads; d = hd / heads
            self.scale = scale ?? 1 / Float(d).squareRoot()
            self.causal = causal
        }

        /// Element offset of q row `row`, head h, in batch b ([B, Nq, H·D]).
        @inline(__always) func qOffset(_ b: Int, _ h: Int, _ row: Int) -> Int { (b * nq + row) * hd + h * d }
        @inline(__always) func kOffset(_ b: Int, _ h: Int, _ row: Int) -> Int { (b * nk + row) * hd + h * d }

        /// How many of the keys j0..<j0+cols query `row` may see (≤ 0: none).
        @inline(__always) func validKeys(row: Int, j0: Int, cols: Int) -> Int {
            causal ? min(cols, row + 1 - j0) : cols
        }
    }

    /// One thread's work memory for backward: P and dP/dS tiles, and the dK, dV accumulators of a key block.
    struct TileBuffers {
        let p, ds, dK, dV: UnsafeMutablePointer<Float>
        init(d: Int) {
            p = .allocate(capacity: qBlock * kBlock)
            ds = .allocate(capacity: qBlock * kBlock)
            dK = .allocate(capacity: kBlock * d)
            dV = .allocate(capacity: kBlock * d)
        }
        func free() { p.deallocate(); ds.deallocate(); dK.deallocate(); dV.deallocate() }
    }

    struct BackwardContext {
        let g: Geometry
        let q, k, v, dO, lse, delta: UnsafePointer<Float>

        /// The backward contributions of queries i0..<i0+rows × keys j0..<j0+cols of head h:
        /// dK, dV ([cols, D] with row stride ldKV) and dQ (rows of [.., H·D]) are accumulated where given.
        @inline(__always)
        func tile(b: Int, h: Int, i0: Int, rows: Int, j0: Int, cols: Int, work: TileBuffers,
                  dK: UnsafeMutablePointer<Float>?, dV: UnsafeMutablePointer<Float>?, ldKV: Int,
                  dQ: UnsafeMutablePointer<Float>?) {
            let d = g.d, hd = g.hd, kb = kBlock
            let qi = q + g.qOffset(b, h, i0), doi = dO + g.qOffset(b, h, i0)
            let kj = k + g.kOffset(b, h, j0), vj = v + g.kOffset(b, h, j0)
            let lrow = lse + (b * g.heads + h) * g.nq + i0, drow = delta + (b * g.heads + h) * g.nq + i0
            let p = work.p, ds = work.ds
            // P = exp(scale·QKᵀ − lse), in the log₂ domain
            BLAS.sgemm(transA: false, transB: true, m: rows, n: cols, k: d, alpha: g.scale * ExpMath.log2e,
                       a: qi, lda: hd, b: kj, ldb: hd, beta: 0, c: p, ldc: kb)
            for r in 0..<rows {
                let row = p + r * kb
                let valid = g.validKeys(row: i0 + r, j0: j0, cols: cols)
                if valid <= 0 { row.update(repeating: 0, count: cols); continue }
                _ = ExpMath.exp2Row(row, row, valid, shift: -lrow[r] * ExpMath.log2e)
                if valid < cols { (row + valid).update(repeating: 0, count: cols - valid) }
            }
            if let dV = dV {
                BLAS.sgemm(transA: true, transB: false, m: cols, n: d, k: rows,
                           a: p, lda: kb, b: doi, ldb: hd, beta: 1, c: dV, ldc: ldKV)
            }
            guard dK != nil || dQ != nil else { return }
            // dP = dO·Vᵀ, then dS = P ∘ (dP − D) in place
            BLAS.sgemm(transA: false, transB: true, m: rows, n: cols, k: d,
                       a: doi, lda: hd, b: vj, ldb: hd, beta: 0, c: ds, ldc: kb)
            for r in 0..<rows { ExpMath.softmaxGradRow(p + r * kb, ds + r * kb, cols, drow[r]) }
            if let dK = dK {
                BLAS.sgemm(transA: true, transB: false, m: cols, n: d, k: rows, alpha: g.scale,
                           a: ds, lda: kb, b: qi, ldb: hd, beta: 1, c: dK, ldc: ldKV)
            }
            if let dQ = dQ {
                BLAS.sgemm(transA: false, transB: false, m: rows, n: d, k: cols, alpha: g.scale,
                           a: ds, lda: kb, b: kj, ldb: hd, beta: 1, c: dQ, ldc: hd)
            }
        }
    }
}

extension Tape {
    /// Multi-head scaled dot-product attention (see `Attention.forward`). Saves q, k, v, the output and
    /// the [B, H, Nq] log-sum-exp: O(N), never the attention matrix.
    /// On the bf16 family q, k and v are kept (and multiplied) as their bf16 roundings, as autocast keeps them.
    public func attention(_ q: Var, _ k: Var, _ v: Var, heads: Int, causal: Bool = false, scale: Float? = nil) -> Var {
        let f = Kernels.family
        let qv = Kernels.operand(q.value, f), kv = Kernels.operand(k.value, f), vv = Kernels.operand(v.value, f)
        let (out, lse) = Attention.forward(q: qv, k: kv, v: vv, heads: heads, causal: causal, scale: scale, f)
        return record(out, inputs: [q, k, v]) { g, need in
            // the family of the forward, as Tape.linear does: the saved operands are in its form
            let r = Attention.backward(dOut: g, q: qv, k: kv, v: vv, out: out, logsumexp: lse, heads: heads,
                                       causal: causal, scale: scale, wantQ: need[0], wantK: need[1], wantV: need[2], f)
            return [r.dQ, r.dK, r.dV]
        }
    }
}
