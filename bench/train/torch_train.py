#!/usr/bin/env python3
"""PyTorch side of the training-step benchmark (bench/train/): one LoRA training step with diffusers + peft, one
case per process (so the peak RSS is the case's own).

    python3 bench/train/torch_train.py --preset sdxl|tiny [--latent 64] [--batch 1] [--rank 16] [--alpha 16]
                                       [--precision fp32|bf16-autocast] [--checkpointing] [--steps 3]
                                       [--warmup 1] [--threads 2]

Model: diffusers UNet2DConditionModel, random weights, fp32 parameters, frozen:
  sdxl  the SDXL base config, built as bench/unet_bench.py builds it (build_unet, reused);
  tiny  lora-dist's `tiny` preset (SDXLPreset.tiny: context 80, adm 96), built with Tests/Fixtures/sdxl/make_unet.py's
        build_model and reinit.
LoRA: peft LoraConfig(r, lora_alpha, target_modules = every Linear inside the transformer blocks: to_q, to_k, to_v,
  to_out.0, proj_in, proj_out, ff.net.0.proj, ff.net.2) added with diffusers' unet.add_adapter — kohya's default
  UNet targets, 722 modules on SDXL (checked below against the lora-dist count passed as --expect-modules).
A step, as TrainBench's: zero the LoRA gradients, forward, MSE loss against the noise (fp32), backward (to the LoRA
  weights only), clip_grad_norm_(1.0), torch.optim.AdamW (lr 1e-4) over the LoRA parameters.
  --precision bf16-autocast runs forward + loss under torch.autocast("cpu", bfloat16) (weights stay fp32);
  bf16-kohya also casts the frozen UNet to bf16 first (kohya's weight_dtype for mixed_precision = "bf16").
  --checkpointing: unet.enable_gradient_checkpointing().
Inputs: x0, noise [B, 4, L, L], context [B, 77, ctx], text_embeds, time_ids ~ N(0, 1); timestep 500; noisy latents
  from diffusers' DDPMScheduler with kohya's schedule (scaled_linear 0.00085 → 0.012, 1000 steps).
Prints JSON lines: info, then {"side":"torch","precision":…,"case":…,"samples":[…],"optimizer_samples":[…],
  "peak_mb":…,"rss_loaded_mb":…,"modules":…,"lora_params":…,"losses":[…]} (peak_mb = VmHWM, weights included).
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "Tests", "Fixtures", "sdxl"))

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


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


def build(preset):
    """(unet, context dim, pooled text-embedding dim) with random frozen fp32 weights."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    if preset == "sdxl":
        from unet_bench import build_unet, SDXL_UNET_CONFIG
        return build_unet(), SDXL_UNET_CONFIG["cross_attention_dim"], 1280
    import make_unet
    # lora-dist's `tiny` preset (SDXLPreset.tiny, what `make-model --preset tiny` and builtin:tiny write): the
    # fixture's UNetConfig.tiny widened to the tiny text encoders, context 32 + 48 = 80, adm 48 pooled + 6 × 8.
    context_dim, pooled_dim = 80, 48
    unet = make_unet.build_model(context_dim=context_dim, adm_in=pooled_dim + 6 * make_unet.TIME_ID_DIM)
    make_unet.reinit(unet, 0)
    unet.set_attn_processor(AttnProcessor2_0())
    unet.requires_grad_(False)
    return unet, context_dim, pooled_dim


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=["sdxl", "tiny"], default="sdxl")
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--precision", choices=["fp32", "bf16-autocast", "bf16-kohya"], default="fp32")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--count-flops", action="store_true", help="count the step's FLOPs (FlopCounterMode) on an extra untimed step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--expect-modules", type=int, default=None,
                    help="fail unless peft wrapped exactly this many Linear modules (lora-dist's count)")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    import diffusers
    import peft
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer
    from diffusers import DDPMScheduler
    emit({"side": "torch", "info": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                                    "peft": peft.__version__, "threads": torch.get_num_threads()}})
    t0 = time.perf_counter()
    unet, ctx_dim, pooled_dim = build(a.preset)
    unet.add_adapter(LoraConfig(r=a.rank, lora_alpha=a.alpha, init_lora_weights=True, target_modules=TARGETS))
    modules = sum(1 for m in unet.modules() if isinstance(m, LoraLayer))
    params = [p for p in unet.parameters() if p.requires_grad]
    lora_params = sum(p.numel() for p in params)
    if a.expect_modules is not None and modules != a.expect_modules:
        raise SystemExit(f"peft wrapped {modules} modules, lora-dist has {a.expect_modules}: the targets differ")
    if a.precision == "bf16-kohya":
        # kohya's mixed_precision = "bf16" for a LoRA: the frozen UNet is cast to bf16 once (weight_dtype), the LoRA
        # stays fp32, and the forward runs under autocast.
        for p in unet.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    if a.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    load_s = time.perf_counter() - t0
    rss_loaded = proc_status_kb("VmRSS")

    g = torch.Generator().manual_seed(1)
    b, lat = a.batch, a.latent
    x0 = torch.randn([b, 4, lat, lat], generator=g)
    noise = torch.randn([b, 4, lat, lat], generator=g)
    ctx = torch.randn([b, 77, ctx_dim], generator=g)
    cond = {"text_embeds": torch.randn([b, pooled_dim], generator=g),
            "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * b)}
    timesteps = torch.full([b], 500, dtype=torch.long)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    noisy = sched.add_noise(x0, noise, timesteps)

    def loss_fn():
        pred = unet(noisy, timesteps, ctx, added_cond_kwargs=cond).sample
        return F.mse_loss(pred.float(), noise)

    flops = None
    if a.count_flops:
        # The step's matrix work as PyTorch counts it (mm/bmm/addmm/conv/attention, forward + the backward that runs:
        # frozen weights get no weight gradient), on one untimed step before the others.
        from torch.utils.flop_counter import FlopCounterMode
        counter = FlopCounterMode(display=False)
        with counter:
            if a.precision != "fp32":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = loss_fn()
            else:
                loss = loss_fn()
            loss.backward()
        flops = counter.get_total_flops()
        opt.zero_grad(set_to_none=True)
        del loss
        log(f"counted {flops / 1e12:.3f} TFLOP per step")

    total, opt_times, losses = [], [], []
    for step in range(a.warmup + a.steps):
        s0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if a.precision in ("bf16-autocast", "bf16-kohya"):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn()
        else:
            loss = loss_fn()
        loss.backward()
        s1 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        s2 = time.perf_counter()
        losses.append(loss.item())
        kind = "warm-up" if step < a.warmup else "step"
        log(f"{kind} {step}: step {s2 - s0:.2f} s (of which clip + AdamW {s2 - s1:.3f} s), loss {losses[-1]:.5f}, "
            f"RSS {proc_status_kb('VmRSS') // 1024} MB, peak {proc_status_kb('VmHWM') // 1024} MB")
        del loss
        if step >= a.warmup:
            total.append(s2 - s0)
            opt_times.append(s2 - s1)

    name = f"train{'+ckpt' if a.checkpointing else ''}:{lat}:b{b}:r{a.rank}"
    emit({"side": "torch", "precision": a.precision, "case": name,
          "samples": [round(t, 4) for t in total], "optimizer_samples": [round(t, 4) for t in opt_times],
          "peak_mb": proc_status_kb("VmHWM") // 1024, "rss_loaded_mb": rss_loaded // 1024,
          "rss_end_mb": proc_status_kb("VmRSS") // 1024, "load_s": round(load_s, 2), "modules": modules,
          "lora_params": lora_params, "losses": [round(v, 6) for v in losses], "flops": flops})


if __name__ == "__main__":
    main()
