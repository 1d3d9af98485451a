"""Conformance fixture for the SDXL VAE (Sources/SDXL/VAE.swift) against diffusers' AutoencoderKL.

Run from the repository root (needs torch, diffusers, safetensors; CPU only, a few seconds):

    python3 Tests/Fixtures/sdxl/make_vae.py

Writes, next to this script:
  vae_tiny.safetensors  a tiny diffusers AutoencoderKL (block_out_channels (32, 64), layers_per_block 1,
                        latent 4, 32 groups: VAEConfig.tiny) with every parameter re-drawn from a seeded
                        normal, in the LDM single-file key space under `first_stage_model.`. Stored as fp16
                        (the fp32 file would be 2.6 MB; fp16 also exercises the kernels' per-op widening);
                        the reference below runs on exactly these fp16-rounded values.
  vae_io.safetensors    image [2,3,16,24] in [-1,1]; the encoder's posterior mean and logvar
                        (vae.encode(image).latent_dist.mean / .logvar); a latent [2,4,8,12] and the decoder's
                        output vae.decode(latent).sample (latent fed directly, unscaled); the seeds g_mean,
                        g_decoded and the gradients d(sum(mean·g_mean))/d(image) and
                        d(sum(decoded·g_decoded))/d(latent); and for the logvar clamp, a quant_conv bias
                        pushing logvar channels 0-2 out of [-30, 20] (clamp.quant_conv.bias), the clamped
                        logvar and d(sum(logvar·g_mean))/d(image). The reference runs in float64; stored as fp32.
  vae_sdxl_shapes.json  every LDM key and shape of the real SDXL VAE (diffusers' config for
                        stable-diffusion-xl-base-1.0/vae, built on the meta device: no weights).

The diffusers → LDM key mapping is written out below (`ldm_key`); it must cover every tensor, and it is
checked against diffusers' own `convert_ldm_vae_checkpoint` (single_file_utils.py): converting the LDM file
back must give the diffusers state dict exactly. Mid-block attention q/k/v/proj_out are stored as 1×1 conv
weights [C, C, 1, 1] (LDM's AttnBlock); diffusers holds them as Linear [C, C].
"""

import json
import os
import re

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
PREFIX = "first_stage_model."
BLOCK_OUT = (32, 64)
LEVELS = len(BLOCK_OUT)


def make_model(block_out=BLOCK_OUT, layers_per_block=1, **extra):
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(block_out), up_block_types=("UpDecoderBlock2D",) * len(block_out),
        block_out_channels=block_out, layers_per_block=layers_per_block, latent_channels=4, norm_num_groups=32,
        **extra,
    )


