"""Golden cases for linear, matmul, broadcasting arithmetic, reductions, shape ops, embeddings and the loss."""
import math

import torch
import torch.nn.functional as F


def timestep_embedding(t, dim, max_period=10000):
    # sgm/modules/diffusionmodules/util.py timestep_embedding (repeat_only=False), as SDXL uses it
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def cases(save):
    r = torch.randn
    save("linear_bias", lambda x, w, b: F.linear(x, w, b),
         {"x": r(2, 5, 24), "w": r(40, 24), "b": r(40)})
    save("linear_nobias", lambda x, w: F.linear(x, w), {"x": r(7, 33), "w": r(17, 33)})
    for ta in (False, True):
        for tb in (False, True):
            a = r(19, 13) if ta else r(13, 19)
            b = r(11, 19) if tb else r(19, 11)
            save(f"matmul_{int(ta)}{int(tb)}",
                 lambda a, b, ta=ta, tb=tb: (a.t() if ta else a) @ (b.t() if tb else b),
                 {"a": a, "b": b}, args={"transA": ta, "transB": tb})
    save("add_bcast_nc11", lambda a, b: a + b, {"a": r(2, 6, 5, 7), "b": r(2, 6, 1, 1)})
    save("add_bcast_last", lambda a, b: a + b, {"a": r(3, 4, 9), "b": r(9)})
    save("add_bcast_both", lambda a, b: a + b, {"a": r(3, 1, 5), "b": r(4, 1)})
    save("sub_bcast", lambda a, b: a - b, {"a": r(2, 3, 4), "b": r(1, 3, 1)})
    save("mul_bcast", lambda a, b: a * b, {"a": r(2, 6, 5, 7), "b": r(1, 6, 1, 7)})
    save("mul_scalar_tensor", lambda a, b: a * b, {"a": r(4, 10), "b": r(1)})
    save("scale", lambda x: x * -0.37, {"x": r(3, 8)}, args={"s": -0.37})
    save("sum_axes", lambda x: x.sum(dim=(1, 3), keepdim=True), {"x": r(2, 3, 4, 5)}, args={"axes": [1, 3]})
    save("mean_all", lambda x: x.mean(), {"x": r(3, 4, 5)})
    save("permute_0213", lambda x: x.permute(0, 2, 1, 3).contiguous(), {"x": r(2, 3, 4, 5)}, args={"order": [0, 2, 1, 3]})
    save("permute_nchw_nhwc", lambda x: x.permute(0, 2, 3, 1).contiguous(), {"x": r(2, 6, 3, 4)}, args={"order": [0, 2, 3, 1]})
    save("concat_channels", lambda a, b: torch.cat([a, b], dim=1), {"a": r(2, 3, 4, 5), "b": r(2, 6, 4, 5)}, args={"axis": 1})
    save("slice_mid", lambda x: x[:, 2:7, :], {"x": r(3, 9, 4)}, args={"axis": 1, "start": 2, "length": 5})
    ids = torch.tensor([3, 0, 7, 3, 5, 9])
    save("embedding", lambda table, ids: F.embedding(ids, table), {"table": r(10, 16)}, indices={"ids": ids})
    t = torch.tensor([0.0, 1.0, 17.0, 999.0, 1024.0, 512.0])
    save("timestep_embedding_320", lambda t: timestep_embedding(t, 320), {"t": t}, args={"dim": 320})
    save("timestep_embedding_256", lambda t: timestep_embedding(t, 256), {"t": t}, args={"dim": 256})
    # kohya train_network.py: loss = mse(none).mean([1,2,3]) * weights; loss.mean()
    save("weighted_mse",
         lambda pred, target, weights: (F.mse_loss(pred, target, reduction="none").mean([1, 2, 3]) * weights).mean(),
         {"pred": r(3, 4, 5, 6), "target": r(3, 4, 5, 6), "weights": torch.rand(3) + 0.5})
