/// Pointwise activations (SiLU, GELU erf/tanh, quick-GELU) and GEGLU, forward and backward.
///
/// The transcendental functions are written as branch-free scalar code over counted pointer loops so that
/// LLVM vectorizes them (libm's expf/erff are scalar calls). `exp` is Cephes' expf (≈1 ulp); `erf` is
/// Abramowitz–Stegun 7.1.26 (|error| ≤ 1.5e-7), the same approximation as PyTorch's vectorized CPU erf.

public enum Activation {
    public enum Kind: Sendable { case silu, gelu, geluTanh, quickGELU }   // quickGELU = x·σ(1.702x) (CLIP-L)

    /// Elements per parallel chunk: big enough that thread start-up is noise, small enough to split well.
    static let grain = 1 << 14

    public static func forward(_ x: Tensor, _ kind: Kind) -> Tensor {
        let x = x.fp32()
        let y = Tensor(uninitialized: x.shape)
        let px = x.pointer, py = y.mutablePointer
        parallelFor(x.count, grain: grain) { r in
            let a = px + r.lowerBound, b = py + r.lowerBound, n = r.count
            switch kind {
            case .silu: siluForward(a, b, n)
            case .gelu: geluForward(a, b, n)
            case .geluTanh: geluTanhForward(a, b, n)
            case .quickGELU: quickGELUForward(a, b, n)
            }
        }
        return y
    }

    /// dX = dY · f'(x).
    public static func backward(_ dY: Tensor, x: Tensor, _ kind: Kind) -> Tensor {
        precondition(dY.shape == x.shape, "activation backward: gradient \(dY.shape) does not match input \(x.shape)")
        let x = x.fp32(), dY = dY.fp32()
        let dX = Tensor(uninitialized: x.shape)
        let px = x.pointer, pg = dY.pointer, pd = dX.mutablePointer
        parallelFor(x.count, grain: grain) { r in
            let a = px + r.lowerBound, g = pg + r.lowerBound, d = pd + r.lowerBound, n = r.count
            switch kind {
            case .silu: siluBackward(a, g, d, n)
            case .gelu: geluBackward(a, g, d, n)
            case .geluTanh: geluTanhBackward(a, g, d, n)
            case .quickGELU: quickGELUBackward(a, g, d, n)
            }
        }
        return dX
    }

    /// GEGLU after its projection: x [..., 2F] → (hidden, gate) = x.chunk(2, -1); y = hidden · gelu(gate) [..., F].
    public static func gegluForward(_ x: Tensor) -> Tensor {
        let x = x.fp32()
        let two = x.shape.last ?? 0
        precondition(x.rank >= 1 && two % 2 == 0, "geglu: last dimension of \(x.shape) must be even")
        let f = two / 2, rows = x.count / max(two, 1)
        let y = Tensor(uninitialized: Array(x.shape.dropLast()) + [f])
        let px = x.pointer, py = y.mutablePointer
        parallelFor(rows, grain: max(1, grain / max(f, 1))) { r in
            for i in r { gegluRowForward(px + i * two, py + i * f, f) }
        }
        return y
    }

    /// Gradient of `gegluForward`: dY [..., F] → dX [..., 2F] (hidden half, then gate half).
    public static func gegluBackward(_ dY: Tensor, x: Tensor) -> Tensor {
        let x = x.fp32(), dY = dY.fp32()
        let two = x.shape.last ?? 0, f = two / 2, rows = x.count / max(two, 1)
        precondition(dY.shape == Array(x.shape.dropLast()) + [f], "geglu backward: gradient \(dY.shape) does not match input \(x.shape)")
        let dX = Tensor(uninitialized: x.shape)
        let px = x.pointer, pg = dY.pointer, pd = dX.mutablePointer
        parallelFor(rows, grain: max(1, grain / max(f, 1))) { r in
            for i in r { gegluRowBackward(px + i * two, pg + i * f, pd + i * two, f) }
        }
        return dX
    }

    // MARK: - scalar building blocks (inlined into the loops below, which LLVM vectorizes)

    /// eˣ, branch-free: x is clamped to [-87, 88] (the result stays a normal float, never inf).
    @inline(__always)
    static func exp(_ x: Float) -> Float {
        var x = x < -87 ? -87 : x
        x = x > 88 ? 88 : x
        // n = round(x / ln 2) by the 1.5·2²³ trick (|x / ln 2| < 2²²): t's low mantissa bits hold n.
        let t = x * 1.44269504088896341 + 12582912
        let n = t - 12582912
        let r = (x - n * 0.693359375) + n * 2.12194440e-4
        let z = r * r
        var p: Float = 1.9875691500e-4
        p = p * r + 1.3981999507e-3
        p = p * r + 8.3334519073e-3
        p = p * r + 4.1665795894e-2
        p = p * r + 1.6666665459e-1
        p = p * r + 5.0000001201e-1
        p = p * z + r + 1
        // 2ⁿ from t's bits (no Float → Int conversion, which would trap on a NaN input; NaN propagates through p).
        let scale = Float(bitPattern: (t.bitPattern &- (0x4B40_0000 - 127)) << 23)
        return p * scale
    }

    /// erf(x), Abramowitz–Stegun 7.1.26; `e` must be exp(−x²) (callers share it with the GELU derivative).
    @inline(__always)
    static func erf(_ x: Float, expMinusX2 e: Float) -> Float {
        let a = Float(bitPattern: x.bitPattern & 0x7FFF_FFFF)
        let t = 1 / (1 + 0.3275911 * a)
        var p: Float = 1.061405429
        p = p * t - 1.453152027
        p = p * t + 1.421413741
        p = p * t - 0.284496736
        p = p * t + 0.254829592
        let v = 1 - p * t * e
        return Float(bitPattern: v.bitPattern | (x.bitPattern & 0x8000_0000))
    }

