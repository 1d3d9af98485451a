/// Softmax over the last dimension, and the vectorised exp that it and attention share.

public enum Softmax {
    /// y = exp(x − max) / Σ exp(x − max) along the last dimension. x: [..., N] → y: [..., N].
    public static func forward(_ x: Tensor) -> Tensor {
        let n = x.shape.last ?? 1
        let x = x.fp32()
        let y = Tensor(uninitialized: x.shape)
        let rows = n == 0 ? 0 : x.count / n
        let px = x.pointer, py = y.mutablePointer
        parallelFor(rows, grain: max(1, 8192 / max(n, 1))) { r in
            for row in r {
                let src = px + row * n, dst = py + row * n
                let m = ExpMath.rowMax(src, n)
                // exp(x − m) = 2^((x − m)·log₂e); subtracting first keeps large logits exact
                let s = ExpMath.exp2Row(src, dst, n, shift: -m, scale: ExpMath.log2e)
                ExpMath.scaleRow(dst, n, 1 / s)
            }
        }
        return y
    }

    /// dx = y ∘ (dy − Σ dy∘y) along the last dimension (only y is needed, not x).
    public static func backward(_ dY: Tensor, y: Tensor) -> Tensor {
        precondition(dY.shape == y.shape, "softmax backward: gradient \(dY.shape) does not match output \(y.shape)")
        let n = y.shape.last ?? 1
        let dY = dY.fp32(), y = y.fp32()
        let dx = Tensor(uninitialized: y.shape)
        let rows = n == 0 ? 0 : y.count / n
        let pg = dY.pointer, py = y.pointer, pd = dx.mutablePointer
        parallelFor(rows, grain: max(1, 8192 / max(n, 1))) { r in
            for row in r {
                let g = pg + row * n, yy = py + row * n, d = pd + row * n
                let dot = ExpMath.dot(g, yy, n)
                for j in 0..<n { d[j] = yy[j] * (g[j] - dot) }
            }
        }
        return dx
    }
}

extension Tape {
    /// Softmax over the last dimension. Saves only its output.
    public func softmax(_ x: Var) -> Var {
        let y = Softmax.forward(x.value)
        return record(y, inputs: [x]) { g, _ in [Softmax.backward(g, y: y)] }
    }
}

/// Row kernels on SIMD4, four independent vectors per step. SIMD4 is the width the generic x86-64
/// target has (SSE2), and at that width LLVM keeps compare-and-replace as one maxps; wider Swift SIMD
/// types turn compares into mask shuffles, and the standard library's pointwiseMax, max() and sum()
/// go lane by lane.
enum ExpMath {
    typealias V = SIMD4<Float>
    static let log2e: Float = 1.442_695_04
    static let ln2: Float = 0.693_147_18

    @inline(__always)
    static func load(_ p: UnsafePointer<Float>) -> V {
        UnsafeRawPointer(p).loadUnaligned(as: V.self)
    }

    @inline(__always)
    static func store(_ v: V, _ p: UnsafeMutablePointer<Float>) {
        UnsafeMutableRawPointer(p).storeBytes(of: v, as: V.self)
    }

    @inline(__always)
    static func vmax(_ a: V, _ b: V) -> V { a.replacing(with: b, where: a .< b) }

    /// 2^x per lane for x ≤ 127, relative error < 3e-7; x ≤ −127 (including −∞) gives 0.
    /// Round-to-nearest split x = n + f, f ∈ [−½, ½]; 2^f by a degree-5 minimax polynomial; 2ⁿ from
    /// its exponent bits.
    @inline(__always)
    static func exp2(_ x: V) -> V {
        let x = vmax(x, V(repeating: -127))
        let magic = V(repeating: 12_582_912)   // 1.5·2²³: adding it leaves round(x) in the low mantissa bits
        let t = x + magic
        let f = x - (t - magic)
        var p = V(repeating: 1.327_647_1e-3)
        p = p * f + 9.675_542e-3
        p = p * f + 5.550_713e-2
        p = p * f + 0.240_221_2
        p = p * f + 0.693_146_94
        p = p * f + 1.000_000_1
        // n + 127 ∈ [0, 254] shifted into the exponent field; 0 gives +0 (underflow to zero)
        let e = (unsafeBitCast(t, to: SIMD4<Int32>.self) &- (0x4B40_0000 - 127)) &<< 23
        return p * unsafeBitCast(e, to: V.self)
    }

