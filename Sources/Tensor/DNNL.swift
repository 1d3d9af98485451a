import CDNNL
import Foundation

/// oneDNN, the bf16 kernel family's GEMMs and convolutions (bf16 inputs, fp32 accumulation and outputs).
///
/// The library is loaded on first use (the shim sets OMP_WAIT_POLICY=PASSIVE before libgomp loads, so oneDNN's
/// OpenMP threads sleep between calls instead of spinning on the cores the engine's threads and OpenBLAS's need).
/// Calls are made from the engine's calling thread only, never from inside `parallelFor`.
public enum DNNL {
    /// Set once `loaded` has run: reading counters must not load the library into an fp32 run.
    nonisolated(unsafe) private static var attempted = false
    private static let loaded: String? = {
        attempted = true
        var message = [CChar](repeating: 0, count: 512)
        let rc = message.withUnsafeMutableBufferPointer { lora_dnnl_load($0.baseAddress, Int32($0.count)) }
        if rc != 0 { return message.withUnsafeBufferPointer { String(cString: $0.baseAddress!) } }
        lora_dnnl_set_threads(Int32(Threads.count))
        return nil
    }()

    /// Why oneDNN cannot run bf16 here (nil when it can): the library is missing, or the CPU lacks AVX512-BF16.
    public static var unavailableReason: String? {
        if let error = loaded {
            return "oneDNN could not be loaded (\(error)); install it with `apt-get install libdnnl-dev` (or run scripts/setup.sh)"
        }
        if lora_dnnl_has_bf16() == 0 {
            if let cap = ProcessInfo.processInfo.environment["DNNL_MAX_CPU_ISA"] {
                return "oneDNN is capped at \(isaName) by DNNL_MAX_CPU_ISA=\(cap), below AVX512-BF16; bf16 would be emulated, several times slower than fp32"
            }
            return "this CPU has no AVX512-BF16 (oneDNN's ISA here: \(isaName)); bf16 would be emulated, several times slower than fp32"
        }
        return nil
    }

    /// libdnnl's version ("2.6.3"), or "not loaded".
    public static var version: String { loaded == nil ? String(cString: lora_dnnl_version()) : "not loaded" }

    /// oneDNN's name for the ISA it dispatches to.
    public static var isaName: String {
        switch lora_dnnl_isa() {
        case 0: return "none"
        case let v where v & 0x3E7 == 0x3E7: return "avx512_core_amx"
        case let v where v & 0xE7 == 0xE7: return "avx512_core_bf16"
        case let v where v & 0x67 == 0x67: return "avx512_core_vnni"
        case let v where v & 0x27 == 0x27: return "avx512_core"
        case let v where v & 0x7 == 0x7: return "avx2"
        case let v: return String(format: "0x%x", v)
        }
    }

    static func setThreads(_ n: Int) { lora_dnnl_set_threads(Int32(n)) }

    /// Wall time inside oneDNN for one kind of call, with its multiply-adds ×2 (zero for the data movements).
    public struct Counter: Sendable {
        public let kind: String
        public let seconds: Double, flops: Double
        public let calls: Int
    }

    /// The counters since the last `takeCounters`, by kind (and zeroes them): where a bf16 step's oneDNN time goes,
    /// which a sampling profiler cannot say (oneDNN's JIT code has no unwind tables, so its samples lose their op).
    /// Empty when oneDNN has not been loaded (an fp32 run never loads it).
    public static func takeCounters() -> [Counter] {
        guard attempted, loaded == nil else { return [] }
        var raw = [lora_dnnl_counter](repeating: lora_dnnl_counter(), count: Int(LORA_DNNL_COUNTERS))
        raw.withUnsafeMutableBufferPointer { lora_dnnl_stats($0.baseAddress, 1) }
        let names = ["matmul", "fp32→bf16 operand rounding", "conv forward", "conv input gradient",
                     "conv layout reorders", "attention products"]
        return zip(names, raw).map { Counter(kind: $0, seconds: $1.seconds, flops: $1.flops, calls: $1.calls) }
    }

