"""Golden fixture for the bf16 kernel family: the kohya LoRA step of make_train_step.py (same tiny UNet, same
initial LoRA, same inputs, read from train_step.safetensors) under torch.autocast("cpu", dtype=torch.bfloat16), as
kohya runs `mixed_precision = "bf16"` (accelerate's autocast around the UNet forward; LoRA weights, gradients and
AdamW state stay fp32). PyTorch 2.15 (CPU) + diffusers; run from the repository root after make_train_step.py:

    python3 Tests/Fixtures/training/make_train_step_bf16.py

Output train_step_bf16.safetensors (F32):
  eps.loss [], eps.loss_per_sample [2]          the eps step (min-SNR γ 5) under autocast
  eps.grad.<lora>.lora_down.weight / .lora_up.weight   every LoRA gradient of it
  adamw.losses [10]                             10 AdamW steps (lr 1e-3, wd 0.01) under autocast, the noise and
                                                timesteps of train_step.safetensors' adamw.* inputs
Metadata: "fp32_vs_bf16" (JSON): PyTorch's own bf16-vs-fp32 differences on this step — the loss's (relative), the
worst module gradient's (largest element difference / largest element), all gradients' (‖Δ‖/‖g‖ over the flat
vector), the AdamW losses' — the scale of rounding a bf16 step has at all; "code".
"""
import json
import os
import sys

import torch
from diffusers import DDPMScheduler
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kohya_lora  # noqa: E402
import make_train_step as base  # noqa: E402

HERE = kohya_lora.HERE


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def main():
    torch.manual_seed(0)
    model = kohya_lora.load_tiny_unet()
    net = base.make_network(model)
    fixture = os.path.join(HERE, "train_step.safetensors")
    with safe_open(fixture, "pt") as f:
        ref = {k: f.get_tensor(k) for k in f.keys()}
    with torch.no_grad():  # the committed initial LoRA (make_network draws the same; checked here)
        for name, p in net.named_lora_parameters():
            assert torch.equal(p, ref[name]), name
    scheduler = DDPMScheduler(**base.SETTINGS["noise_scheduler"])
    snr_table = base.all_snr(scheduler)
    args = [ref["latents"], None, None, ref["context"], ref["y"]]
    params = list(net.named_lora_parameters())
    for _, p in params:
        p.requires_grad_(True)
    gamma = base.SETTINGS["eps"]["min_snr_gamma"]

    out, diffs = {}, {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, parts = base.step_loss(model, scheduler, snr_table, ref["latents"], ref["noise"], ref["timesteps"],
                                     ref["context"], ref["y"], False, gamma)
    loss.backward()
    out["eps.loss"] = loss.detach().float().reshape(())
    out["eps.loss_per_sample"] = parts["loss_per_sample"].detach().float()
    worst, num, den = 0.0, 0.0, 0.0
    for name, p in params:
        out[f"eps.grad.{name}"] = p.grad.clone().float()
        worst = max(worst, rel(p.grad, ref[f"eps.grad.{name}"]))
        num += (p.grad - ref[f"eps.grad.{name}"]).pow(2).sum().item()
        den += ref[f"eps.grad.{name}"].pow(2).sum().item()
    diffs["gradients_rms"] = (num / den) ** 0.5
    diffs["loss"] = abs(loss.item() - ref["eps.loss"].item()) / ref["eps.loss"].item()
    diffs["worst_gradient"] = worst
    print(f"bf16 eps loss {loss.item():.6f} (fp32 {ref['eps.loss'].item():.6f}); worst gradient vs fp32 {worst:.3e}")

    opt = torch.optim.AdamW([p for _, p in params], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    losses = []
    for k in range(10):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = base.step_loss(model, scheduler, snr_table, ref["latents"], ref["adamw.noise_steps"][k],
                                     ref["adamw.timesteps_steps"][k], ref["context"], ref["y"], False, gamma)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    out["adamw.losses"] = torch.tensor(losses)
    diffs["adamw_losses"] = rel(out["adamw.losses"], ref["adamw.losses"])
    print("bf16 adamw losses", [f"{x:.6f}" for x in losses], f"vs fp32 {diffs['adamw_losses']:.3e}")
    meta = {"fp32_vs_bf16": json.dumps(diffs), "torch": torch.__version__,
            "code": "Tests/Fixtures/training/make_train_step_bf16.py (make_train_step.py's step under "
                    "torch.autocast('cpu', bfloat16))"}
    path = os.path.join(HERE, "train_step_bf16.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path, metadata=meta)
    print(f"{os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
