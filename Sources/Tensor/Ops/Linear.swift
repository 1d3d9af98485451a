/// Linear layers and matrix products: GEMMs on the kernel family's library (OpenBLAS sgemm for fp32, oneDNN for
/// bf16 — see Kernels). Each kernel reads `Kernels.family` once; the tape rules below save what the backward needs
/// in the form that family's GEMMs read (fp32, or bf16 rounded once in forward).

public enum Linear {
    /// y[M,N] = x[M,K] · wᵀ[K,N] (+ b[N]), where x is [..., K] and w is [N, K] (PyTorch's layout).
    /// w may be fp16/bf16: the fp32 family widens it for this call only; the bf16 family reads bf16 in place.
    public static func forward(_ x: Tensor, _ w: Tensor, _ b: Tensor?) -> Tensor {
        let f = Kernels.family
        return forward(Kernels.operand(x, f), w, b, f)
    }

    /// `forward` on an input already in `f`'s operand form.
    static func forward(_ x: Tensor, _ w: Tensor, _ b: Tensor?, _ f: KernelFamily) -> Tensor {
        let k = x.shape.last!, n = w.shape[0]
        precondition(w.rank == 2 && w.shape[1] == k, "linear: input \(x.shape) does not match weight \(w.shape)")
        let m = x.count / max(k, 1)
        let w = Kernels.operand(w, f)
        let y = Tensor(uninitialized: Array(x.shape.dropLast()) + [n])
        let py = y.mutablePointer
        if f == .bf16 {
            // The bias rides in the GEMM (oneDNN's fused bias): y is written once.
            if let b { precondition(b.shape == [n], "linear: bias \(b.shape) does not match weight \(w.shape)") }
            DNNL.gemm(transA: false, transB: true, m: m, n: n, k: k, a: x, lda: k, b: w, ldb: k, beta: 0, c: py, ldc: n, bias: b)
            return y
        }
        if let b = b?.fp32() {
            precondition(b.shape == [n], "linear: bias \(b.shape) does not match weight \(w.shape)")
            let pb = b.pointer
            parallelFor(m, grain: max(1, 65536 / n)) { r in for i in r { (py + i * n).update(from: pb, count: n) } }
        }
        Kernels.gemm(f, transA: false, transB: true, m: m, n: n, k: k, a: x, lda: k, b: w, ldb: k,
                     beta: b == nil ? 0 : 1, c: py, ldc: n)
        return y
    }

    /// Gradients of `forward`. Only the requested ones are computed: a frozen weight costs one GEMM
    /// (dX = dY · W), not two.
    public static func backward(_ dY: Tensor, x: Tensor, w: Tensor, wantX: Bool, wantW: Bool, wantB: Bool)
        -> (dX: Tensor?, dW: Tensor?, dB: Tensor?) {
        let f = Kernels.family
        return backward(Kernels.operand(dY, f), x: x, w: w, wantX: wantX, wantW: wantW, wantB: wantB, f)
    }

    /// `backward` with dY in `f`'s operand form (the bias gradient sums it as it is: fp32, or bf16 widened).
    static func backward(_ dY: Tensor, x: Tensor, w: Tensor, wantX: Bool, wantW: Bool, wantB: Bool, _ f: KernelFamily)
        -> (dX: Tensor?, dW: Tensor?, dB: Tensor?) {
        let k = x.shape.last!, n = w.shape[0], m = x.count / max(k, 1)
        var dX: Tensor?, dW: Tensor?, dB: Tensor?
        if wantX {
            let wo = Kernels.operand(w, f)
            let g = Tensor(uninitialized: x.shape)
            Kernels.gemm(f, transA: false, transB: false, m: m, n: k, k: n, a: dY, lda: n, b: wo, ldb: k,
                         beta: 0, c: g.mutablePointer, ldc: k)
            dX = g
        }
        if wantW {
            let xo = Kernels.operand(x, f)
            let g = Tensor(uninitialized: w.shape)
            Kernels.gemm(f, transA: true, transB: false, m: n, n: k, k: m, a: dY, lda: n, b: xo, ldb: k,
                         beta: 0, c: g.mutablePointer, ldc: k)
            dW = g
        }
        if wantB { dB = Reduce.sumRows(dY.fp32(), columns: n) }
        return (dX, dW, dB)
    }