    private static func check(_ rc: Int32, _ what: @autoclosure () -> String) {
        if rc != 0 { fatalError("oneDNN failed (status \(rc)) in \(what())") }
    }

    /// A recent rounding of a large activation, kept while both tensors are alive elsewhere: the q, k and v
    /// projections (and the LoRA branch) of one input then share one bf16 copy, in time and in saved memory.
    /// Sound because tensors are values: nothing writes into a tensor once an op has returned it.
    private final class Rounded {
        weak var source: Storage?
        weak var result: Storage?
        let offset: Int, count: Int
        init(_ source: Storage, _ result: Storage, offset: Int, count: Int) {
            self.source = source; self.result = result; self.offset = offset; self.count = count
        }
    }
    nonisolated(unsafe) private static var recent: [Rounded] = []
    private static let recentLock = NSLock()

    /// `x` rounded to bf16 (round to nearest even), converted in parallel.
    static func bf16(_ x: Tensor) -> Tensor {
        if x.dtype == .bf16 { return x }
        let large = x.count >= 1 << 18
        if large {
            recentLock.lock()
            let hit = recent.first { $0.source === x.storage && $0.offset == x.byteOffset && $0.count == x.count }?.result
            recentLock.unlock()
            if let hit { return Tensor(shape: x.shape, dtype: .bf16, storage: hit, byteOffset: 0) }
        }
        let out = rounded(x)
        if large {
            recentLock.lock()
            recent.removeAll { $0.source == nil || $0.result == nil }
            recent.insert(Rounded(x.storage, out.storage, offset: x.byteOffset, count: x.count), at: 0)
            if recent.count > 8 { recent.removeLast() }
            recentLock.unlock()
        }
        return out
    }

    private static func rounded(_ x: Tensor) -> Tensor {
        let x = x.fp32()
        // Every element is written below: no zero fill first.
        let out = Tensor(shape: x.shape, dtype: .bf16, storage: Storage(uninitializedByteCount: x.count * 2), byteOffset: 0)
        let n = x.count, src = x.pointer
        let dst = out.storage.bytes.assumingMemoryBound(to: UInt16.self)
        parallelFor(n, grain: 1 << 16) { r in lora_dnnl_to_bf16(src + r.lowerBound, dst + r.lowerBound, r.count) }
        return out
    }

    /// Row-major C[M,N] (fp32) = alpha · op(A) · op(B) + beta · C in bf16 with fp32 accumulation. A and B are read
    /// as stored: bf16 in place, fp32 rounded to bf16 by the shim (one thread; large operands are converted with
    /// `bf16(_:)` by the callers first), fp16 rounded here.
    /// `bias` (fp32 [N], alpha 1 and beta 0 only) is added by the GEMM itself (oneDNN's fused bias).
    static func gemm(transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float = 1, a: Tensor, lda: Int,
                     b: Tensor, ldb: Int, beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int, bias: Tensor? = nil) {
        let a = a.dtype == .f16 ? bf16(a) : a, b = b.dtype == .f16 ? bf16(b) : b
        let bias = bias?.fp32()
        let rc = lora_dnnl_gemm(transA ? 1 : 0, transB ? 1 : 0, Int32(m), Int32(n), Int32(k), alpha,
                                a.rawPointer, a.dtype == .bf16 ? 1 : 0, Int32(lda), b.rawPointer, b.dtype == .bf16 ? 1 : 0,
                                Int32(ldb), beta, c, Int32(ldc), bias?.pointer, nil)
        check(rc, "gemm \(m)×\(n)×\(k)")
        withExtendedLifetime(bias) {}
    }

