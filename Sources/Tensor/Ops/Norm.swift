/// Group norm and layer norm, forward and backward.
///
/// Statistics are two-pass (mean, then Σ(x − mean)²) over each 4096-element block, blocks merged in
/// Double, so that inputs whose mean is far larger than their spread (activations after a bias) keep
/// their variance; within a block the sums run in SIMD fp32 lanes. Backward sums Σ dy·(x − mean) rather than Σ dy·x for
/// the same reason.

public enum GroupNorm {
    /// x [N, C, *spatial] (any trailing dims, incl. none), C divisible by groups; weight, bias [C]? (affine).
    /// Returns y and the per-(n, group) mean and rstd [N, groups] that backward needs.
    public static func forward(_ x: Tensor, groups: Int, weight: Tensor?, bias: Tensor?, eps: Float)
        -> (y: Tensor, mean: Tensor, rstd: Tensor) {
        let (n, c, s) = dims(x.shape, groups: groups)
        let cg = c / groups, d = cg * s
        let x = x.fp32(), w = weight?.fp32(), b = bias?.fp32()
        if let w { precondition(w.shape == [c], "group norm: weight \(w.shape) does not match \(c) channels") }
        if let b { precondition(b.shape == [c], "group norm: bias \(b.shape) does not match \(c) channels") }
        let y = Tensor(uninitialized: x.shape)
        let mean = Tensor(uninitialized: [n, groups]), rstd = Tensor(uninitialized: [n, groups])
        let px = x.pointer, py = y.mutablePointer, pm = mean.mutablePointer, pr = rstd.mutablePointer
        let pw = w?.pointer, pb = b?.pointer
        parallelFor(n * groups, grain: 1) { r in
            for i in r {
                let g = i % groups
                let gx = px + i * d, gy = py + i * d
                let (m, v) = NormKernels.moments(gx, d)
                let rs = Float(1 / (v + Double(eps)).squareRoot())
                let mf = Float(m)
                pm[i] = mf; pr[i] = rs
                for k in 0..<cg {
                    let ch = g * cg + k
                    let scale = rs * (pw?[ch] ?? 1), shift = pb?[ch] ?? 0
                    NormKernels.normalize(gx + k * s, gy + k * s, s, mf, scale, shift)
                }
            }
        }
        return (y, mean, rstd)
    }