    /// y = x·Wᵀ + b + scale·(x·downᵀ)·upᵀ: a linear layer with a low-rank (LoRA) update, without materialising the
    /// update or the scaled branch: the up-projection accumulates into y (GEMM β = 1). x [..., K], W [N, K],
    /// down [r, K], up [N, r] → (y [..., N], lx = x·downᵀ [M, r] in the family's operand form, which backward needs).
    public static func lowRankForward(_ x: Tensor, _ w: Tensor, _ b: Tensor?, down: Tensor, up: Tensor, scale: Float)
        -> (y: Tensor, lx: Tensor) {
        let f = Kernels.family
        return lowRankForward(Kernels.operand(x, f), w, b, down: down, up: up, scale: scale, f)
    }

    static func lowRankForward(_ x: Tensor, _ w: Tensor, _ b: Tensor?, down: Tensor, up: Tensor, scale: Float,
                               _ f: KernelFamily) -> (y: Tensor, lx: Tensor) {
        let k = x.shape.last!, n = w.shape[0], r = down.shape[0], m = x.count / max(k, 1)
        precondition(down.rank == 2 && down.shape[1] == k && up.rank == 2 && up.shape == [n, r],
                     "low-rank linear: down \(down.shape) / up \(up.shape) do not fit weight \(w.shape)")
        let y = forward(x, w, b, f)
        let df = Kernels.operand(down, f), uf = Kernels.operand(up, f)
        let lx = Tensor(uninitialized: [m, r])
        Kernels.gemm(f, transA: false, transB: true, m: m, n: r, k: k, a: x, lda: k, b: df, ldb: k,
                     beta: 0, c: lx.mutablePointer, ldc: r)
        // bf16: the up-projection reads lx rounded, as autocast's second nn.Linear does.
        let lxo = Kernels.operand(lx, f)
        Kernels.gemm(f, transA: false, transB: true, m: m, n: n, k: r, alpha: scale, a: lxo, lda: r, b: uf,
                     ldb: r, beta: 1, c: y.mutablePointer, ldc: n)
        return (y, lxo)
    }

    /// Gradients of `lowRankForward` (only those asked for). dlx = scale·dY·up; d_up = scale·dYᵀ·lx;
    /// d_down = dlxᵀ·x; dX = dY·W + dlx·down (the second product accumulates into the first).
    public static func lowRankBackward(_ dY: Tensor, x: Tensor, w: Tensor, down: Tensor, up: Tensor, lx: Tensor, scale: Float,
                                       wantX: Bool, wantW: Bool, wantB: Bool, wantDown: Bool, wantUp: Bool)
        -> (dX: Tensor?, dW: Tensor?, dB: Tensor?, dDown: Tensor?, dUp: Tensor?) {
        lowRankBackward(dY, x: x, w: w, down: down, up: up, lx: lx, scale: scale, wantX: wantX, wantW: wantW,
                        wantB: wantB, wantDown: wantDown, wantUp: wantUp, Kernels.family)
    }

