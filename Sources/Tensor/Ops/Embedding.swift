import Foundation

/// Token and position embeddings (lookup), and the sinusoidal timestep embedding.
public enum Embedding {
    /// table [V, D], ids (each in 0..<V) → [ids.count, D].
    public static func forward(_ table: Tensor, ids: [Int]) -> Tensor {
        precondition(table.rank == 2, "embedding table must be [vocab, dim], got \(table.shape)")
        let v = table.shape[0], d = table.shape[1]
        for id in ids { precondition(id >= 0 && id < v, "token id \(id) outside the embedding table's \(v) rows") }
        let t = table.fp32()
        let out = Tensor(uninitialized: [ids.count, d])
        let pt = t.pointer, po = out.mutablePointer
        parallelFor(ids.count, grain: max(1, 8192 / max(d, 1))) { r in
            for i in r { (po + i * d).update(from: pt + ids[i] * d, count: d) }
        }
        return out
    }

    /// dTable: rows of dY scatter-added into the rows the ids picked (repeated ids accumulate).
    public static func backward(_ dY: Tensor, ids: [Int], vocab: Int) -> Tensor {
        let d = dY.shape.last!
        let g = dY.fp32()
        let out = Tensor(zeros: [vocab, d])
        let pg = g.pointer, po = out.mutablePointer
        for (i, id) in ids.enumerated() {
            let dst = po + id * d, src = pg + i * d
            for j in 0..<d { dst[j] += src[j] }
        }
        return out
    }

    /// Sinusoidal timestep embedding, as LDM's `timestep_embedding` (sgm/modules/diffusionmodules/util.py)
    /// and diffusers' `get_timestep_embedding(flip_sin_to_cos=True, downscale_freq_shift=0)`:
    /// freqs_i = exp(−ln(maxPeriod)·i/half); out = [cos(t·freqs), sin(t·freqs)]. t [B] → [B, dim].
    /// SDXL uses it for the timestep (dim 320) and for each of the six size/crop numbers of `y` (dim 256).
    public static func timestep(_ t: [Float], dim: Int, maxPeriod: Float = 10000) -> Tensor {
        let half = dim / 2
        let freqs = timestepFrequencies(half: half, maxPeriod: maxPeriod)
        var out = [Float](repeating: 0, count: t.count * dim)
        for (b, tb) in t.enumerated() {
            for i in 0..<half {
                let a = tb * freqs[i]   // fp32 product, as torch computes timesteps[:, None].float() * freqs[None]
                out[b * dim + i] = cos(a)
                out[b * dim + half + i] = sin(a)
            }
        }
        return Tensor(shape: [t.count, dim], out)
    }

    /// exp(−ln(maxPeriod)·i/half) computed step by step in fp32, as torch does it
    /// (`torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)`): at t ≈ 1000
    /// one ulp of a frequency moves sin/cos by ~1e-4, so the rounding must be the same as the reference's.
    static func timestepFrequencies(half: Int, maxPeriod: Float) -> [Float] {
        let c = Float(-log(Double(maxPeriod)))
        return (0..<half).map { i in Foundation.exp(c * Float(i) / Float(half)) }
    }

    /// d(timestep embedding)/dt contracted with dY: Σ_i f_i·(−sin(t f_i)·dY_cos,i + cos(t f_i)·dY_sin,i) → [B].
    public static func timestepBackward(_ dY: Tensor, t: [Float], dim: Int, maxPeriod: Float = 10000) -> Tensor {
        let half = dim / 2
        let g = dY.scalars
        let freqs = timestepFrequencies(half: half, maxPeriod: maxPeriod)
        let dt = t.enumerated().map { b, tb -> Float in
            var s: Float = 0
            for i in 0..<half {
                let a = tb * freqs[i]
                s += freqs[i] * (-sin(a) * g[b * dim + i] + cos(a) * g[b * dim + half + i])
            }
            return s
        }
        return Tensor(shape: [t.count], dt)
    }
}

extension Tape {
    /// Rows of `table` [V, D] picked by `ids` → [ids.count, D]. A frozen table gets no gradient.
    public func embedding(_ table: Var, ids: [Int]) -> Var {
        let vocab = table.shape[0]
        return record(Embedding.forward(table.value, ids: ids), inputs: [table]) { g, _ in
            [Embedding.backward(g, ids: ids, vocab: vocab)]
        }
    }

    /// Sinusoidal embedding of the values in `t` [B] → [B, dim] (differentiable in t).
    public func timestepEmbedding(_ t: Var, dim: Int, maxPeriod: Float = 10000) -> Var {
        let ts = t.value.scalars
        return record(Embedding.timestep(ts, dim: dim, maxPeriod: maxPeriod), inputs: [t]) { g, _ in
            [Embedding.timestepBackward(g, t: ts, dim: dim, maxPeriod: maxPeriod).reshaped(t.shape)]
        }
    }
}