    public static func backward(_ dY: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, groups: Int, weight: Tensor?,
                                wantX: Bool, wantWeight: Bool, wantBias: Bool) -> (dX: Tensor?, dWeight: Tensor?, dBias: Tensor?) {
        guard wantX || wantWeight || wantBias else { return (nil, nil, nil) }
        precondition(dY.shape == x.shape, "group norm backward: gradient \(dY.shape) does not match input \(x.shape)")
        let (n, c, s) = dims(x.shape, groups: groups)
        let cg = c / groups, d = cg * s
        precondition(mean.shape == [n, groups] && rstd.shape == [n, groups], "group norm backward: statistics must be [\(n), \(groups)]")
        let x = x.fp32(), dY = dY.fp32(), mean = mean.fp32(), rstd = rstd.fp32()
        let w = weight?.fp32()
        let px = x.pointer, pg = dY.pointer, pm = mean.pointer, pr = rstd.pointer, pw = w?.pointer
        // Per (n, c): Σ dy·(x − mean) and Σ dy over the spatial positions. [N, C] each.
        let sdx = Tensor(uninitialized: [n, c]), sdy = Tensor(uninitialized: [n, c])
        let psdx = sdx.mutablePointer, psdy = sdy.mutablePointer
        let dX = wantX ? Tensor(uninitialized: x.shape) : nil
        let pd = dX?.mutablePointer
        let needCentered = wantX || wantWeight
        parallelFor(n * groups, grain: 1) { r in
            for i in r {
                let g = i % groups, nn = i / groups
                let off = i * d
                let m = pm[i], rs = pr[i]
                var sumGX = 0.0, sumG = 0.0     // Σ_c γ Σ dy(x−m), Σ_c γ Σ dy
                for k in 0..<cg {
                    let ch = g * cg + k
                    let gx = px + off + k * s, gg = pg + off + k * s
                    var a = 0.0, b = 0.0
                    if needCentered {
                        (a, b) = NormKernels.sumProductCentered(gg, gx, s, m)
                    } else {
                        b = NormKernels.sum(gg, s)
                    }
                    psdx[nn * c + ch] = Float(a); psdy[nn * c + ch] = Float(b)
                    let gamma = Double(pw?[ch] ?? 1)
                    sumGX += gamma * a; sumG += gamma * b
                }
                guard let pd else { continue }
                // dx = rs·γ·dy − rs³/D·(Σγ dy(x−m))·(x − m) − rs/D·(Σγ dy)
                let rsd = Double(rs)
                let c2 = Float(-rsd * rsd * rsd * sumGX / Double(d))
                let c3 = Float(-rsd * sumG / Double(d))
                for k in 0..<cg {
                    let ch = g * cg + k
                    let a = rs * (pw?[ch] ?? 1)
                    NormKernels.inputGradient(pg + off + k * s, px + off + k * s, pd + off + k * s, s, a, c2, m, c3)
                }
            }
        }
        var dW: Tensor?, dB: Tensor?
        if wantWeight {
            let t = Tensor(uninitialized: [c]); let p = t.mutablePointer
            for ch in 0..<c {
                var acc = 0.0
                for nn in 0..<n { acc += Double(psdx[nn * c + ch]) * Double(pr[nn * groups + ch / cg]) }
                p[ch] = Float(acc)
            }
            dW = t
        }
        if wantBias {
            let t = Tensor(uninitialized: [c]); let p = t.mutablePointer
            for ch in 0..<c {
                var acc = 0.0
                for nn in 0..<n { acc += Double(psdy[nn * c + ch]) }
                p[ch] = Float(acc)
            }
            dB = t
        }
        return (dX, dW, dB)
    }

    /// (N, C, spatial size) of x [N, C, *spatial].
    static func dims(_ shape: [Int], groups: Int) -> (Int, Int, Int) {
        precondition(shape.count >= 2, "group norm needs [N, C, ...], got \(shape)")
        let n = shape[0], c = shape[1]
        precondition(groups > 0 && c % groups == 0, "group norm: \(c) channels are not divisible into \(groups) groups")
        return (n, c, shape.dropFirst(2).reduce(1, *))
    }
}

public enum LayerNorm {   // normalises over the last dimension; weight, bias [C]?
    /// x [..., C] → y [..., C], with mean and rstd [...] (one per row) for backward.
    public static func forward(_ x: Tensor, weight: Tensor?, bias: Tensor?, eps: Float) -> (y: Tensor, mean: Tensor, rstd: Tensor) {
        precondition(x.rank >= 1, "layer norm needs at least one dimension")
        let c = x.shape.last!, rows = x.count / max(c, 1)
        let x = x.fp32(), w = weight?.fp32(), b = bias?.fp32()
        if let w { precondition(w.shape == [c], "layer norm: weight \(w.shape) does not match last dimension \(c)") }
        if let b { precondition(b.shape == [c], "layer norm: bias \(b.shape) does not match last dimension \(c)") }
        let y = Tensor(uninitialized: x.shape)
        let statShape = Array(x.shape.dropLast())
        let mean = Tensor(uninitialized: statShape), rstd = Tensor(uninitialized: statShape)
        let px = x.pointer, py = y.mutablePointer, pm = mean.mutablePointer, pr = rstd.mutablePointer
        let pw = w?.pointer, pb = b?.pointer
        parallelFor(rows, grain: max(1, 8192 / max(c, 1))) { r in
            for i in r {
                let rx = px + i * c, ry = py + i * c
                let (m, v) = NormKernels.moments(rx, c)
                let rs = Float(1 / (v + Double(eps)).squareRoot()), mf = Float(m)
                pm[i] = mf; pr[i] = rs
                switch (pw, pb) {
                case let (pw?, pb?): for j in 0..<c { ry[j] = (rx[j] - mf) * rs * pw[j] + pb[j] }
                case let (pw?, nil): for j in 0..<c { ry[j] = (rx[j] - mf) * rs * pw[j] }
                case let (nil, pb?): for j in 0..<c { ry[j] = (rx[j] - mf) * rs + pb[j] }
                case (nil, nil): NormKernels.normalize(rx, ry, c, mf, rs, 0)
                }
            }
        }
        return (y, mean, rstd)
    }

