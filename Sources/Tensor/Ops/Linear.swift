/// Linear layers and matrix products on OpenBLAS's sgemm.

public enum Linear {
    /// y[M,N] = x[M,K] · wᵀ[K,N] (+ b[N]), where x is [..., K] and w is [N, K] (PyTorch's layout).
    /// w may be fp16/bf16: it is widened for this call only.
    public static func forward(_ x: Tensor, _ w: Tensor, _ b: Tensor?) -> Tensor {
        let k = x.shape.last!, n = w.shape[0]
        precondition(w.rank == 2 && w.shape[1] == k, "linear: input \(x.shape) does not match weight \(w.shape)")
        let m = x.count / max(k, 1)
        let x = x.fp32(), w = w.fp32()
        let y = Tensor(uninitialized: Array(x.shape.dropLast()) + [n])
        let py = y.mutablePointer
        if let b = b?.fp32() {
            precondition(b.shape == [n], "linear: bias \(b.shape) does not match weight \(w.shape)")
            let pb = b.pointer
            parallelFor(m, grain: max(1, 65536 / n)) { r in for i in r { (py + i * n).update(from: pb, count: n) } }
        }
        BLAS.sgemm(transA: false, transB: true, m: m, n: n, k: k, a: x.pointer, lda: k, b: w.pointer, ldb: k,
                   beta: b == nil ? 0 : 1, c: py, ldc: n)
        return y
    }

    /// Gradients of `forward`. Only the requested ones are computed: a frozen weight costs one GEMM
    /// (dX = dY · W), not two.
    public static func backward(_ dY: Tensor, x: Tensor, w: Tensor, wantX: Bool, wantW: Bool, wantB: Bool)
        -> (dX: Tensor?, dW: Tensor?, dB: Tensor?) {
        let k = x.shape.last!, n = w.shape[0], m = x.count / max(k, 1)
        let dY = dY.fp32()
        var dX: Tensor?, dW: Tensor?, dB: Tensor?
        if wantX {
            let wf = w.fp32()
            let g = Tensor(uninitialized: x.shape)
            BLAS.sgemm(transA: false, transB: false, m: m, n: k, k: n, a: dY.pointer, lda: n, b: wf.pointer, ldb: k,
                       beta: 0, c: g.mutablePointer, ldc: k)
            dX = g
        }
        if wantW {
            let xf = x.fp32()
            let g = Tensor(uninitialized: w.shape)
            BLAS.sgemm(transA: true, transB: false, m: n, n: k, k: m, a: dY.pointer, lda: n, b: xf.pointer, ldb: k,
                       beta: 0, c: g.mutablePointer, ldc: k)
            dW = g
        }
        if wantB { dB = Reduce.sumRows(dY, columns: n) }
        return (dX, dW, dB)
    }

    /// y = x·Wᵀ + b + scale·(x·downᵀ)·upᵀ: a linear layer with a low-rank (LoRA) update, without materialising the
    /// update or the scaled branch: the up-projection accumulates into y (sgemm β = 1). x [..., K], W [N, K],
    /// down [r, K], up [N, r] → (y [..., N], lx = x·downᵀ [M, r], which backward needs).
    public static func lowRankForward(_ x: Tensor, _ w: Tensor, _ b: Tensor?, down: Tensor, up: Tensor, scale: Float)
        -> (y: Tensor, lx: Tensor) {
        let k = x.shape.last!, n = w.shape[0], r = down.shape[0], m = x.count / max(k, 1)
        precondition(down.rank == 2 && down.shape[1] == k && up.rank == 2 && up.shape == [n, r],
                     "low-rank linear: down \(down.shape) / up \(up.shape) do not fit weight \(w.shape)")
        let y = forward(x, w, b)
        let xf = x.fp32(), df = down.fp32(), uf = up.fp32()
        let lx = Tensor(uninitialized: [m, r])
        BLAS.sgemm(transA: false, transB: true, m: m, n: r, k: k, a: xf.pointer, lda: k, b: df.pointer, ldb: k,
                   beta: 0, c: lx.mutablePointer, ldc: r)
        BLAS.sgemm(transA: false, transB: true, m: m, n: n, k: r, alpha: scale, a: lx.pointer, lda: r, b: uf.pointer,
                   ldb: r, beta: 1, c: y.mutablePointer, ldc: n)
        return (y, lx)
    }

