"""Golden fixture for one kohya LoRA training step and 10 AdamW steps on the tiny SDXL UNet
(Tests/TrainingTests). PyTorch 2.13 (CPU, float32) + diffusers 0.42; run from the repository root:

    python3 Tests/Fixtures/training/make_train_step.py

Model: Tests/Fixtures/sdxl/unet_tiny.safetensors (LDM keys) loaded into the diffusers UNet of
Tests/Fixtures/sdxl/make_unet.py, frozen. LoRA (kohya networks/lora.py, see kohya_lora.py): Linear
targets of every Transformer2DModel at rank 4 / alpha 2 (scale 0.5), and — conv_dim 2 / conv_alpha 1 —
the ResBlocks' 3×3 convs (in_layers.2, out_layers.3), Downsample op, Upsample conv at rank 2 / alpha 1
(scale 0.5), their 1×1 skip_connection and emb_layers.1 at rank 4 / alpha 2. Multiplier 1, no dropout.

Initial LoRA weights: lora_down kaiming_uniform_(a=√5) as kohya (U(±1/√fan_in), fan_in = in·k·k);
lora_up NOT zero as kohya's (so that every lora_down gradient is nonzero): N(0, 0.05²). Both from one
torch.Generator seeded 20260 in module order. The test loads them from the file; it need not redo them.

The step (kohya train_network.py process_batch + post_process_loss, SDXL, batch 2):
  noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, clip_sample=False)
  all_snr[t] = alphas_cumprod[t] / (1 - alphas_cumprod[t])
  noisy_latents = sqrt(ᾱ_t)·latents + sqrt(1-ᾱ_t)·noise                    (add_noise)
  model_pred = UNet(noisy_latents, timesteps, context, y)                  (y: the LDM label vector)
  target = noise  (eps)  |  sqrt(ᾱ_t)·noise − sqrt(1-ᾱ_t)·latents  (v: get_velocity)
  loss = mse(model_pred, target, reduction="none").mean([1,2,3])           [2]
  loss = loss · min(snr_t, γ) / snr_t   (eps, γ=5)   |  · min(snr_t, γ) / (snr_t + 1)   (v, γ=1.5)
  loss = loss.mean()
  gradient of loss w.r.t. every lora_down / lora_up weight.
AdamW: torch.optim.AdamW(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01) over all LoRA
weights (one group, no clipping, constant lr), 10 steps of the eps loss on the same latents/context/y,
step k using noise_steps[k] and timesteps_steps[k]; torch's AdamW: p ← p·(1 − lr·wd); m, v moments;
p ← p − lr·m̂ / (sqrt(v̂) + eps) with m̂ = m/(1−β1^k), v̂ = v/(1−β2^k). adamw.losses[k] is the loss
computed before update k (on the weights after k updates).

Output train_step.safetensors (all F32 except the timesteps, I64; shapes for this tiny model):
  <lora>.lora_down.weight      [r, in] or [r, in, 3, 3]; <lora>.lora_up.weight [out, r] or [out, r, 1, 1];
  <lora>.alpha                 []     — the initial LoRA, kohya names (see "modules" in metadata)
  latents [2,4,16,16], noise [2,4,16,16], timesteps [2] (I64), context [2,11,24], y [2,64]
                               — latents/noise/timesteps fresh (seed 99); context and y from unet_io
  noisy_latents [2,4,16,16], snr [2] (all_snr[timesteps])
  eps.model_pred [2,4,16,16] (eps target = noise); eps.loss_per_sample [2] (after the SNR weight); eps.loss []
  eps.grad.<lora>.lora_down.weight, eps.grad.<lora>.lora_up.weight   (same shapes as the weights)
  v.target, v.model_pred, v.loss_per_sample, v.loss    the v-prediction case (γ 1.5), and
  v.grad.<lora>.lora_down.weight / .lora_up.weight for the 7 modules of V_GRAD_MODULES (metadata
                               "v_grad_modules"): one of each kind, the file size budget allows no more
  adamw.noise_steps [10,2,4,16,16], adamw.timesteps_steps [10,2] (I64), adamw.losses [10]
  adamw.final.<lora>.lora_down.weight / .lora_up.weight            the weights after 10 updates
Metadata: "settings" (JSON: every number above), "modules" (JSON list of [lora name, kind, rank, alpha]
with kind "linear" | "conv1x1" | "conv3x3"), "code".
"""

import json
import os
import sys

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kohya_lora  # noqa: E402