    public static func backward(_ dY: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor?,
                                wantX: Bool, wantWeight: Bool, wantBias: Bool) -> (dX: Tensor?, dWeight: Tensor?, dBias: Tensor?) {
        guard wantX || wantWeight || wantBias else { return (nil, nil, nil) }
        precondition(dY.shape == x.shape, "layer norm backward: gradient \(dY.shape) does not match input \(x.shape)")
        let c = x.shape.last!, rows = x.count / max(c, 1)
        precondition(mean.count == rows && rstd.count == rows, "layer norm backward: statistics must have one value per row")
        let x = x.fp32(), dY = dY.fp32(), mean = mean.fp32(), rstd = rstd.fp32(), w = weight?.fp32()
        let px = x.pointer, pg = dY.pointer, pm = mean.pointer, pr = rstd.pointer, pw = w?.pointer
        let dX = wantX ? Tensor(uninitialized: x.shape) : nil
        let pd = dX?.mutablePointer
        // dW, dB: per-chunk partial sums (rows split into contiguous chunks), added at the end.
        let wantParams = wantWeight || wantBias
        let chunks = wantParams ? max(1, min(Threads.count, rows)) : 1
        let partW = Tensor(zeros: wantWeight ? [chunks, c] : [0]), partB = Tensor(zeros: wantBias ? [chunks, c] : [0])
        let ppw = partW.mutablePointer, ppb = partB.mutablePointer
        let body: (Int, Range<Int>) -> Void = { chunk, r in
            let accW = ppw + chunk * c, accB = ppb + chunk * c
            for i in r {
                let rx = px + i * c, rg = pg + i * c
                let m = pm[i], rs = pr[i]
                if wantWeight && wantBias {
                    for j in 0..<c { let gj = rg[j]; accW[j] += gj * ((rx[j] - m) * rs); accB[j] += gj }
                } else if wantWeight {
                    for j in 0..<c { accW[j] += rg[j] * ((rx[j] - m) * rs) }
                } else if wantBias {
                    for j in 0..<c { accB[j] += rg[j] }
                }
                guard let pd else { continue }
                // dx = rs·(γdy − mean(γdy) − x̂·mean(γdy·x̂)),  x̂ = (x − m)·rs
                let (sgx, sg): (Double, Double)
                if let pw {
                    (sgx, sg) = NormKernels.sumProductCenteredWeighted(rg, rx, pw, c, m)
                } else {
                    (sgx, sg) = NormKernels.sumProductCentered(rg, rx, c, m)
                }
                let rsd = Double(rs)
                let c2 = Float(-rsd * rsd * rsd * sgx / Double(c))
                let c3 = Float(-rsd * sg / Double(c))
                let rd = pd + i * c
                if let pw {
                    for j in 0..<c { rd[j] = rs * pw[j] * rg[j] + c2 * (rx[j] - m) + c3 }
                } else {
                    NormKernels.inputGradient(rg, rx, rd, c, rs, c2, m, c3)
                }
            }
        }
        if wantParams {
            parallelFor(chunks, grain: 1) { cr in
                for k in cr { body(k, (rows * k / chunks)..<(rows * (k + 1) / chunks)) }
            }
        } else {
            parallelFor(rows, grain: max(1, 8192 / max(c, 1))) { r in body(0, r) }
        }
        var dW: Tensor?, dB: Tensor?
        if wantWeight { dW = NormKernels.sumChunks(ppw, chunks, c) }
        if wantBias { dB = NormKernels.sumChunks(ppb, chunks, c) }
        return (dX, dW, dB)
    }
}

/// Reductions and row kernels shared by the norms. Plain counted loops over pointers (vectorized by
/// LLVM), and explicit SIMD where a reduction needs reassociation that LLVM will not do for floats.
enum NormKernels {
    typealias V = SIMD16<Float>
    static let block = 4096