    /// `batch` products C_p = alpha · op(A_p) · op(B_p) + beta · C_p, X_p = X + p·strideX elements, on bf16 operands with
    /// fp32 accumulation and output (attention: one product per head, the heads interleaved in [N, H·D] rows).
    /// A tensor operand must be bf16 (`bf16(_:)`); `offset` is in its elements.
    static func gemmBatched(batch: Int, transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float,
                            a: Tensor, aOffset: Int, lda: Int, strideA: Int,
                            b: Tensor, bOffset: Int, ldb: Int, strideB: Int,
                            beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int, strideC: Int) {
        precondition(a.dtype == .bf16 && b.dtype == .bf16, "batched gemm takes bf16 operands")
        gemmBatched(batch: batch, transA: transA, transB: transB, m: m, n: n, k: k, alpha: alpha,
                    a: a.rawPointer.assumingMemoryBound(to: UInt16.self) + aOffset, lda: lda, strideA: strideA,
                    b: b, bOffset: bOffset, ldb: ldb, strideB: strideB, beta: beta, c: c, ldc: ldc, strideC: strideC)
        withExtendedLifetime(a) {}
    }

    static func gemmBatched(batch: Int, transA: Bool, transB: Bool, m: Int, n: Int, k: Int, alpha: Float,
                            a: UnsafePointer<UInt16>, lda: Int, strideA: Int,
                            b: Tensor, bOffset: Int, ldb: Int, strideB: Int,
                            beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int, strideC: Int) {
        precondition(b.dtype == .bf16, "batched gemm takes bf16 operands")
        let rc = lora_dnnl_gemm_batched(Int32(batch), transA ? 1 : 0, transB ? 1 : 0, Int32(m), Int32(n), Int32(k),
                                        alpha, a, Int32(lda), strideA,
                                        b.rawPointer.assumingMemoryBound(to: UInt16.self) + bOffset, Int32(ldb), strideB,
                                        beta, c, Int32(ldc), strideC, nil)
        check(rc, "batched gemm \(batch)×[\(m)×\(n)×\(k)]")
        withExtendedLifetime(b) {}
    }

    /// dst[0..<n] = src rounded to bf16 (nearest even), on the calling thread.
    @inline(__always)
    static func roundToBF16(_ src: UnsafePointer<Float>, _ dst: UnsafeMutablePointer<UInt16>, _ n: Int) {
        lora_dnnl_to_bf16(src, dst, n)
    }

    /// The implementation oneDNN picked for a GEMM shape (for benches and tests).
    public static func gemmImplementation(m: Int, n: Int, k: Int, transB: Bool) -> String {
        let a = Tensor(zeros: [m, k], dtype: .bf16), b = Tensor(zeros: transB ? [n, k] : [k, n], dtype: .bf16)
        let c = Tensor(uninitialized: [m, n])
        var info = [CChar](repeating: 0, count: 256)
        let rc = info.withUnsafeMutableBufferPointer {
            lora_dnnl_gemm(0, transB ? 1 : 0, Int32(m), Int32(n), Int32(k), 1, a.rawPointer, 1, Int32(k), b.rawPointer,
                           1, Int32(transB ? k : n), 0, c.mutablePointer, Int32(n), nil, $0.baseAddress)
        }
        check(rc, "gemm \(m)×\(n)×\(k)")
        return info.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }

    // MARK: - Convolution

    struct ConvShape: Hashable {
        var n, cin, h, w, cout, kh, kw, stride, padding: Int
        var c: lora_conv_shape {
            lora_conv_shape(n: Int32(n), cin: Int32(cin), h: Int32(h), w: Int32(w), cout: Int32(cout), kh: Int32(kh),
                            kw: Int32(kw), stride: Int32(stride), padding: Int32(padding))
        }
    }