HERE = kohya_lora.HERE
SETTINGS = {
    "network_dim": 4, "network_alpha": 2.0, "conv_dim": 2, "conv_alpha": 1.0, "multiplier": 1.0,
    "init": {"lora_down": "kaiming_uniform_(a=sqrt(5))", "lora_up": "normal(0, 0.05^2)", "seed": 20260},
    "noise_scheduler": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                        "num_train_timesteps": 1000, "clip_sample": False},
    "loss_type": "l2", "eps": {"min_snr_gamma": 5.0}, "v_parameterization": {"min_snr_gamma": 1.5},
    "adamw": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "steps": 10,
              "max_grad_norm": None},
    "inputs_seed": 99, "context_y_from": "Tests/Fixtures/sdxl/unet_io.safetensors",
}
UP_STD = 0.05
# The v-prediction case differs from eps only in the target and the SNR weight, i.e. in the seed of the
# backward pass; its gradients are stored for one module of each kind (all of them would push the file
# over its size budget — the eps case stores every gradient).
V_GRAD_MODULES = (
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",   # Linear on the context
    "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj",  # GEGLU projection
    "lora_unet_input_blocks_4_0_in_layers_2",                       # ResBlock 3×3 conv
    "lora_unet_input_blocks_4_0_skip_connection",                   # 1×1 conv
    "lora_unet_output_blocks_3_0_emb_layers_1",                     # time-embedding Linear
    "lora_unet_input_blocks_3_0_op",                                # Downsample (stride 2)
    "lora_unet_output_blocks_2_2_conv",                             # Upsample conv
)


def all_snr(scheduler):
    # kohya custom_train_functions.prepare_scheduler_for_custom_training
    a = torch.sqrt(scheduler.alphas_cumprod)
    s = torch.sqrt(1.0 - scheduler.alphas_cumprod)
    return (a / s) ** 2


def step_loss(model, scheduler, snr_table, latents, noise, timesteps, context, y, v_pred, gamma):
    """kohya: noisy latents, prediction, target, mse(none).mean([1,2,3]), apply_snr_weight, mean."""
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = kohya_lora.unet_forward(model, noisy, timesteps, context, y)
    target = scheduler.get_velocity(latents, noise, timesteps) if v_pred else noise
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, loss.ndim)))
    snr = torch.stack([snr_table[t] for t in timesteps])
    min_snr_gamma = torch.minimum(snr, torch.full_like(snr, gamma))
    weight = torch.div(min_snr_gamma, snr + 1) if v_pred else torch.div(min_snr_gamma, snr)
    loss = loss * weight
    return loss.mean(), {"noisy_latents": noisy, "target": target, "model_pred": pred, "loss_per_sample": loss,
                         "snr": snr}


def make_network(model):
    net = kohya_lora.LoRANetwork(model, SETTINGS["network_dim"], SETTINGS["network_alpha"],
                                 SETTINGS["conv_dim"], SETTINGS["conv_alpha"], SETTINGS["multiplier"])
    gen = torch.Generator().manual_seed(SETTINGS["init"]["seed"])
    for lora in net.loras:
        lora.init_kohya(gen)  # kohya's down init (and zero up) …
        with torch.no_grad():  # … then a nonzero up so that the down gradients are nonzero
            lora.lora_up.weight.copy_(UP_STD * torch.randn(lora.lora_up.weight.shape, generator=gen))
    net.apply_to()
    return net


