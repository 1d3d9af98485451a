"""Golden fixture for one kohya LoRA training step that trains the text encoders too, and 10 AdamW steps with two
learning-rate groups (Tests/TrainingTests/TextEncoderLoRATests). PyTorch (CPU, float32) + transformers + diffusers;
run from the repository root:

    python3 Tests/Fixtures/training/make_te_step.py

Models (frozen): the tiny diffusers UNet of Tests/Fixtures/sdxl (unet_tiny.safetensors, context width 24, y width
16 + 6·8) and two tiny CLIP text towers made here so that they feed it: CLIP-L-like (transformers CLIPTextModel,
width 8, 3 layers, 2 heads, quick_gelu, pads with EOS) and bigG-like (CLIPTextModelWithProjection, width 16, 3 layers,
2 heads, gelu, projection 16, pads with 0), vocabulary 512 (BOS 510, EOS 511), weights from make_text.reinitialise.
They are stored in the single-file layout (CLIP-L under conditioner.embedders.0.transformer.text_model., bigG in
OpenCLIP names under conditioner.embedders.1.model. via make_text.to_openclip: fused in_proj, transposed
text_projection).

LoRA (kohya networks/lora.py, `LoRANetwork` for SDXL with train_text_encoder): UNet — the Linears of every
Transformer2DModel (no conv_dim) at rank 4 / alpha 2; text encoders — the Linears of every CLIPAttention and CLIPMLP
(q/k/v/out_proj, fc1, fc2) at rank 4 / alpha 2, named lora_te1_/lora_te2_ + the transformers module path
(`text_model.encoder.layers.N.self_attn.q_proj`, "." → "_"). Initial weights: lora_down kaiming_uniform_(a=√5),
lora_up N(0, 0.05²) (nonzero, so every gradient is), one generator seeded 20261, module order UNet, te1, te2.

The step (kohya train_network.py with the text encoders trained, SDXL; batch 2, max_token_length 75):
  hidden1 = te1(ids1, output_hidden_states).hidden_states[-2]     (kohya: hidden_states[11] of 12 layers — the same
                                                                   penultimate state; this tower has 3)
  out2 = te2(ids2, output_hidden_states); hidden2 = out2.hidden_states[-2]
  pool2 = make_text.kohya_pool_workaround(te2, out2.last_hidden_state, ids2, EOS)   (kohya's pool_workaround)
  context = cat([hidden1, hidden2], -1)                             [2, 77, 24]
  y = cat([pool2, size embedding of (orig h, w, crop top, left, target h, w)], -1)   [2, 64]
      (sgm/diffusers: sinusoidal 8-d embeddings, cos half first — diffusers get_timestep_embedding with
       flip_sin_to_cos=True, downscale_freq_shift=0; kohya's get_size_embeddings gives the same)
  then as make_train_step.py: add_noise, UNet, eps target, mse(none).mean([1,2,3]), min-SNR γ = 5, mean; backward.
  The pooled vector uses the OpenCLIP projection (x @ text_projection), what diffusers-layout kohya and every
  inference UI compute; kohya's single-file loader would use its transpose (see OpenCLIPTextEncoderG.PooledProjection).
AdamW (torch.optim.AdamW, betas 0.9/0.999, eps 1e-8, weight_decay 0.01) with kohya's groups: te1 and te2 at lr 2e-3
(text_encoder_lr), the UNet at lr 5e-4 (unet_lr); 10 steps with fresh noise/timesteps, same captions.

Output te_step.safetensors:
  the text towers' weights (single-file keys); ids1, ids2 [2, 77] (I64); orig/crop/target sizes [2, 6] (I64)
  <lora>.lora_down.weight / .lora_up.weight / .alpha           the initial LoRA (kohya names)
  latents, noise [2,4,16,16]; timesteps [2] (I64); context [2,77,24]; y [2,64]; loss []
  grad.<lora>.lora_down.weight / .lora_up.weight               every te1/te2 module, and the UNet modules of
                                                               metadata "unet_grad_modules"
  adamw.noise_steps [10,2,4,16,16], adamw.timesteps_steps [10,2] (I64), adamw.losses [10]
  adamw.final.<te lora>.lora_down.weight / .lora_up.weight     text-encoder weights after 10 updates
"""

import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.models.embeddings import get_timestep_embedding
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import kohya_lora  # noqa: E402
sys.path.insert(0, kohya_lora.SDXL_FIXTURES)
import make_text  # noqa: E402

