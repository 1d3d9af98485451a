/// Nearest-neighbour 2× upsampling (F.interpolate(x, scale_factor=2, mode="nearest")), the SDXL
/// UNet/VAE upsampler before its 3×3 convolution.

public enum Upsample {
    /// [N, C, H, W] → [N, C, 2H, 2W]: out[.., y, x] = in[.., y/2, x/2].
    public static func nearest2xForward(_ x: Tensor) -> Tensor {
        precondition(x.rank == 4, "upsampleNearest2x: input must be [N, C, H, W], got \(x.shape)")
        let x = x.fp32()
        let h = x.shape[2], w = x.shape[3], rows = x.shape[0] * x.shape[1] * h
        let y = Tensor(uninitialized: [x.shape[0], x.shape[1], 2 * h, 2 * w])
        let px = x.pointer, py = y.mutablePointer
        // Input row r (of all N·C·H) becomes output rows 2r and 2r+1, which are identical.
        parallelFor(rows, grain: max(1, 4096 / max(w, 1))) { range in
            for r in range {
                let src = px + r * w, dst = py + 2 * r * 2 * w
                for i in 0..<w { dst[2 * i] = src[i]; dst[2 * i + 1] = src[i] }
                (dst + 2 * w).update(from: dst, count: 2 * w)
            }
        }
        return y
    }

    /// [N, C, 2H, 2W] → [N, C, H, W]: each input element gets the sum of the 2×2 block it was copied to.
    public static func nearest2xBackward(_ dY: Tensor) -> Tensor {
        precondition(dY.rank == 4 && dY.shape[2] % 2 == 0 && dY.shape[3] % 2 == 0,
                     "upsampleNearest2x backward: gradient must be [N, C, 2H, 2W], got \(dY.shape)")
        let dY = dY.fp32()
        let h = dY.shape[2] / 2, w = dY.shape[3] / 2, rows = dY.shape[0] * dY.shape[1] * h
        let dX = Tensor(uninitialized: [dY.shape[0], dY.shape[1], h, w])
        let pg = dY.pointer, pd = dX.mutablePointer
        parallelFor(rows, grain: max(1, 4096 / max(w, 1))) { range in
            for r in range {
                let top = pg + 2 * r * 2 * w, bottom = top + 2 * w, dst = pd + r * w
                for i in 0..<w { dst[i] = (top[2 * i] + top[2 * i + 1]) + (bottom[2 * i] + bottom[2 * i + 1]) }
            }
        }
        return dX
    }
}

extension Tape {
    /// F.interpolate(x, scale_factor=2, mode="nearest") on [N, C, H, W]. Saves nothing.
    public func upsampleNearest2x(_ x: Var) -> Var {
        record(Upsample.nearest2xForward(x.value), inputs: [x]) { g, _ in [Upsample.nearest2xBackward(g)] }
    }
}