    static func lowRankBackward(_ dY: Tensor, x: Tensor, w: Tensor, down: Tensor, up: Tensor, lx: Tensor, scale: Float,
                                wantX: Bool, wantW: Bool, wantB: Bool, wantDown: Bool, wantUp: Bool, _ f: KernelFamily)
        -> (dX: Tensor?, dW: Tensor?, dB: Tensor?, dDown: Tensor?, dUp: Tensor?) {
        let k = x.shape.last!, n = w.shape[0], r = down.shape[0], m = x.count / max(k, 1)
        let dY = Kernels.operand(dY, f)
        let base = backward(dY, x: x, w: w, wantX: wantX, wantW: wantW, wantB: wantB, f)
        var dDown: Tensor?, dUp: Tensor?
        if wantUp {
            let g = Tensor(uninitialized: [n, r])
            Kernels.gemm(f, transA: true, transB: false, m: n, n: r, k: m, alpha: scale, a: dY, lda: n,
                         b: Kernels.operand(lx, f), ldb: r, beta: 0, c: g.mutablePointer, ldc: r)
            dUp = g
        }
        if wantDown || wantX {
            let uf = Kernels.operand(up, f)
            let dlx = Tensor(uninitialized: [m, r])
            Kernels.gemm(f, transA: false, transB: false, m: m, n: r, k: n, alpha: scale, a: dY, lda: n, b: uf,
                         ldb: r, beta: 0, c: dlx.mutablePointer, ldc: r)
            let dlxo = Kernels.operand(dlx, f)
            if wantDown {
                let g = Tensor(uninitialized: [r, k])
                Kernels.gemm(f, transA: true, transB: false, m: r, n: k, k: m, a: dlxo, lda: r, b: Kernels.operand(x, f),
                             ldb: k, beta: 0, c: g.mutablePointer, ldc: k)
                dDown = g
            }
            if wantX, let dX = base.dX {
                Kernels.gemm(f, transA: false, transB: false, m: m, n: k, k: r, a: dlxo, lda: r,
                             b: Kernels.operand(down, f), ldb: k, beta: 1, c: dX.mutablePointer, ldc: k)
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
        let f = Kernels.family
        let a = Kernels.operand(a, f), b = Kernels.operand(b, f)
        let c = Tensor(uninitialized: [m, n])
        Kernels.gemm(f, transA: transA, transB: transB, m: m, n: n, k: k, a: a, lda: a.shape[1],
                     b: b, ldb: b.shape[1], beta: 0, c: c.mutablePointer, ldc: n)
        return c
    }
}

extension Tape {
    /// y = x · wᵀ + b (PyTorch's nn.Linear). Saves x (bf16 family: rounded to bf16, as autocast saves it) and w;
    /// a frozen w gets no gradient.
    public func linear(_ x: Var, _ w: Var, _ b: Var? = nil) -> Var {
        let f = Kernels.family
        let xo = Kernels.operand(x.value, f), wv = w.value
        let inputs = b.map { [x, w, $0] } ?? [x, w]
        return record(Linear.forward(xo, wv, b?.value, f), inputs: inputs) { g, need in
            let r = Linear.backward(Kernels.operand(g, f), x: xo, w: wv, wantX: need[0], wantW: need[1],
                                    wantB: need.count > 2 && need[2], f)
            return [r.dX, r.dW, r.dB]
        }
    }

    /// y = x·wᵀ + b + scale·(x·downᵀ)·upᵀ (a LoRA on nn.Linear), fused: saves x (in the family's operand form), w,
    /// down, up and the [M, r] product.
    public func lowRankLinear(_ x: Var, _ w: Var, _ b: Var?, down: Var, up: Var, scale: Float) -> Var {
        let f = Kernels.family
        let xo = Kernels.operand(x.value, f), wv = w.value, dv = down.value, uv = up.value
        let (y, lx) = Linear.lowRankForward(xo, wv, b?.value, down: dv, up: uv, scale: scale, f)
        let inputs = [x, w, down, up] + (b.map { [$0] } ?? [])
        return record(y, inputs: inputs) { g, need in
            let r = Linear.lowRankBackward(g, x: xo, w: wv, down: dv, up: uv, lx: lx, scale: scale, wantX: need[0],
                                           wantW: need[1], wantB: need.count > 4 && need[4], wantDown: need[2],
                                           wantUp: need[3], f)
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
