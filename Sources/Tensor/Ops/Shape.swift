/// Shape operations: reshape, permute/transpose, concat, slice, split.

public enum ShapeOps {
    /// Reorders dimensions: out.shape[i] = x.shape[order[i]] (a copy, contiguous).
    public static func permute(_ x: Tensor, _ order: [Int]) -> Tensor {
        precondition(order.sorted() == Array(0..<x.rank), "permute order \(order) is not a permutation of 0..<\(x.rank)")
        let x = x.fp32()
        let outShape = order.map { x.shape[$0] }
        let out = Tensor(uninitialized: outShape)
        var inStrides = [Int](repeating: 1, count: x.rank)
        for i in stride(from: x.rank - 2, through: 0, by: -1) { inStrides[i] = inStrides[i + 1] * x.shape[i + 1] }
        let s = order.map { inStrides[$0] }                 // input stride of each output dim
        let inner = outShape.last ?? 1, innerStride = s.last ?? 1
        let outerDims = Array(outShape.dropLast()), outerStrides = Array(s.dropLast())
        let px = x.pointer, po = out.mutablePointer
        parallelFor(outerDims.reduce(1, *), grain: max(1, 8192 / max(inner, 1))) { rows in
            for r in rows {
                var rem = r, off = 0
                for k in stride(from: outerDims.count - 1, through: 0, by: -1) {
                    off += (rem % outerDims[k]) * outerStrides[k]; rem /= outerDims[k]
                }
                let src = px + off, dst = po + r * inner
                if innerStride == 1 { dst.update(from: src, count: inner) }
                else { for i in 0..<inner { dst[i] = src[i * innerStride] } }
            }
        }
        return out
    }

    static func inverse(_ order: [Int]) -> [Int] {
        var inv = [Int](repeating: 0, count: order.count)
        for (i, o) in order.enumerated() { inv[o] = i }
        return inv
    }

    /// Views x as [outer, size(axis), inner].
    static func split3(_ shape: [Int], _ axis: Int) -> (outer: Int, mid: Int, inner: Int) {
        (shape[..<axis].reduce(1, *), shape[axis], shape[(axis + 1)...].reduce(1, *))
    }

    /// Joins tensors along `axis`; all other dims must agree.
    public static func concat(_ xs: [Tensor], axis: Int) -> Tensor {
        precondition(!xs.isEmpty, "concat of no tensors")
        let axis = Reduce.normalize(axis, xs[0].rank)
        for x in xs {
            precondition(x.rank == xs[0].rank && (0..<x.rank).allSatisfy { $0 == axis || x.shape[$0] == xs[0].shape[$0] },
                         "concat along \(axis): shapes \(xs.map(\.shape)) disagree")
        }
        var shape = xs[0].shape
        shape[axis] = xs.map { $0.shape[axis] }.reduce(0, +)
        let out = Tensor(uninitialized: shape)
        let (outer, total, inner) = split3(shape, axis)
        var start = 0
        for x in xs {
            let xf = x.fp32(), px = xf.pointer, po = out.mutablePointer
            let rowLen = x.shape[axis] * inner, s = start
            parallelFor(outer, grain: max(1, 8192 / max(rowLen, 1))) { r in
                for o in r { (po + o * total * inner + s * inner).update(from: px + o * rowLen, count: rowLen) }
            }
            start += x.shape[axis]
        }
        return out
    }

    /// x[..., start..<start+length, ...] along `axis` (a copy).
    public static func slice(_ x: Tensor, axis: Int, start: Int, length: Int) -> Tensor {
        let axis = Reduce.normalize(axis, x.rank)
        precondition(start >= 0 && length >= 0 && start + length <= x.shape[axis],
                     "slice \(start)..<\(start + length) out of range for dim \(axis) of \(x.shape)")
        let x = x.fp32()
        var shape = x.shape; shape[axis] = length
        let out = Tensor(uninitialized: shape)
        let (outer, total, inner) = split3(x.shape, axis)
        let px = x.pointer, po = out.mutablePointer, rowLen = length * inner
        parallelFor(outer, grain: max(1, 8192 / max(rowLen, 1))) { r in
            for o in r { (po + o * rowLen).update(from: px + o * total * inner + start * inner, count: rowLen) }
        }
        return out
    }