def main():
    torch.manual_seed(0)
    model = kohya_lora.load_tiny_unet()
    net = make_network(model)
    init = net.state_dict_kohya()

    scheduler = DDPMScheduler(**SETTINGS["noise_scheduler"])
    snr_table = all_snr(scheduler)

    with safe_open(kohya_lora.UNET_IO, "pt") as f:
        context, y = f.get_tensor("context"), f.get_tensor("y")
    gen = torch.Generator().manual_seed(SETTINGS["inputs_seed"])
    latents = torch.randn(2, 4, 16, 16, generator=gen)
    noise = torch.randn(2, 4, 16, 16, generator=gen)
    # One low timestep (SNR ≫ γ: the min-SNR weight is active) and one high (SNR < γ: weight 1 for eps).
    timesteps = torch.tensor([37, 612], dtype=torch.long)
    noise_steps = torch.randn(10, 2, 4, 16, 16, generator=gen)
    timesteps_steps = torch.randint(0, 1000, (10, 2), generator=gen)

    out = dict(init)
    out.update({"latents": latents, "noise": noise, "timesteps": timesteps, "context": context, "y": y})
    params = list(net.named_lora_parameters())
    for p_name, p in params:
        p.requires_grad_(True)

    for prefix, v_pred, gamma in (("eps", False, SETTINGS["eps"]["min_snr_gamma"]),
                                  ("v", True, SETTINGS["v_parameterization"]["min_snr_gamma"])):
        for _, p in params:
            p.grad = None
        loss, parts = step_loss(model, scheduler, snr_table, latents, noise, timesteps, context, y, v_pred, gamma)
        loss.backward()
        out["noisy_latents"], out["snr"] = parts["noisy_latents"], parts["snr"]
        if v_pred:  # the eps target is `noise` itself (safetensors refuses to store one tensor twice)
            out[f"{prefix}.target"] = parts["target"]
        out[f"{prefix}.model_pred"] = parts["model_pred"]
        out[f"{prefix}.loss_per_sample"] = parts["loss_per_sample"]
        out[f"{prefix}.loss"] = loss.reshape(())
        for name, p in params:
            assert p.grad is not None and p.grad.abs().max() > 0, f"{prefix}: zero gradient for {name}"
            if not v_pred or name.rsplit(".", 2)[0] in V_GRAD_MODULES:
                out[f"{prefix}.grad.{name}"] = p.grad.clone()
        print(f"{prefix}: loss {loss.item():.6f}, snr {parts['snr'].tolist()}")

    # The same 10 losses without updates: the AdamW losses must differ from these by far more than the
    # test tolerance, else matching them would not test the optimizer.
    with torch.no_grad():
        frozen = [step_loss(model, scheduler, snr_table, latents, noise_steps[k], timesteps_steps[k], context, y,
                            False, SETTINGS["eps"]["min_snr_gamma"])[0].item() for k in range(10)]

    # 10 AdamW steps on the eps loss.
    opt = torch.optim.AdamW([p for _, p in params], lr=SETTINGS["adamw"]["lr"], betas=tuple(SETTINGS["adamw"]["betas"]),
                            eps=SETTINGS["adamw"]["eps"], weight_decay=SETTINGS["adamw"]["weight_decay"])
    losses = []
    for k in range(SETTINGS["adamw"]["steps"]):
        opt.zero_grad(set_to_none=True)
        loss, _ = step_loss(model, scheduler, snr_table, latents, noise_steps[k], timesteps_steps[k], context, y,
                            False, SETTINGS["eps"]["min_snr_gamma"])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print("adamw losses", [f"{x:.6f}" for x in losses])
    effect = max(abs(a - b) / abs(b) for a, b in zip(losses[1:], frozen[1:]))
    print(f"largest relative effect of the updates on a loss: {effect:.2e}")
    assert effect > 1e-3, effect
    out["adamw.noise_steps"] = noise_steps
    out["adamw.timesteps_steps"] = timesteps_steps
    out["adamw.losses"] = torch.tensor(losses)
    for name, p in params:
        out[f"adamw.final.{name}"] = p.detach().clone()
        assert not torch.equal(p.detach(), init[name]), name

    modules = []
    for lora in net.loras:
        w = lora.lora_down.weight
        kind = "linear" if w.dim() == 2 else ("conv1x1" if w.shape[-1] == 1 else "conv3x3")
        modules.append([lora.lora_name, kind, lora.lora_dim, float(lora.alpha)])
    names = {m[0] for m in modules}
    assert all(n in names for n in V_GRAD_MODULES), [n for n in V_GRAD_MODULES if n not in names]
    meta = {"settings": json.dumps(SETTINGS), "modules": json.dumps(modules),
            "v_grad_modules": json.dumps(list(V_GRAD_MODULES)),
            "unet_config": kohya_lora.tiny_config_json(),
            "code": "Tests/Fixtures/training/make_train_step.py (kohya train_network.py loss on the "
                    "diffusers UNet with kohya LoRAModule wrappers)"}
    out = {k: v.detach().contiguous() for k, v in out.items()}
    path = os.path.join(HERE, "train_step.safetensors")
    save_file(out, path, metadata=meta)
    n_lin = sum(m[1] != "conv3x3" for m in modules)
    print(f"{len(modules)} LoRA modules ({n_lin} linear/1x1, {len(modules) - n_lin} 3x3), "
          f"{sum(p.numel() for _, p in params)} parameters; {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