    @inline(__always)
    static func sigmoid(_ x: Float) -> Float { 1 / (1 + exp(-x)) }

    // tanh-GELU constants: √(2/π) and PyTorch's 0.044715.
    static let k0: Float = 0.7978845608028654
    static let k1: Float = 0.044715
    static let invSqrt2: Float = 0.7071067811865476
    static let invSqrt2Pi: Float = 0.3989422804014327

    // MARK: - loops

    static func siluForward(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, _ n: Int) {
        for i in 0..<n { let v = x[i]; y[i] = v / (1 + exp(-v)) }
    }

    static func siluBackward(_ x: UnsafePointer<Float>, _ g: UnsafePointer<Float>, _ d: UnsafeMutablePointer<Float>, _ n: Int) {
        for i in 0..<n {
            let v = x[i], s = sigmoid(v)
            d[i] = g[i] * (s * (1 + v * (1 - s)))
        }
    }

    static func quickGELUForward(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, _ n: Int) {
        for i in 0..<n { let v = x[i]; y[i] = v / (1 + exp(-1.702 * v)) }
    }

    static func quickGELUBackward(_ x: UnsafePointer<Float>, _ g: UnsafePointer<Float>, _ d: UnsafeMutablePointer<Float>, _ n: Int) {
        for i in 0..<n {
            let v = x[i], s = sigmoid(1.702 * v)
            d[i] = g[i] * (s + 1.702 * v * s * (1 - s))
        }
    }

    static func geluForward(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, _ n: Int) {
        for i in 0..<n {
            let v = x[i], u = v * invSqrt2
            y[i] = 0.5 * v * (1 + erf(u, expMinusX2: exp(-u * u)))
        }
    }

    static func geluBackward(_ x: UnsafePointer<Float>, _ g: UnsafePointer<Float>, _ d: UnsafeMutablePointer<Float>, _ n: Int) {
        for i in 0..<n {
            let v = x[i], u = v * invSqrt2
            let e = exp(-u * u)                       // = exp(−x²/2): feeds both erf and the normal pdf
            let cdf = 0.5 * (1 + erf(u, expMinusX2: e))
            d[i] = g[i] * (cdf + v * e * invSqrt2Pi)
        }
    }

    @inline(__always)
    static func tanhGELUInner(_ v: Float) -> Float {
        let u = k0 * (v + k1 * v * v * v)
        return 1 - 2 / (1 + exp(2 * u))              // tanh(u); exp's clamp keeps the tails at ±1
    }

    static func geluTanhForward(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, _ n: Int) {
        for i in 0..<n { let v = x[i]; y[i] = 0.5 * v * (1 + tanhGELUInner(v)) }
    }

    static func geluTanhBackward(_ x: UnsafePointer<Float>, _ g: UnsafePointer<Float>, _ d: UnsafeMutablePointer<Float>, _ n: Int) {
        for i in 0..<n {
            let v = x[i], t = tanhGELUInner(v)
            let du = k0 * (1 + 3 * k1 * v * v)
            d[i] = g[i] * (0.5 * (1 + t) + 0.5 * v * (1 - t * t) * du)
        }
    }

    /// One row: x = [hidden (f) | gate (f)] → y (f).
    static func gegluRowForward(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, _ f: Int) {
        let h = x, gate = x + f
        for i in 0..<f {
            let v = gate[i], u = v * invSqrt2
            y[i] = h[i] * (0.5 * v * (1 + erf(u, expMinusX2: exp(-u * u))))
        }
    }

    /// One row: dHidden = dy · gelu(gate), dGate = dy · hidden · gelu'(gate).
    static func gegluRowBackward(_ x: UnsafePointer<Float>, _ g: UnsafePointer<Float>, _ d: UnsafeMutablePointer<Float>, _ f: Int) {
        let h = x, gate = x + f, dh = d, dgate = d + f
        for i in 0..<f {
            let v = gate[i], u = v * invSqrt2
            let e = exp(-u * u)
            let cdf = 0.5 * (1 + erf(u, expMinusX2: e))
            let gy = g[i]
            dh[i] = gy * (v * cdf)
            dgate[i] = gy * h[i] * (cdf + v * e * invSqrt2Pi)
        }
    }
}

extension Tape {
    /// x · σ(x) (F.silu). Saves x.
    public func silu(_ x: Var) -> Var { activation(x, .silu) }

    /// GELU: erf form by default (F.gelu), tanh approximation when `approximate` (F.gelu(approximate="tanh")).
    public func gelu(_ x: Var, approximate: Bool = false) -> Var { activation(x, approximate ? .geluTanh : .gelu) }

    /// x · σ(1.702x) (CLIP's QuickGELU).
    public func quickGELU(_ x: Var) -> Var { activation(x, .quickGELU) }

    private func activation(_ x: Var, _ kind: Activation.Kind) -> Var {
        let xv = x.value
        return record(Activation.forward(xv, kind), inputs: [x]) { g, _ in [Activation.backward(g, x: xv, kind)] }
    }

    /// GEGLU (diffusers, after the projection): x [..., 2F] → hidden · gelu(gate) [..., F]. Saves x.
    public func geglu(_ x: Var) -> Var {
        let xv = x.value
        return record(Activation.gegluForward(xv), inputs: [x]) { g, _ in [Activation.gegluBackward(g, x: xv)] }
    }
}