    @inline(__always)
    static func hsum(_ v: V) -> Float { (v.x + v.z) + (v.y + v.w) }

    @inline(__always)
    static func hmax(_ v: V) -> Float { Swift.max(Swift.max(v.x, v.y), Swift.max(v.z, v.w)) }

    /// max over p[0..<n] (−∞ for n = 0).
    @inline(__always)
    static func rowMax(_ p: UnsafePointer<Float>, _ n: Int) -> Float {
        var m0 = V(repeating: -.infinity), m1 = m0, m2 = m0, m3 = m0
        var j = 0
        while j + 16 <= n {
            m0 = vmax(m0, load(p + j)); m1 = vmax(m1, load(p + j + 4))
            m2 = vmax(m2, load(p + j + 8)); m3 = vmax(m3, load(p + j + 12))
            j += 16
        }
        while j + 4 <= n { m0 = vmax(m0, load(p + j)); j += 4 }
        var s = hmax(vmax(vmax(m0, m1), vmax(m2, m3)))
        while j < n { s = Swift.max(s, p[j]); j += 1 }
        return s
    }

    /// dst[j] = 2^((src[j] + shift)·scale) for j < n (arguments ≤ 127); returns Σ dst. dst may equal src.
    @inline(__always)
    static func exp2Row(_ src: UnsafePointer<Float>, _ dst: UnsafeMutablePointer<Float>, _ n: Int,
                        shift: Float, scale: Float = 1) -> Float {
        var a0 = V.zero, a1 = V.zero, a2 = V.zero, a3 = V.zero
        let sc = V(repeating: scale), sh = V(repeating: shift)
        var j = 0
        while j + 16 <= n {
            let e0 = exp2((load(src + j) + sh) * sc), e1 = exp2((load(src + j + 4) + sh) * sc)
            let e2 = exp2((load(src + j + 8) + sh) * sc), e3 = exp2((load(src + j + 12) + sh) * sc)
            store(e0, dst + j); store(e1, dst + j + 4); store(e2, dst + j + 8); store(e3, dst + j + 12)
            a0 += e0; a1 += e1; a2 += e2; a3 += e3
            j += 16
        }
        while j + 4 <= n {
            let e = exp2((load(src + j) + sh) * sc)
            store(e, dst + j); a0 += e
            j += 4
        }
        if j < n {
            var v = V(repeating: -.infinity)   // unused lanes give 0
            for t in 0..<(n - j) { v[t] = (src[j + t] + shift) * scale }
            let e = exp2(v)
            for t in 0..<(n - j) { dst[j + t] = e[t] }
            a0 += e
        }
        return hsum((a0 + a1) + (a2 + a3))
    }

    @inline(__always)
    static func scaleRow(_ p: UnsafeMutablePointer<Float>, _ n: Int, _ s: Float) {
        var j = 0
        let sv = V(repeating: s)
        while j + 4 <= n { store(load(p + j) * sv, p + j); j += 4 }
        while j < n { p[j] *= s; j += 1 }
    }

    /// Σ a[j]·b[j].
    @inline(__always)
    static func dot(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int) -> Float {
        var a0 = V.zero, a1 = V.zero
        var j = 0
        while j + 8 <= n { a0 += load(a + j) * load(b + j); a1 += load(a + j + 4) * load(b + j + 4); j += 8 }
        while j + 4 <= n { a0 += load(a + j) * load(b + j); j += 4 }
        var s = hsum(a0 + a1)
        while j < n { s += a[j] * b[j]; j += 1 }
        return s
    }

    /// ds[j] = p[j]·(ds[j] − delta): the softmax backward step of attention.
    @inline(__always)
    static func softmaxGradRow(_ p: UnsafePointer<Float>, _ ds: UnsafeMutablePointer<Float>, _ n: Int, _ delta: Float) {
        let dv = V(repeating: delta)
        var j = 0
        while j + 8 <= n {
            store(load(p + j) * (load(ds + j) - dv), ds + j)
            store(load(p + j + 4) * (load(ds + j + 4) - dv), ds + j + 4)
            j += 8
        }
        while j < n { ds[j] = p[j] * (ds[j] - delta); j += 1 }
    }
}
