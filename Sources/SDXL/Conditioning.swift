import Tensor

/// SDXL's two conditioning inputs to the UNet: the cross-attention context (both text encoders' penultimate
/// states side by side) and the vector `y` (bigG's pooled text embedding and six size/crop numbers).
public enum Conditioning {
    /// y for SDXL: pooled ⊕ the 256-d sinusoidal embeddings (cos half, then sin half) of original height, width,
    /// crop top, crop left, target height, target width, as Floats → [B, pooledWidth + 6·embedDim] (2816 for SDXL).
    ///
    /// sgm: GeneralConditioner concatenates the OpenCLIP pooled vector and three ConcatTimestepEmbedderND(256)
    /// outputs (original_size_as_tuple, crop_coords_top_left, target_size_as_tuple), each embedding its two numbers
    /// and flattening "(b d) d2 -> b (d d2)". diffusers: time_ids = [orig_h, orig_w, top, left, target_h, target_w],
    /// add_time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0) over time_ids.flatten(),
    /// reshaped [B, 1536] and concatenated after text_embeds. Both give this order.
    public static func y(_ t: Tape, pooled: Var, originalSize: [(h: Int, w: Int)], cropTopLeft: [(top: Int, left: Int)],
                         targetSize: [(h: Int, w: Int)], embedDim: Int = 256) -> Var {
        let b = pooled.shape[0]
        precondition(pooled.rank == 2, "y: pooled must be [B, P], got \(pooled.shape)")
        precondition(originalSize.count == b && cropTopLeft.count == b && targetSize.count == b,
                     "y: one original size, crop and target size per batch row (\(b))")
        var values: [Float] = []
        values.reserveCapacity(6 * b)
        for i in 0..<b {
            values += [originalSize[i].h, originalSize[i].w, cropTopLeft[i].top, cropTopLeft[i].left,
                       targetSize[i].h, targetSize[i].w].map(Float.init)
        }
        let embedded = t.timestepEmbedding(Var(Tensor(shape: [6 * b], values)), dim: embedDim)   // [6B, D]
        return t.concat([pooled, t.reshape(embedded, [b, 6 * embedDim])], axis: 1)
    }

    /// Encodes chunked ids with both encoders and stitches long captions as kohya does → (context [B, 75n+2, 2048],
    /// pooled [B, P]).
    ///
    /// idsL / idsG: per prompt, n chunks of `positions` (77) ids each (<BOS> 75 ids <EOS or PAD>), n the same for
    /// every prompt and both encoders (n = max_token_length / 75: 1, 2 or 3). Every chunk is encoded on its own;
    /// kohya's get_hidden_states_sdxl (library/strategy_sdxl.py, library/train_util.py) then keeps chunk 0's
    /// position 0 (BOS), positions 1...75 of every chunk, and the last chunk's position 76 — 75n + 2 positions
    /// (n = 1: the 77 states unchanged) — and takes the pooled vector of each prompt's FIRST chunk
    /// (`pool2[::n_size]`). The two encoders' states are concatenated on the channel axis (kohya's
    /// `torch.cat([encoder_hidden_states1, encoder_hidden_states2], dim=2)`; sgm's GeneralConditioner "crossattn").
    public static func encode(_ t: Tape, l: CLIPTextEncoderL, g: OpenCLIPTextEncoderG, idsL: [[[Int]]],
                              idsG: [[[Int]]], checkpointing: Bool = false) -> (context: Var, pooled: Var) {
        let b = idsL.count, n = idsL.first?.count ?? 0
        let positions = l.config.positions
        precondition(b > 0 && n > 0, "encode: no prompts")
        precondition(idsG.count == b && zip(idsL, idsG).allSatisfy { $0.count == n && $1.count == n },
                     "encode: every prompt needs the same number of chunks (\(n)) for both encoders")
        precondition(g.config.positions == positions, "encode: the encoders' position counts differ")

        let rowsL = idsL.flatMap { $0 }, rowsG = idsG.flatMap { $0 }           // B·n rows, prompt-major
        precondition((rowsL + rowsG).allSatisfy { $0.count == positions }, "encode: every chunk must hold \(positions) ids")
        let hiddenL = l(t, ids: rowsL, checkpointing: checkpointing)             // [B·n, 77, CL]
        let (hiddenG, pooledAll) = g(t, ids: rowsG, checkpointing: checkpointing)                             // [B·n, 77, CG], [B·n, P]
        let chunks = t.concat([hiddenL, hiddenG], axis: 2)                       // [B·n, 77, CL + CG]
        guard n > 1 else { return (chunks, pooledAll) }

        let c = chunks.shape[2], p = pooledAll.shape[1]
        let joined = t.reshape(chunks, [b, n * positions, c])                    // [B, n·77, C]
        var pieces = [t.slice(joined, axis: 1, start: 0, length: 1)]             // BOS of chunk 0
        for i in 0..<n {                                                         // each chunk between BOS and its last slot
            pieces.append(t.slice(joined, axis: 1, start: i * positions + 1, length: positions - 2))
        }
        pieces.append(t.slice(joined, axis: 1, start: n * positions - 1, length: 1))   // last chunk's EOS / PAD
        let context = t.concat(pieces, axis: 1)                                  // [B, 75n + 2, C]
        let pooled = t.reshape(t.slice(t.reshape(pooledAll, [b, n, p]), axis: 1, start: 0, length: 1), [b, p])
        return (context, pooled)
    }
}
