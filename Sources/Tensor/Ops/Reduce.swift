/// Sums and means over axes.

public enum Reduce {
    /// Σ over rows of x viewed as [rows, columns] → [columns]. (Bias gradients.)
    public static func sumRows(_ x: Tensor, columns n: Int) -> Tensor {
        let x = x.fp32()
        let rows = x.count / max(n, 1)
        let out = Tensor(zeros: [n])
        let px = x.pointer, po = out.mutablePointer
        // Split over columns so no two threads write the same output.
        parallelFor(n, grain: 64) { cols in
            for r in 0..<rows {
                let row = px + r * n
                for c in cols { po[c] += row[c] }
            }
        }
        return out
    }

    /// Σ over `axes` (keeping them as size-1 dimensions). Empty `axes` sums everything to shape [].
    public static func sum(_ x: Tensor, axes: [Int]?) -> Tensor {
        let x = x.fp32()
        guard let axes = axes else {
            let p = x.pointer
            var s: Double = 0
            for i in 0..<x.count { s += Double(p[i]) }   // Double: the order-independent-enough total
            return Tensor(shape: [], [Float(s)])
        }
        var target = x.shape
        for a in axes { target[normalize(a, x.rank)] = 1 }
        return Elementwise.sumTo(x, target)
    }

    static func normalize(_ axis: Int, _ rank: Int) -> Int {
        let a = axis < 0 ? axis + rank : axis
        precondition(a >= 0 && a < rank, "axis \(axis) out of range for rank \(rank)")
        return a
    }
}

extension Tape {
    /// Σ over `axes`, keeping them as size-1 dims (`axes == nil`: everything, to a scalar of shape []).
    public func sum(_ x: Var, axes: [Int]? = nil) -> Var {
        let shape = x.shape
        return record(Reduce.sum(x.value, axes: axes), inputs: [x]) { g, _ in
            [Elementwise.expand(g.reshaped(axes == nil ? [Int](repeating: 1, count: shape.count) : g.shape), to: shape)]
        }
    }

    /// Mean over `axes` (kept as size-1 dims), or over everything.
    public func mean(_ x: Var, axes: [Int]? = nil) -> Var {
        let n = axes.map { $0.map { x.shape[Reduce.normalize($0, x.rank)] }.reduce(1, *) } ?? x.value.count
        return scale(sum(x, axes: axes), 1 / Float(max(n, 1)))
    }
}

extension Var {
    public var rank: Int { shape.count }
}