VOCAB, BOS, EOS, POSITIONS = make_text.VOCAB, make_text.BOS, make_text.EOS, make_text.POSITIONS
CONFIG_L = dict(make_text.CONFIG_L, hidden_size=8, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2)
CONFIG_G = dict(make_text.CONFIG_G, hidden_size=16, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                projection_dim=16)
RANK, ALPHA, UP_STD, SEED = 4, 2.0, 0.05, 20261
LR_TE, LR_UNET = 2e-3, 5e-4
SIZE_DIM = 8
# UNet gradients stored (all te gradients are): cross-attention on the context, and the label embedding path is
# not a LoRA target, so these carry the text encoders' influence.
UNET_GRAD_MODULES = (
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v",
    "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj",
    "lora_unet_output_blocks_3_1_proj_out",
)
TE_CHILDREN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def te_loras(model, prefix):
    """kohya's text-encoder modules: every Linear child of CLIPAttention/CLIPMLP, named in transformers 4's tree
    (transformers 5 dropped the `text_model.` level of CLIPTextModel; kohya's names keep it)."""
    out = []
    for name, module in model.named_modules():
        if module.__class__.__name__ in ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"):
            for child_name, child in module.named_children():
                if isinstance(child, torch.nn.Linear):
                    path = name if name.startswith("text_model.") else "text_model." + name
                    lora_name = prefix + (path + "." + child_name).replace(".", "_")
                    out.append(kohya_lora.LoRAModule(lora_name, child, 1.0, RANK, ALPHA))
    return out


def size_embedding(sizes):
    """[B, 6] ints → [B, 6·SIZE_DIM] (diffusers add_time_proj / sgm ConcatTimestepEmbedderND)."""
    emb = get_timestep_embedding(sizes.flatten().float(), SIZE_DIM, flip_sin_to_cos=True, downscale_freq_shift=0)
    return emb.reshape(sizes.shape[0], -1)


def conditioning(te1, te2, ids1, ids2, sizes):
    out1 = te1(ids1, output_hidden_states=True, return_dict=True)
    out2 = te2(ids2, output_hidden_states=True, return_dict=True)
    pool2 = make_text.kohya_pool_workaround(te2, out2.last_hidden_state, ids2, EOS)
    context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    return context, torch.cat([pool2, size_embedding(sizes)], dim=-1)


def step_loss(unet, te1, te2, scheduler, snr_table, latents, noise, timesteps, ids1, ids2, sizes):
    context, y = conditioning(te1, te2, ids1, ids2, sizes)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = kohya_lora.unet_forward(unet, noisy, timesteps, context, y)
    loss = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=[1, 2, 3])
    snr = torch.stack([snr_table[t] for t in timesteps])
    loss = loss * torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    return loss.mean(), context, y