    @inline(__always)
    static func load(_ p: UnsafePointer<Float>, _ i: Int) -> V {
        UnsafeRawPointer(p + i).loadUnaligned(as: V.self)
    }

    /// Mean and (biased) variance of p[0..<n]: two passes over each L1-sized block (its sum, then
    /// Σ(x − block mean)²), blocks merged in Double with Chan et al.'s pairwise update, so memory is
    /// read once and a large common offset never cancels.
    static func moments(_ p: UnsafePointer<Float>, _ n: Int) -> (mean: Double, variance: Double) {
        var count = 0.0, mean = 0.0, m2 = 0.0, i = 0
        while i < n {
            let len = min(block, n - i), nb = Double(len)
            let bm = sum(p + i, len) / nb
            let f = Float(bm)
            // Σ(x − f)² = Σ(x − bm)² + len·(bm − f)²
            let d0 = bm - Double(f)
            let bq = max(0, sumSquaredDeviations(p + i, len, f) - nb * d0 * d0)
            let delta = bm - mean, total = count + nb
            mean += delta * nb / total
            m2 += bq + delta * delta * count * nb / total
            count = total
            i += len
        }
        return (mean, count > 0 ? m2 / count : 0)
    }

    /// Σ p[0..<n], fp32 lanes within blocks, Double across blocks.
    static func sum(_ p: UnsafePointer<Float>, _ n: Int) -> Double {
        var total = 0.0, i = 0
        let vecEnd = n & ~63
        while i < vecEnd {
            let end = min(vecEnd, i + block)
            var a0 = V(), a1 = V(), a2 = V(), a3 = V()
            while i < end {
                a0 += load(p, i); a1 += load(p, i + 16); a2 += load(p, i + 32); a3 += load(p, i + 48)
                i += 64
            }
            total += Double(((a0 + a1) + (a2 + a3)).sum())
        }
        while i < n { total += Double(p[i]); i += 1 }
        return total
    }

    /// Σ (p − m)².
    static func sumSquaredDeviations(_ p: UnsafePointer<Float>, _ n: Int, _ m: Float) -> Double {
        var total = 0.0, i = 0
        let vecEnd = n & ~63
        let mv = V(repeating: m)
        while i < vecEnd {
            let end = min(vecEnd, i + block)
            var a0 = V(), a1 = V(), a2 = V(), a3 = V()
            while i < end {
                let d0 = load(p, i) - mv, d1 = load(p, i + 16) - mv, d2 = load(p, i + 32) - mv, d3 = load(p, i + 48) - mv
                a0 += d0 * d0; a1 += d1 * d1; a2 += d2 * d2; a3 += d3 * d3
                i += 64
            }
            total += Double(((a0 + a1) + (a2 + a3)).sum())
        }
        while i < n { let d = Double(p[i] - m); total += d * d; i += 1 }
        return total
    }

    /// (Σ g·(x − m), Σ g).
    static func sumProductCentered(_ g: UnsafePointer<Float>, _ x: UnsafePointer<Float>, _ n: Int, _ m: Float) -> (Double, Double) {
        var tgx = 0.0, tg = 0.0, i = 0
        let vecEnd = n & ~31
        let mv = V(repeating: m)
        while i < vecEnd {
            let end = min(vecEnd, i + block)
            var a0 = V(), a1 = V(), b0 = V(), b1 = V()
            while i < end {
                let g0 = load(g, i), g1 = load(g, i + 16)
                a0 += g0 * (load(x, i) - mv); a1 += g1 * (load(x, i + 16) - mv)
                b0 += g0; b1 += g1
                i += 32
            }
            tgx += Double((a0 + a1).sum()); tg += Double((b0 + b1).sum())
        }
        while i < n { tgx += Double(g[i]) * Double(x[i] - m); tg += Double(g[i]); i += 1 }
        return (tgx, tg)
    }

