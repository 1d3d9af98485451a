#!/usr/bin/env python3
"""Where PyTorch's time goes in one SDXL UNet inference forward (diffusers UNet2DConditionModel, SDXL config, random
weights; bench/unet_bench.py's model and inputs), under torch.profiler, by op kind — the counterpart of
`bench/unet_profile.py --mode forward` for the generation rows.

    python3 bench/generate/torch_profile.py [--latent 128] [--precision bf16-autocast|fp32] [--threads 2]

One warm-up forward, then one profiled forward (torch.no_grad). Prints a JSON line {"wall", "ops": {kind: self CPU s}}:
kinds = attention (aten::_scaled_dot_product_flash_attention_for_cpu and friends), matmul (aten::addmm/mm/bmm/linear
kernels, mkldnn matmul), conv (aten::convolution and its backends), the bf16/fp32 casts (aten::to/_to_copy/copy_), norms,
other.
"""
import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from unet_bench import SDXL_UNET_CONFIG  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

KINDS = [("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax", "baddbmm")),
         ("conv", ("convolution", "conv2d", "mkldnn_convolution", "_conv")),
         ("matmul", ("addmm", "aten::mm", "bmm", "linear", "matmul", "mkldnn_linear")),
         ("casts", ("aten::to", "_to_copy", "copy_")),
         ("norms", ("group_norm", "layer_norm", "native_group_norm", "native_layer_norm")),
         ("activations", ("gelu", "silu", "aten::mul", "aten::add", "aten::chunk"))]


def kind(name):
    for k, keys in KINDS:
        if any(key in name for key in keys):
            return k
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, default=128)
    ap.add_argument("--precision", choices=["fp32", "bf16-autocast"], default="bf16-autocast")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).eval()
    x = torch.randn(1, 4, a.latent, a.latent)
    ctx = torch.randn(1, 77, 2048)
    added = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]])}
    t = torch.tensor([500])
    ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16-autocast")
    with torch.no_grad(), ac:
        unet(x, t, ctx, added_cond_kwargs=added)
        from torch.profiler import ProfilerActivity, profile
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            unet(x, t, ctx, added_cond_kwargs=added)
        wall = time.perf_counter() - start
    ops = {}
    for e in prof.key_averages():
        ops[kind(e.key)] = ops.get(kind(e.key), 0) + e.self_cpu_time_total / 1e6
    top = sorted(((e.self_cpu_time_total / 1e6, e.key) for e in prof.key_averages()), reverse=True)[:12]
    print(json.dumps({"side": "torch", "precision": a.precision, "latent": a.latent, "wall": wall,
                      "ops": {k: round(v, 3) for k, v in sorted(ops.items(), key=lambda kv: -kv[1])},
                      "top": [[round(s, 3), k] for s, k in top], "torch": torch.__version__}))


if __name__ == "__main__":
    main()