def reinitialise(model, seed):
    """Every parameter from a seeded normal (no zeros): norm scales 1 ± 0.1, biases ~0.05, weights
    ~N(0, 1/fan_in) so activations stay O(1) through the residual stack. Rounded to fp16."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name and leaf == "weight":
            v = 1 + 0.1 * torch.randn(p.shape, generator=gen)
        elif leaf == "bias":
            v = 0.05 * torch.randn(p.shape, generator=gen)
        else:
            fan_in = p[0].numel()
            v = torch.randn(p.shape, generator=gen) / fan_in ** 0.5
        with torch.no_grad():
            p.copy_(v.half().float())


def ldm_key(key, levels=LEVELS):
    """diffusers AutoencoderKL key → LDM key (without the first_stage_model. prefix)."""
    k = key
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv.", k)
    # decoder up_blocks are numbered from the deepest level; LDM's up.{i} by resolution.
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
               lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.block.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.",
               lambda m: f"decoder.up.{levels - 1 - int(m.group(1))}.upsample.conv.", k)
    k = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", k)
    k = k.replace(".mid_block.attentions.0.", ".mid.attn_1.")
    for old, new in [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                     ("to_out.0.", "proj_out.")]:
        if ".mid.attn_1." in k:
            k = k.replace(".attn_1." + old, ".attn_1." + new)
    k = k.replace("conv_shortcut.", "nin_shortcut.")
    k = k.replace("conv_norm_out.", "norm_out.")
    return k


def to_ldm(state, levels=LEVELS):
    out = {}
    for key, value in state.items():
        lk = ldm_key(key, levels)
        assert lk != key or key.split(".")[0] in ("quant_conv", "post_quant_conv") or \
            key.split(".")[1] in ("conv_in", "conv_out"), f"unmapped key {key}"
        if ".mid.attn_1." in lk and lk.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]            # Linear [C, C] → 1×1 conv [C, C, 1, 1]
        assert PREFIX + lk not in out, f"two keys map to {lk}"
        out[PREFIX + lk] = value.contiguous()
    assert len(out) == len(state)
    return out


def main():
    torch.manual_seed(0)
    vae = make_model().eval()
    reinitialise(vae, seed=20240601)
    state = vae.state_dict()
    ldm = to_ldm(state)

    # The mapping must be exactly the inverse of diffusers' own converter.
    back = convert_ldm_vae_checkpoint(ldm, vae.config)
    assert set(back) == set(state), (set(back) ^ set(state))
    for k in state:
        assert torch.equal(back[k], state[k]), k

    save_file({k: v.half() for k, v in ldm.items()}, os.path.join(HERE, "vae_tiny.safetensors"),
              metadata={"source": "make_vae.py: diffusers AutoencoderKL(block_out_channels=(32, 64), "
                                  "layers_per_block=1, latent_channels=4, norm_num_groups=32), seeded normal"})

    vae = vae.double()
    gen = torch.Generator().manual_seed(7)
    image = (torch.rand(2, 3, 16, 24, generator=gen, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    latent = torch.randn(2, 4, 8, 12, generator=gen, dtype=torch.float64).requires_grad_(True)
    g_mean = torch.randn(2, 4, 8, 12, generator=gen, dtype=torch.float64)
    g_decoded = torch.randn(2, 3, 16, 24, generator=gen, dtype=torch.float64)

    posterior = vae.encode(image).latent_dist
    mean, logvar = posterior.mean, posterior.logvar
    (grad_image,) = torch.autograd.grad((mean * g_mean).sum(), image)
    decoded = vae.decode(latent).sample
    (grad_latent,) = torch.autograd.grad((decoded * g_decoded).sum(), latent)

    # DiagonalGaussianDistribution clamps logvar to [-30, 20]: push logvar channels 0, 1 above and 2 below
    # the range through quant_conv's bias (channels 4..7 of the moments are logvar); channel 3 stays inside.
    clamp_bias = vae.quant_conv.bias.detach().clone()
    clamp_bias[4:6] += 60
    clamp_bias[6] -= 60
    with torch.no_grad():
        saved_bias = vae.quant_conv.bias.clone()
        vae.quant_conv.bias.copy_(clamp_bias)
    clamped_logvar = vae.encode(image).latent_dist.logvar
    (grad_image_clamped,) = torch.autograd.grad((clamped_logvar * g_mean).sum(), image)
    with torch.no_grad():
        vae.quant_conv.bias.copy_(saved_bias)

    io = {"image": image, "mean": mean, "logvar": logvar, "latent": latent, "decoded": decoded,
          "g_mean": g_mean, "g_decoded": g_decoded, "grad_image": grad_image, "grad_latent": grad_latent,
          "clamp.quant_conv.bias": clamp_bias, "clamp.logvar": clamped_logvar,
          "clamp.grad_image": grad_image_clamped}
    save_file({k: v.detach().float().contiguous() for k, v in io.items()}, os.path.join(HERE, "vae_io.safetensors"),
              metadata={"code": "posterior = vae.encode(image).latent_dist; mean, logvar = posterior.mean, "
                                "posterior.logvar; decoded = vae.decode(latent).sample; grad_image = "
                                "d sum(mean*g_mean)/d image; grad_latent = d sum(decoded*g_decoded)/d latent "
                                "(float64)"})
    for k, v in io.items():
        print(f"{k:12s} {tuple(v.shape)} absmax {v.detach().abs().max().item():.4g}")

    write_sdxl_shapes()


def write_sdxl_shapes():
    """vae_sdxl_shapes.json: every LDM key and shape of SDXL's VAE (diffusers' AutoencoderKL with the
    config of stabilityai/stable-diffusion-xl-base-1.0/vae: block_out_channels (128, 256, 512, 512),
    layers_per_block 2), built on the meta device (no weights), mapped as above and checked against
    convert_ldm_vae_checkpoint's key set and shapes."""
    with torch.device("meta"):
        sdxl = make_model((128, 256, 512, 512), layers_per_block=2, sample_size=1024, scaling_factor=0.13025)
    state = sdxl.state_dict()
    ldm = to_ldm(state, levels=4)
    back = convert_ldm_vae_checkpoint(ldm, sdxl.config)
    assert set(back) == set(state), (set(back) ^ set(state))
    for k in state:
        assert back[k].shape == state[k].shape, k
    shapes = {k: list(v.shape) for k, v in sorted(ldm.items())}
    with open(os.path.join(HERE, "vae_sdxl_shapes.json"), "w") as f:
        rows = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in shapes.items())
        f.write(f'{{"scaling_factor": {sdxl.config.scaling_factor},\n "shapes": {{\n{rows}\n}}}}\n')
    print(f"vae_sdxl_shapes.json: {len(shapes)} tensors, {sum(v.numel() for v in ldm.values())} parameters")


if __name__ == "__main__":
    main()