    /// (Σ w·g·(x − m), Σ w·g).
    static func sumProductCenteredWeighted(_ g: UnsafePointer<Float>, _ x: UnsafePointer<Float>, _ w: UnsafePointer<Float>,
                                           _ n: Int, _ m: Float) -> (Double, Double) {
        var tgx = 0.0, tg = 0.0, i = 0
        let vecEnd = n & ~15
        let mv = V(repeating: m)
        while i < vecEnd {
            let end = min(vecEnd, i + block)
            var a = V(), b = V()
            while i < end {
                let wg = load(g, i) * load(w, i)
                a += wg * (load(x, i) - mv); b += wg
                i += 16
            }
            tgx += Double(a.sum()); tg += Double(b.sum())
        }
        while i < n { let wg = Double(w[i] * g[i]); tgx += wg * Double(x[i] - m); tg += wg; i += 1 }
        return (tgx, tg)
    }

    /// y = (x − m)·scale + shift.
    static func normalize(_ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, _ n: Int,
                          _ m: Float, _ scale: Float, _ shift: Float) {
        for j in 0..<n { y[j] = (x[j] - m) * scale + shift }
    }

    /// dx = a·g + c2·(x − m) + c3.
    static func inputGradient(_ g: UnsafePointer<Float>, _ x: UnsafePointer<Float>, _ dx: UnsafeMutablePointer<Float>,
                              _ n: Int, _ a: Float, _ c2: Float, _ m: Float, _ c3: Float) {
        for j in 0..<n { dx[j] = a * g[j] + c2 * (x[j] - m) + c3 }
    }

    /// Σ over `chunks` rows of a [chunks, c] buffer → [c].
    static func sumChunks(_ p: UnsafeMutablePointer<Float>, _ chunks: Int, _ c: Int) -> Tensor {
        let out = Tensor(uninitialized: [c])
        let po = out.mutablePointer
        po.update(from: p, count: c)
        for k in 1..<max(chunks, 1) { let q = p + k * c; for j in 0..<c { po[j] += q[j] } }
        return out
    }
}

extension Tape {
    /// Group norm over x [N, C, *spatial] (nn.GroupNorm). Saves x and the statistics; frozen weight/bias
    /// get no gradient.
    public func groupNorm(_ x: Var, groups: Int, weight: Var?, bias: Var?, eps: Float) -> Var {
        let xv = x.value, wv = weight?.value
        let r = GroupNorm.forward(xv, groups: groups, weight: wv, bias: bias?.value, eps: eps)
        let mean = r.mean, rstd = r.rstd
        var inputs = [x]
        let wi = weight.map { inputs.append($0); return inputs.count - 1 }
        let bi = bias.map { inputs.append($0); return inputs.count - 1 }
        return record(r.y, inputs: inputs) { g, need in
            let d = GroupNorm.backward(g, x: xv, mean: mean, rstd: rstd, groups: groups, weight: wv, wantX: need[0],
                                       wantWeight: wi.map { need[$0] } ?? false, wantBias: bi.map { need[$0] } ?? false)
            var out: [Tensor?] = [d.dX]
            if wi != nil { out.append(d.dWeight) }
            if bi != nil { out.append(d.dBias) }
            return out
        }
    }

    /// Layer norm over the last dimension (nn.LayerNorm). Saves x and the statistics.
    public func layerNorm(_ x: Var, weight: Var?, bias: Var?, eps: Float) -> Var {
        let xv = x.value, wv = weight?.value
        let r = LayerNorm.forward(xv, weight: wv, bias: bias?.value, eps: eps)
        let mean = r.mean, rstd = r.rstd
        var inputs = [x]
        let wi = weight.map { inputs.append($0); return inputs.count - 1 }
        let bi = bias.map { inputs.append($0); return inputs.count - 1 }
        return record(r.y, inputs: inputs) { g, need in
            let d = LayerNorm.backward(g, x: xv, mean: mean, rstd: rstd, weight: wv, wantX: need[0],
                                       wantWeight: wi.map { need[$0] } ?? false, wantBias: bi.map { need[$0] } ?? false)
            var out: [Tensor?] = [d.dX]
            if wi != nil { out.append(d.dWeight) }
            if bi != nil { out.append(d.dBias) }
            return out
        }
    }
}