def main():
    torch.manual_seed(0)
    unet = kohya_lora.load_tiny_unet()
    te1 = CLIPTextModel(CLIPTextConfig(**CONFIG_L, attn_implementation="eager")).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CONFIG_G, attn_implementation="eager")).eval()
    make_text.reinitialise(te1, 11)
    make_text.reinitialise(te2, 12)
    for m in (unet, te1, te2):
        m.requires_grad_(False)
    weights = {make_text.PREFIX_L + k.removeprefix("text_model."): v.contiguous() for k, v in te1.state_dict().items()}
    weights.pop(make_text.PREFIX_L + "embeddings.position_ids", None)
    weights.update({make_text.PREFIX_G + k: v.contiguous() for k, v in make_text.to_openclip(te2.state_dict()).items()})

    unet_net = kohya_lora.LoRANetwork(unet, RANK, ALPHA)
    loras = list(unet_net.loras) + te_loras(te1, "lora_te1_") + te_loras(te2, "lora_te2_")
    assert sum(l.lora_name.startswith("lora_te1_") for l in loras) == 6 * 3
    assert sum(l.lora_name.startswith("lora_te2_") for l in loras) == 6 * 3
    gen = torch.Generator().manual_seed(SEED)
    for lora in loras:
        lora.init_kohya(gen)
        with torch.no_grad():
            lora.lora_up.weight.copy_(UP_STD * torch.randn(lora.lora_up.weight.shape, generator=gen))
        lora.apply_to()
    init = {}
    for lora in loras:
        init[f"{lora.lora_name}.lora_down.weight"] = lora.lora_down.weight.detach().clone()
        init[f"{lora.lora_name}.lora_up.weight"] = lora.lora_up.weight.detach().clone()
        init[f"{lora.lora_name}.alpha"] = lora.alpha.detach().clone()

    gen = torch.Generator().manual_seed(98)
    latents = torch.randn(2, 4, 16, 16, generator=gen)
    noise = torch.randn(2, 4, 16, 16, generator=gen)
    timesteps = torch.tensor([37, 612], dtype=torch.long)
    noise_steps = torch.randn(10, 2, 4, 16, 16, generator=gen)
    timesteps_steps = torch.randint(0, 1000, (10, 2), generator=gen)
    tokens = [torch.randint(0, 500, (n,), generator=gen).tolist() for n in (9, 30)]
    ids1 = torch.tensor([make_text.prompt_ids(t, EOS) for t in tokens])
    ids2 = torch.tensor([make_text.prompt_ids(t, 0) for t in tokens])
    # (orig h, w, crop top, left, target h, w): an image whose aspect differs from its bucket, and a plain one.
    sizes = torch.tensor([[1536, 1024, 0, 32, 1216, 832], [1024, 1024, 0, 0, 1024, 1024]])

    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False)
    snr_table = (scheduler.alphas_cumprod / (1 - scheduler.alphas_cumprod))
    params = [(f"{l.lora_name}.{part}.weight", getattr(l, part).weight) for l in loras for part in ("lora_down", "lora_up")]
    for _, p in params:
        p.requires_grad_(True)

    loss, context, y = step_loss(unet, te1, te2, scheduler, snr_table, latents, noise, timesteps, ids1, ids2, sizes)
    loss.backward()
    out = dict(weights)
    out.update(init)
    out.update({"ids1": ids1, "ids2": ids2, "sizes": sizes, "latents": latents, "noise": noise, "timesteps": timesteps,
                "context": context.detach(), "y": y.detach(), "loss": loss.detach().reshape(())})
    for name, p in params:
        module = name.rsplit(".", 2)[0]
        last_te1_layer = module.startswith(f"lora_te1_text_model_encoder_layers_{CONFIG_L['num_hidden_layers'] - 1}_")
        # te1's last layer feeds nothing SDXL uses (penultimate state): kohya trains it anyway, at zero gradient.
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        assert last_te1_layer or grad.abs().max() > 0, f"zero gradient for {name}"
        if module.startswith("lora_te") or module in UNET_GRAD_MODULES:
            out[f"grad.{name}"] = grad.clone()
    print(f"loss {loss.item():.6f}")

    te_params = [p for n, p in params if n.startswith("lora_te")]
    unet_params = [p for n, p in params if n.startswith("lora_unet_")]
    opt = torch.optim.AdamW([{"params": te_params, "lr": LR_TE}, {"params": unet_params, "lr": LR_UNET}],
                            lr=LR_UNET, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    losses = []
    for k in range(10):
        opt.zero_grad(set_to_none=True)
        l, _, _ = step_loss(unet, te1, te2, scheduler, snr_table, latents, noise_steps[k], timesteps_steps[k],
                            ids1, ids2, sizes)
        l.backward()
        opt.step()
        losses.append(l.item())
    print("adamw losses", [f"{x:.6f}" for x in losses])
    out["adamw.noise_steps"] = noise_steps
    out["adamw.timesteps_steps"] = timesteps_steps
    out["adamw.losses"] = torch.tensor(losses)
    for name, p in params:
        if name.startswith("lora_te"):
            out[f"adamw.final.{name}"] = p.detach().clone()

    meta = {"config_l": json.dumps(CONFIG_L), "config_g": json.dumps(CONFIG_G),
            "unet_grad_modules": json.dumps(list(UNET_GRAD_MODULES)),
            "settings": json.dumps({"rank": RANK, "alpha": ALPHA, "up_std": UP_STD, "seed": SEED, "lr_te": LR_TE,
                                    "lr_unet": LR_UNET, "min_snr_gamma": 5.0, "size_embed_dim": SIZE_DIM,
                                    "torch": torch.__version__}),
            "code": "Tests/Fixtures/training/make_te_step.py (kohya train_network.py step with text-encoder LoRA: "
                    "kohya LoRAModule wrappers on transformers CLIP towers and the diffusers UNet)"}
    out = {k: v.detach().contiguous() for k, v in out.items()}
    path = os.path.join(HERE, "te_step.safetensors")
    save_file(out, path, metadata=meta)
    print(f"{len(loras)} LoRA modules; {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
