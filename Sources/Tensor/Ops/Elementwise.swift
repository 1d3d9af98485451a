/// Elementwise arithmetic with NumPy broadcasting: add, sub, mul, scale; and the reduction that
/// undoes a broadcast (the gradient of a broadcast input).

/// How two shapes broadcast: the output shape, and per operand a stride per output dimension
/// (0 where the operand is broadcast). Adjacent dimensions that step alike are merged, so the common
/// cases ([N,C,H,W] ⊕ [N,C,1,1], ⊕ [C], ⊕ scalar) run as two nested loops.
struct BroadcastPlan {
    let outShape: [Int]
    let dims: [Int]          // merged output dims
    let stridesA: [Int]
    let stridesB: [Int]

    static func shape(_ a: [Int], _ b: [Int]) -> [Int] {
        let r = max(a.count, b.count)
        let pa = [Int](repeating: 1, count: r - a.count) + a
        let pb = [Int](repeating: 1, count: r - b.count) + b
        return (0..<r).map { i in
            precondition(pa[i] == pb[i] || pa[i] == 1 || pb[i] == 1, "shapes \(a) and \(b) do not broadcast")
            return pa[i] == 1 ? pb[i] : pa[i]
        }
    }

    /// Strides of `shape` (right-aligned to `out`), 0 on broadcast dimensions.
    static func strides(_ shape: [Int], in out: [Int]) -> [Int] {
        let p = [Int](repeating: 1, count: out.count - shape.count) + shape
        var s = [Int](repeating: 0, count: out.count)
        var acc = 1
        for i in stride(from: out.count - 1, through: 0, by: -1) {
            s[i] = p[i] == 1 && out[i] != 1 ? 0 : acc
            acc *= p[i]
        }
        return s
    }

    init(_ a: [Int], _ b: [Int]) {
        outShape = BroadcastPlan.shape(a, b)
        let sa = BroadcastPlan.strides(a, in: outShape), sb = BroadcastPlan.strides(b, in: outShape)
        var d: [Int] = [], xa: [Int] = [], xb: [Int] = []
        for i in 0..<outShape.count where outShape[i] != 1 {
            if let last = d.last,
               xa.last! == sa[i] * outShape[i], xb.last! == sb[i] * outShape[i] {
                // the previous dim steps exactly over this one in both operands: merge
                d[d.count - 1] = last * outShape[i]; xa[xa.count - 1] = sa[i]; xb[xb.count - 1] = sb[i]
            } else {
                d.append(outShape[i]); xa.append(sa[i]); xb.append(sb[i])
            }
        }
        if d.isEmpty { d = [1]; xa = [0]; xb = [0] }
        dims = d; stridesA = xa; stridesB = xb
    }

    /// Calls `row(offsetA, offsetB, offsetOut, n, strideA, strideB)` for every innermost row, in
    /// parallel over rows.
    func forEachRow(_ row: (Int, Int, Int, Int, Int, Int) -> Void) {
        let inner = dims.last!, ia = stridesA.last!, ib = stridesB.last!
        let outer = dims.dropLast().reduce(1, *)
        let od = Array(dims.dropLast()), oa = Array(stridesA.dropLast()), ob = Array(stridesB.dropLast())
        parallelFor(outer, grain: max(1, 16384 / max(inner, 1))) { rows in
            for r in rows {
                var rem = r, offA = 0, offB = 0
                for k in stride(from: od.count - 1, through: 0, by: -1) {
                    let idx = rem % od[k]; rem /= od[k]
                    offA += idx * oa[k]; offB += idx * ob[k]
                }
                row(offA, offB, r * inner, inner, ia, ib)
            }
        }
    }
}

public enum Elementwise {
    enum Op { case add, sub, mul }

    static func binary(_ a: Tensor, _ b: Tensor, _ op: Op) -> Tensor {
        let a = a.fp32(), b = b.fp32()
        let plan = BroadcastPlan(a.shape, b.shape)
        let out = Tensor(uninitialized: plan.outShape)
        let pa = a.pointer, pb = b.pointer, po = out.mutablePointer
        plan.forEachRow { oa, ob, oo, n, sa, sb in
            let x = pa + oa, y = pb + ob, z = po + oo
            switch (op, sa, sb) {
            case (.add, 1, 1): for i in 0..<n { z[i] = x[i] + y[i] }
            case (.add, 1, 0): let c = y[0]; for i in 0..<n { z[i] = x[i] + c }
            case (.add, _, _): for i in 0..<n { z[i] = x[i * sa] + y[i * sb] }
            case (.sub, 1, 1): for i in 0..<n { z[i] = x[i] - y[i] }
            case (.sub, _, _): for i in 0..<n { z[i] = x[i * sa] - y[i * sb] }
            case (.mul, 1, 1): for i in 0..<n { z[i] = x[i] * y[i] }
            case (.mul, 1, 0): let c = y[0]; for i in 0..<n { z[i] = x[i] * c }
            case (.mul, _, _): for i in 0..<n { z[i] = x[i * sa] * y[i * sb] }
            }
        }
        return out
    }

