import CBLAS
import Foundation

/// OpenBLAS, loaded by the engine after it has chosen the kernel family.
///
/// Debian's OpenBLAS (0.3.21) runs its "Haswell" kernels on AVX-512 CPUs it does not know (Zen 4/5),
/// at about half the speed of its "SkylakeX" kernels. OpenBLAS reads OPENBLAS_CORETYPE once, when the
/// library loads; so the library is not linked but dlopen'ed on first use, after the engine has set the
/// variable. Machines often carry a stale OPENBLAS_CORETYPE in their global environment (this project's
/// own build machines export `Haswell`), so an inherited value is replaced, not trusted. The override is
/// lora-dist's own: LORA_DIST_BLAS_CORE=<OpenBLAS core name> (or `--blas-core`), or
/// LORA_DIST_BLAS_CORE=inherit to leave OPENBLAS_CORETYPE and OpenBLAS's own detection alone.
public enum BLAS {
    /// The environment variable that overrides the engine's choice.
    public static let overrideVariable = "LORA_DIST_BLAS_CORE"

    /// The kernel family lora-dist picks for this CPU, or nil to leave OpenBLAS's own choice.
    public static func chooseCore() -> String? {
        if lora_cpu_has_avx512_skx() != 0 { return "SkylakeX" }
        if lora_cpu_has_avx2_fma() != 0 { return "Haswell" }
        return nil
    }

    /// What the engine asks OpenBLAS for: the override if set, else `chooseCore()`; nil = don't touch
    /// OPENBLAS_CORETYPE.
    public static func requestedCore() -> String? {
        switch ProcessInfo.processInfo.environment[overrideVariable] {
        case nil, "", "auto": return chooseCore()
        case "inherit": return nil
        case let name?: return name
        }
    }

    /// OPENBLAS_CORETYPE as the process inherited it (before the engine replaced it).
    public static var inheritedCoreType: String? { loaded }

    /// Loads the library once; its value is the OPENBLAS_CORETYPE inherited before the load.
    private static let loaded: String? = {
        let inherited = ProcessInfo.processInfo.environment["OPENBLAS_CORETYPE"]
        var message = [CChar](repeating: 0, count: 512)
        let rc = message.withUnsafeMutableBufferPointer { buf in
            lora_blas_load(requestedCore(), buf.baseAddress, Int32(buf.count))
        }
        if rc != 0 {
            let text = message.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
            fatalError("""
                lora-dist could not load OpenBLAS (\(text)). Install it with `apt-get install \
                libopenblas-dev` (or run scripts/setup.sh).
                """)
        }
        lora_blas_set_threads(Int32(Threads.count))
        return inherited
    }()

    /// Loads OpenBLAS if it is not loaded yet.
    public static func load() { _ = loaded }

    /// The kernel family OpenBLAS runs ("SkylakeX", "Haswell", ...).
    public static var coreName: String {
        load()
        return String(cString: lora_blas_corename())
    }

    public static var threads: Int { load(); return Int(lora_blas_threads()) }

    static func setThreads(_ n: Int) { load(); lora_blas_set_threads(Int32(n)) }

    /// Runs `body` with OpenBLAS on one thread, so that `body` may call sgemm from inside `parallelFor`
    /// (many small independent products, e.g. attention tiles) without the two thread pools competing.
    static func withOneThread(_ body: () -> Void) {
        let n = Threads.count
        load()
        if n > 1 { setThreads(1) }
        body()
        if n > 1 { setThreads(n) }
    }

    /// Row-major C[M,N] = alpha · op(A)[M,K] · op(B)[K,N] + beta · C.
    @inline(__always)
    static func sgemm(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float = 1,
        a: UnsafePointer<Float>, lda: Int, b: UnsafePointer<Float>, ldb: Int,
        beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        load()
        if m == 0 || n == 0 { return }
        lora_sgemm(transA ? 1 : 0, transB ? 1 : 0, Int32(m), Int32(n), Int32(k), alpha,
                   a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
    }
}