    /// Gradients of `lowRankForward` (only those asked for). dlx = scale·dY·up; d_up = scale·dYᵀ·lx;
    /// d_down = dlxᵀ·x; dX = dY·W + dlx·down (the second product accumulates into the first).
    public static func lowRankBackward(_ dY: Tensor, x: Tensor, w: Tensor, down: Tensor, up: Tensor, lx: Tensor, scale: Float,
                                       wantX: Bool, wantW: Bool, wantB: Bool, wantDown: Bool, wantUp: Bool)
        -> (dX: Tensor?, dW: Tensor?, dB: Tensor?, dDown: Tensor?, dUp: Tensor?) {
        let k = x.shape.last!, n = w.shape[0], r = down.shape[0], m = x.count / max(k, 1)
        let dY = dY.fp32()
        let base = backward(dY, x: x, w: w, wantX: wantX, wantW: wantW, wantB: wantB)
        var dDown: Tensor?, dUp: Tensor?
        if wantUp {
            let g = Tensor(uninitialized: [n, r])
            BLAS.sgemm(transA: true, transB: false, m: n, n: r, k: m, alpha: scale, a: dY.pointer, lda: n, b: lx.pointer,
                       ldb: r, beta: 0, c: g.mutablePointer, ldc: r)
            dUp = g
        }
        if wantDown || wantX {
            let uf = up.fp32()
            let dlx = Tensor(uninitialized: [m, r])
            BLAS.sgemm(transA: false, transB: false, m: m, n: r, k: n, alpha: scale, a: dY.pointer, lda: n, b: uf.pointer,
                       ldb: r, beta: 0, c: dlx.mutablePointer, ldc: r)
            if wantDown {
                let xf = x.fp32()
                let g = Tensor(uninitialized: [r, k])
                BLAS.sgemm(transA: true, transB: false, m: r, n: k, k: m, a: dlx.pointer, lda: r, b: xf.pointer, ldb: k,
                           beta: 0, c: g.mutablePointer, ldc: k)
                dDown = g
            }
            if wantX, let dX = base.dX {
                let df = down.fp32()
                BLAS.sgemm(transA: false, transB: false, m: m, n: k, k: r, a: dlx.pointer, lda: r, b: df.pointer, ldb: k,
                           beta: 1, c: dX.mutablePointer, ldc: k)
            }
        }
        return (base.dX, base.dW, base.dB, dDown, dUp)
    }

    /// C = op(A) · op(B) for 2-D A and B, with op = transpose where asked.
    public static func matmul(_ a: Tensor, _ b: Tensor, transA: Bool = false, transB: Bool = false) -> Tensor {
        precondition(a.rank == 2 && b.rank == 2, "matmul takes 2-D tensors, got \(a.shape) and \(b.shape)")
        let m = transA ? a.shape[1] : a.shape[0], k = transA ? a.shape[0] : a.shape[1]
        let kb = transB ? b.shape[1] : b.shape[0], n = transB ? b.shape[0] : b.shape[1]
        precondition(k == kb, "matmul: inner dimensions differ (\(a.shape)\(transA ? "ᵀ" : "") · \(b.shape)\(transB ? "ᵀ" : ""))")
        let a = a.fp32(), b = b.fp32()
        let c = Tensor(uninitialized: [m, n])
        BLAS.sgemm(transA: transA, transB: transB, m: m, n: n, k: k, a: a.pointer, lda: a.shape[1],
                   b: b.pointer, ldb: b.shape[1], beta: 0, c: c.mutablePointer, ldc: n)
        return c
    }
}

extension Tape {
    /// y = x · wᵀ + b (PyTorch's nn.Linear). Saves x and w; a frozen w gets no gradient.
    public func linear(_ x: Var, _ w: Var, _ b: Var? = nil) -> Var {
        let xv = x.value, wv = w.value
        let inputs = b.map { [x, w, $0] } ?? [x, w]
        return record(Linear.forward(xv, wv, b?.value), inputs: inputs) { g, need in
            let r = Linear.backward(g, x: xv, w: wv, wantX: need[0], wantW: need[1], wantB: need.count > 2 && need[2])
            return [r.dX, r.dW, r.dB]
        }
    }

    /// y = x·wᵀ + b + scale·(x·downᵀ)·upᵀ (a LoRA on nn.Linear), fused: saves x, w, down, up and the [M, r] product.
    public func lowRankLinear(_ x: Var, _ w: Var, _ b: Var?, down: Var, up: Var, scale: Float) -> Var {
        let xv = x.value, wv = w.value, dv = down.value, uv = up.value
        let (y, lx) = Linear.lowRankForward(xv, wv, b?.value, down: dv, up: uv, scale: scale)
        let inputs = [x, w, down, up] + (b.map { [$0] } ?? [])
        return record(y, inputs: inputs) { g, need in
            let r = Linear.lowRankBackward(g, x: xv, w: wv, down: dv, up: uv, lx: lx, scale: scale, wantX: need[0],
                                           wantW: need[1], wantB: need.count > 4 && need[4], wantDown: need[2], wantUp: need[3])
            return [r.dX, r.dW, r.dDown, r.dUp] + (need.count > 4 ? [r.dB] : [])
        }
    }

    /// op(a) · op(b) for 2-D a, b.
    public func matmul(_ a: Var, _ b: Var, transA: Bool = false, transB: Bool = false) -> Var {
        let av = a.value, bv = b.value
        return record(Linear.matmul(av, bv, transA: transA, transB: transB), inputs: [a, b]) { g, need in
            // C = A·B: dA = dC·Bᵀ, dB = Aᵀ·dC; with transposes the operands swap roles.
            var dA: Tensor?, dB: Tensor?
            if need[0] {
                dA = transA ? Linear.matmul(bv, g, transA: transB, transB: true)
                            : Linear.matmul(g, bv, transA: false, transB: !transB)
            }
            if need[1] {
                dB = transB ? Linear.matmul(g, av, transA: true, transB: transA)
                            : Linear.matmul(av, g, transA: !transA, transB: false)
            }
            return [dA, dB]
        }
    }
}