    /// The gradient of `slice`: dY placed into zeros of the input's shape.
    public static func sliceBackward(_ dY: Tensor, inputShape: [Int], axis: Int, start: Int) -> Tensor {
        let axis = Reduce.normalize(axis, inputShape.count)
        let dY = dY.fp32()
        let out = Tensor(zeros: inputShape)
        let (outer, total, inner) = split3(inputShape, axis)
        let rowLen = dY.shape[axis] * inner, pg = dY.pointer, po = out.mutablePointer
        parallelFor(outer, grain: max(1, 8192 / max(rowLen, 1))) { r in
            for o in r { (po + o * total * inner + start * inner).update(from: pg + o * rowLen, count: rowLen) }
        }
        return out
    }
}

extension Tape {
    /// The same elements under a new shape (one dim may be -1).
    public func reshape(_ x: Var, _ shape: [Int]) -> Var {
        let old = x.shape
        return record(x.value.reshaped(shape), inputs: [x]) { g, _ in [g.reshaped(old)] }
    }

    /// Reorders dimensions (out.shape[i] = x.shape[order[i]]).
    public func permute(_ x: Var, _ order: [Int]) -> Var {
        record(ShapeOps.permute(x.value, order), inputs: [x]) { g, _ in [ShapeOps.permute(g, ShapeOps.inverse(order))] }
    }

    /// Swaps two dimensions.
    public func transpose(_ x: Var, _ a: Int, _ b: Int) -> Var {
        var order = Array(0..<x.rank)
        order.swapAt(Reduce.normalize(a, x.rank), Reduce.normalize(b, x.rank))
        return permute(x, order)
    }

    /// Joins along `axis` (the UNet's skip connections: channel concat).
    public func concat(_ xs: [Var], axis: Int) -> Var {
        let axis = Reduce.normalize(axis, xs[0].rank)
        let sizes = xs.map { $0.shape[axis] }
        return record(ShapeOps.concat(xs.map(\.value), axis: axis), inputs: xs) { g, need in
            var start = 0
            return sizes.enumerated().map { i, n in
                defer { start += n }
                return need[i] ? ShapeOps.slice(g, axis: axis, start: start, length: n) : nil
            }
        }
    }

    /// x[..., start..<start+length, ...] along `axis`.
    public func slice(_ x: Var, axis: Int, start: Int, length: Int) -> Var {
        let shape = x.shape
        return record(ShapeOps.slice(x.value, axis: axis, start: start, length: length), inputs: [x]) { g, _ in
            [ShapeOps.sliceBackward(g, inputShape: shape, axis: axis, start: start)]
        }
    }

    /// Splits along `axis` into pieces of the given sizes (torch.split).
    public func split(_ x: Var, axis: Int, sizes: [Int]) -> [Var] {
        let axis = Reduce.normalize(axis, x.rank)
        precondition(sizes.reduce(0, +) == x.shape[axis], "split sizes \(sizes) do not add up to \(x.shape[axis])")
        var start = 0
        return sizes.map { n in defer { start += n }; return slice(x, axis: axis, start: start, length: n) }
    }

    /// Splits along `axis` into `chunks` equal pieces (torch.chunk with an even split).
    public func chunk(_ x: Var, _ chunks: Int, axis: Int) -> [Var] {
        let axis = Reduce.normalize(axis, x.rank)
        precondition(x.shape[axis] % chunks == 0, "chunk: dim \(axis) of \(x.shape) does not split into \(chunks)")
        return split(x, axis: axis, sizes: [Int](repeating: x.shape[axis] / chunks, count: chunks))
    }
}