    public static func add(_ a: Tensor, _ b: Tensor) -> Tensor { binary(a, b, .add) }
    public static func sub(_ a: Tensor, _ b: Tensor) -> Tensor { binary(a, b, .sub) }
    public static func mul(_ a: Tensor, _ b: Tensor) -> Tensor { binary(a, b, .mul) }

    public static func scale(_ a: Tensor, _ s: Float) -> Tensor {
        let a = a.fp32()
        let out = Tensor(uninitialized: a.shape)
        let x = a.pointer, z = out.mutablePointer
        parallelFor(a.count, grain: 1 << 15) { r in for i in r { z[i] = x[i] * s } }
        return out
    }

    /// Sums `g` (of a broadcast result's shape) down to `shape`: the gradient of a broadcast operand.
    public static func sumTo(_ g: Tensor, _ shape: [Int]) -> Tensor {
        if g.shape == shape { return g }
        precondition(shape.reduce(1, *) > 0, "sumTo an empty shape")
        let g = g.fp32()
        let out = Tensor(zeros: shape)
        let plan = BroadcastPlan(g.shape, shape)   // stridesB: into `out`, 0 where summed
        let pg = g.pointer, po = out.mutablePointer
        // Rows of the plan may write the same output element, so this runs on one thread.
        let inner = plan.dims.last!, ig = plan.stridesA.last!, io = plan.stridesB.last!
        let od = Array(plan.dims.dropLast()), og = Array(plan.stridesA.dropLast()), oo = Array(plan.stridesB.dropLast())
        for r in 0..<od.reduce(1, *) {
            var rem = r, offG = 0, offO = 0
            for k in stride(from: od.count - 1, through: 0, by: -1) {
                let idx = rem % od[k]; rem /= od[k]
                offG += idx * og[k]; offO += idx * oo[k]
            }
            let x = pg + offG, z = po + offO
            if io == 0 {
                var s: Float = 0
                for i in 0..<inner { s += x[i * ig] }
                z[0] += s
            } else {
                for i in 0..<inner { z[i * io] += x[i * ig] }
            }
        }
        return out
    }

    /// Broadcasts `x` to `shape` (a copy).
    public static func expand(_ x: Tensor, to shape: [Int]) -> Tensor {
        if x.shape == shape { return x }
        precondition(BroadcastPlan.shape(x.shape, shape) == shape, "cannot expand \(x.shape) to \(shape)")
        return add(Tensor(zeros: shape), x)
    }
}

extension Tape {
    /// a + b, broadcasting.
    public func add(_ a: Var, _ b: Var) -> Var {
        let sa = a.shape, sb = b.shape
        return record(Elementwise.add(a.value, b.value), inputs: [a, b]) { g, need in
            [need[0] ? Elementwise.sumTo(g, sa) : nil, need[1] ? Elementwise.sumTo(g, sb) : nil]
        }
    }

    /// a − b, broadcasting.
    public func sub(_ a: Var, _ b: Var) -> Var {
        let sa = a.shape, sb = b.shape
        return record(Elementwise.sub(a.value, b.value), inputs: [a, b]) { g, need in
            [need[0] ? Elementwise.sumTo(g, sa) : nil,
             need[1] ? Elementwise.sumTo(Elementwise.scale(g, -1), sb) : nil]
        }
    }

    /// a · b elementwise, broadcasting. Saves both operands.
    public func mul(_ a: Var, _ b: Var) -> Var {
        let av = a.value, bv = b.value
        return record(Elementwise.mul(av, bv), inputs: [a, b]) { g, need in
            [need[0] ? Elementwise.sumTo(Elementwise.mul(g, bv), av.shape) : nil,
             need[1] ? Elementwise.sumTo(Elementwise.mul(g, av), bv.shape) : nil]
        }
    }

    /// x · s for a constant scalar s.
    public func scale(_ x: Var, _ s: Float) -> Var {
        record(Elementwise.scale(x.value, s), inputs: [x]) { g, _ in [Elementwise.scale(g, s)] }
    }
}
