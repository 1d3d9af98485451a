/// The training loss.
public enum Loss {
    /// Per-sample-weighted MSE, as kohya's train_network.py computes it:
    /// loss = mse(pred, target, reduction="none").mean([1, 2, 3]) * weights; loss.mean().
    /// pred, target [B, ...]; weights [B] (min-SNR / loss weights; all ones for plain MSE) → scalar.
    public static func weightedMSE(_ pred: Tensor, _ target: Tensor, weights: Tensor) -> Tensor {
        precondition(pred.shape == target.shape, "mse: prediction \(pred.shape) and target \(target.shape) differ")
        let b = pred.shape[0], per = pred.count / max(b, 1)
        precondition(weights.shape == [b], "mse: weights \(weights.shape) must be [\(b)]")
        let p = pred.fp32(), t = target.fp32(), w = weights.fp32()
        let pp = p.pointer, pt = t.pointer, pw = w.pointer
        var total: Double = 0
        for s in 0..<b {
            var acc: Double = 0
            let x = pp + s * per, y = pt + s * per
            for i in 0..<per { let d = Double(x[i] - y[i]); acc += d * d }
            total += Double(pw[s]) * acc / Double(per)
        }
        return Tensor(shape: [], [Float(total / Double(b))])
    }

    /// d loss / d pred = 2·w_b·(pred − target) / (B·per) · dLoss (d/d target is its negation);
    /// d loss / d w_b = mean_b((pred − target)²) / B · dLoss.
    public static func weightedMSEBackward(_ dLoss: Float, _ pred: Tensor, _ target: Tensor, weights: Tensor)
        -> (dPred: Tensor, dWeights: Tensor) {
        let b = pred.shape[0], per = pred.count / max(b, 1)
        let p = pred.fp32(), t = target.fp32(), w = weights.fp32()
        let out = Tensor(uninitialized: pred.shape)
        let pp = p.pointer, pt = t.pointer, pw = w.pointer, po = out.mutablePointer
        var dw = [Float](repeating: 0, count: b)
        for s in 0..<b {
            let c = 2 * pw[s] * dLoss / Float(b * per)
            let x = pp + s * per, y = pt + s * per, z = po + s * per
            var acc: Double = 0
            for i in 0..<per { let d = x[i] - y[i]; z[i] = c * d; acc += Double(d) * Double(d) }
            dw[s] = Float(acc / Double(per) / Double(b)) * dLoss
        }
        return (out, Tensor(shape: [b], dw))
    }
}

extension Tape {
    /// Per-sample-weighted MSE (kohya's reduction) → scalar [].
    public func weightedMSE(_ pred: Var, _ target: Var, weights: Var) -> Var {
        let p = pred.value, t = target.value, w = weights.value
        return record(Loss.weightedMSE(p, t, weights: w), inputs: [pred, target, weights]) { g, need in
            let r = Loss.weightedMSEBackward(g[flat: 0], p, t, weights: w)
            return [need[0] ? r.dPred : nil, need[1] ? Elementwise.scale(r.dPred, -1) : nil, need[2] ? r.dWeights : nil]
        }
    }
}
