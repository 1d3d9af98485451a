#!/usr/bin/env python3
"""PyTorch/diffusers side of the SDXL UNet benchmark: one case per process (peak RSS is the case's own).

    python3 bench/unet_bench.py --latent 64 --mode backward [--precision fp32|bf16-autocast]
                                [--checkpointing] [--steps 3] [--warmup 1] [--threads 2]

The model is diffusers' UNet2DConditionModel with the SDXL base configuration (built here in code, the
config of stabilityai/stable-diffusion-xl-base-1.0's unet/config.json), random weights (see build_unet), fp32 parameters,
frozen (requires_grad False), attention through diffusers' default AttnProcessor2_0 (SDPA).

--mode forward:  unet(x, t, context, added_cond_kwargs) under torch.no_grad() (inference).
--mode backward: x and context require grad; torch.autograd.grad(out, (x, context), g) with g ~ N(0, 1):
                 the same input gradients as lora-dist-unet-bench (no weight gradients).
--precision bf16-autocast: the same under torch.autocast("cpu", dtype=torch.bfloat16) (weights stay fp32;
                 autocast casts them per op), a reference column.
--checkpointing: unet.enable_gradient_checkpointing() (diffusers checkpoints every ResNet block and every
                 transformer block, torch.utils.checkpoint with use_reentrant=False).

Inputs: x, g [1, 4, L, L], context [1, 77, 2048], text_embeds [1, 1280], time_ids [1, 6] ~ N(0, 1) (the
time ids 1024/0 as SDXL uses), timestep 500. Prints JSON lines like lora-dist-unet-bench: info, then one
{"side":"torch",..,"case":…,"samples":[…],"forward_samples":[…],"backward_samples":[…],"peak_mb":…}.
"""
import argparse
import json
import sys
import time

import torch

SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    only_cross_attention=False,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),   # diffusers' name for the head count (head size 64)
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    upcast_attention=False,
)


def proc_status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def emit(obj):
    print(json.dumps(obj), flush=True)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def build_unet():
    """The SDXL UNet with random fp32 weights. Built on the meta device and filled in place from one
    pool of 16 M uniform numbers (PyTorch's default init of 2.6 B parameters, like any per-element
    generator, takes ~40 s on 2 cores; this takes a few; timings do not depend on the values).
    Weights ~U(±1/√fan_in) (the bound of nn.Linear/nn.Conv2d's default kaiming-uniform init), norm
    scales 1, biases 0."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    unet.to_empty(device="cpu")
    if list(unet.buffers()):
        raise SystemExit("unexpected buffers in the UNet: to_empty leaves them uninitialised")
    pool = torch.rand([1 << 24], generator=torch.Generator().manual_seed(0)) * 2 - 1   # U(-1, 1)
    offset = 0
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() >= 2:
                bound = 1.0 / (p[0].numel() ** 0.5)
                flat, done = p.view(-1), 0
                while done < flat.numel():
                    take = min(flat.numel() - done, pool.numel() - offset)
                    torch.mul(pool[offset:offset + take], bound, out=flat[done:done + take])
                    done += take
                    offset = (offset + take) % pool.numel()
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
    unet.set_attn_processor(AttnProcessor2_0())       # the default already; explicit so the bench says what it runs
    unet.requires_grad_(False)
    return unet


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--mode", choices=["forward", "backward"], default="backward")
    ap.add_argument("--precision", choices=["fp32", "bf16-autocast"], default="fp32")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    import diffusers
    emit({"side": "torch", "info": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                                    "threads": torch.get_num_threads()}})
    t0 = time.perf_counter()
    unet = build_unet()
    load_s = time.perf_counter() - t0
    params = sum(p.numel() for p in unet.parameters())
    if a.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train(a.checkpointing)   # no dropout in SDXL; train() only so checkpointing is unambiguous
    rss_loaded = proc_status_kb("VmRSS")

    g = torch.Generator().manual_seed(1)
    lat = a.latent
    grad = a.mode == "backward"
    x = torch.randn([1, 4, lat, lat], generator=g).requires_grad_(grad)
    ctx = torch.randn([1, 77, 2048], generator=g).requires_grad_(grad)
    text_embeds = torch.randn([1, 1280], generator=g)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])
    timestep = torch.tensor([500.0])
    seed = torch.randn([1, 4, lat, lat], generator=g)
    cond = {"text_embeds": text_embeds, "time_ids": time_ids}

    def forward():
        if a.precision == "bf16-autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return unet(x, timestep, ctx, added_cond_kwargs=cond).sample
        return unet(x, timestep, ctx, added_cond_kwargs=cond).sample

    total, fwd, bwd = [], [], []
    out_mean_abs = dx_mean_abs = dc_mean_abs = 0.0
    for step in range(a.warmup + a.steps):
        s0 = time.perf_counter()
        if grad:
            out = forward()
            s1 = time.perf_counter()
            dx, dc = torch.autograd.grad(out, (x, ctx), seed.to(out.dtype))
            s2 = time.perf_counter()
            if step == 0:
                dx_mean_abs, dc_mean_abs = dx.float().abs().mean().item(), dc.float().abs().mean().item()
            del dx, dc
        else:
            with torch.no_grad():
                out = forward()
            s1 = s2 = time.perf_counter()
        if step == 0:
            out_mean_abs = out.float().abs().mean().item()
        del out
        kind = "warm-up" if step < a.warmup else "step"
        log(f"{kind} {step}: forward {s1 - s0:.2f} s, backward {s2 - s1:.2f} s, "
            f"RSS {proc_status_kb('VmRSS') // 1024} MB, peak {proc_status_kb('VmHWM') // 1024} MB")
        if step >= a.warmup:
            total.append(s2 - s0)
            fwd.append(s1 - s0)
            bwd.append(s2 - s1)

    name = f"{a.mode}{'+ckpt' if a.checkpointing else ''}:{lat}"
    emit({"side": "torch", "precision": a.precision, "case": name,
          "samples": [round(t, 4) for t in total], "forward_samples": [round(t, 4) for t in fwd],
          "backward_samples": [round(t, 4) for t in bwd],
          "peak_mb": proc_status_kb("VmHWM") // 1024, "rss_loaded_mb": rss_loaded // 1024,
          "rss_end_mb": proc_status_kb("VmRSS") // 1024, "load_s": round(load_s, 2), "params": params,
          "out_mean_abs": out_mean_abs, "dx_mean_abs": dx_mean_abs, "dcontext_mean_abs": dc_mean_abs})


if __name__ == "__main__":
    main()