    /// Weights reordered into the layout of one convolution primitive (forward or input gradient).
    final class PreparedWeights {
        let handle: UnsafeMutableRawPointer
        let bytes: Int
        init(_ shape: ConvShape, backward: Bool, weights w: Tensor) {
            let w = w.dtype == .f16 ? w.fp32() : w
            var s = shape.c
            var bytes = 0
            var status: Int32 = 0
            guard let h = lora_dnnl_conv_prepare(&s, backward ? 1 : 0, w.rawPointer, w.dtype == .bf16 ? 1 : 0, &bytes, &status) else {
                fatalError("oneDNN could not prepare conv weights \(w.shape) (\(w.dtype)) for \(shape), backward \(backward): status \(status)")
            }
            handle = h
            self.bytes = bytes
        }
        deinit { lora_dnnl_conv_release(handle) }
    }

    /// Frozen weights are reordered once per (storage, offset, shape, direction) and kept while their storage lives
    /// (a weak reference tells a live storage from a freed one whose address was reused).
    private final class WeightEntry {
        weak var storage: Storage?
        let prepared: PreparedWeights
        init(_ s: Storage, _ p: PreparedWeights) { storage = s; prepared = p }
    }
    private struct WeightKey: Hashable { let storage: ObjectIdentifier; let offset: Int; let layout: UInt64 }
    nonisolated(unsafe) private static var weightCache: [WeightKey: WeightEntry] = [:]
    private static let cacheLock = NSLock()

    /// Bytes held by reordered frozen conv weights (what the bf16 path adds to memory for convolutions).
    public static var preparedWeightBytes: Int {
        cacheLock.lock(); defer { cacheLock.unlock() }
        return weightCache.values.reduce(0) { $0 + ($1.storage == nil ? 0 : $1.prepared.bytes) }
    }

    static func prepared(_ shape: ConvShape, backward: Bool, weights w: Tensor, frozen: Bool) -> PreparedWeights {
        guard frozen else { return PreparedWeights(shape, backward: backward, weights: w) }
        var s = shape.c, status: Int32 = 0
        let layout = lora_dnnl_conv_weights_layout(&s, backward ? 1 : 0, &status)
        if layout == 0 { fatalError("oneDNN has no bf16 convolution for \(shape) (status \(status))") }
        // The layout hash covers the kernel's shape and direction-specific blocking; equal hashes share one copy.
        let key = WeightKey(storage: ObjectIdentifier(w.storage), offset: w.byteOffset, layout: layout)
        cacheLock.lock(); defer { cacheLock.unlock() }
        if let e = weightCache[key], e.storage === w.storage { return e.prepared }
        if weightCache.count > 64, weightCache.count % 64 == 0 { weightCache = weightCache.filter { $0.value.storage != nil } }
        let p = PreparedWeights(shape, backward: backward, weights: w)
        weightCache[key] = WeightEntry(w.storage, p)
        return p
    }

    /// y = conv(x, w) + b, x fp32 NCHW; w [Cout, Cin, kh, kw]; `frozen`: w's bytes never change (reordered once).
    static func convForward(_ x: Tensor, _ w: Tensor, _ b: Tensor?, _ shape: ConvShape, frozen: Bool, into y: Tensor) {
        let p = prepared(shape, backward: false, weights: w, frozen: frozen)
        var s = shape.c
        let bias = b?.fp32()
        let rc = lora_dnnl_conv_forward(&s, x.pointer, p.handle, bias?.pointer, y.mutablePointer, nil)
        check(rc, "conv forward \(shape)")
        withExtendedLifetime((p, bias)) {}
    }

    /// dX of a convolution from dY, both fp32 NCHW.
    static func convBackwardData(_ dY: Tensor, _ w: Tensor, _ shape: ConvShape, frozen: Bool, into dX: Tensor) {
        let p = prepared(shape, backward: true, weights: w, frozen: frozen)
        var s = shape.c
        let rc = lora_dnnl_conv_backward_data(&s, dY.pointer, p.handle, dX.mutablePointer, nil)
        check(rc, "conv input gradient \(shape)")
        withExtendedLifetime(p) {}
    }
}
