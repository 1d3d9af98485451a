import Foundation

/// The kernel families the ops run on, chosen here and nowhere else (ggml's type traits are the model).
///
/// - fp32: OpenBLAS sgemm and the engine's own loops, fp32 everywhere (lora-dist's reference path).
/// - bf16: what PyTorch's CPU autocast runs in bf16 — linear layers, convolutions, the attention products (QKᵀ, P·V
///   and their gradients), the LoRA products and their gradients — on oneDNN with bf16 inputs and fp32 accumulation
///   and outputs; everything else (norms and their statistics, softmax, activations, the loss, the timestep
///   embedding, LoRA weights, gradients and optimizer state) stays fp32. Activations stay fp32 between ops; a linear
///   layer saves its input for the weight gradient, and attention its q, k and v, in bf16 (what autocast saves).
///
/// An op reads `Kernels.family` once when it runs; its tape rule (what it saves, which gradients it makes) is the same
/// in both families.
public enum KernelFamily: String, Sendable, CaseIterable {
    case fp32, bf16
}

public enum Kernels {
    private static let lock = NSLock()
    nonisolated(unsafe) private static var current = KernelFamily.fp32

    /// The family ops run on now (fp32 unless a caller chose bf16).
    public static var family: KernelFamily {
        lock.lock(); defer { lock.unlock() }
        return current
    }

    /// Why `family` cannot be bf16 on this machine (nil: it can).
    public static var bf16UnavailableReason: String? { DNNL.unavailableReason }

    /// Switches the family for the whole process. bf16 where this machine cannot run it stays fp32: the returned
    /// line says so (nil when the request was met).
    @discardableResult
    public static func use(_ family: KernelFamily) -> String? {
        var chosen = family, message: String?
        if family == .bf16, let why = bf16UnavailableReason {
            chosen = .fp32
            message = "bf16 requested, computing in fp32: \(why)"
        }
        lock.lock(); current = chosen; lock.unlock()
        return message
    }

    /// Runs `body` on `family` (tests and benches), then restores the previous one. bf16 must be available.
    public static func with<R>(_ family: KernelFamily, _ body: () throws -> R) rethrows -> R {
        let previous = self.family
        if family == .bf16 { precondition(bf16UnavailableReason == nil, bf16UnavailableReason ?? "") }
        lock.lock(); current = family; lock.unlock()
        defer { lock.lock(); current = previous; lock.unlock() }
        return try body()
    }

    /// `t` as the family's GEMMs read it: fp32 (widened) or bf16 (rounded, in parallel). Ops convert an operand once
    /// and use it for every product it enters.
    static func operand(_ t: Tensor, _ family: KernelFamily) -> Tensor {
        family == .bf16 ? DNNL.bf16(t) : t.fp32()
    }

    /// Row-major C[M,N] = alpha · op(A) · op(B) + beta · C on `family`; A and B as `operand` returns them.
    @inline(__always)
    static func gemm(_ family: KernelFamily, transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float = 1,
                     a: Tensor, lda: Int, b: Tensor, ldb: Int, beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int) {
        switch family {
        case .fp32:
            BLAS.sgemm(transA: transA, transB: transB, m: m, n: n, k: k, alpha: alpha, a: a.pointer, lda: lda,
                       b: b.pointer, ldb: ldb, beta: beta, c: c, ldc: ldc)
        case .bf16:
            DNNL.gemm(transA: transA, transB: transB, m: m, n: n, k: k, alpha: alpha, a: a, lda: lda, b: b, ldb: ldb,
                      beta: beta, c: c, ldc: ldc)
        }
    }
}
