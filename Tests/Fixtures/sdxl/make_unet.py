"""Golden fixture for the SDXL UNet (Tests/SDXLTests/UNetTests.swift).

Run from the repository root (PyTorch + diffusers, CPU):

    python3 Tests/Fixtures/sdxl/make_unet.py

Builds a tiny diffusers `UNet2DConditionModel` with SDXL's topology (DownBlock2D, then two
CrossAttnDownBlock2D; mirrored up blocks; 2 res blocks per level; linear projections; `text_time`
added conditioning), re-initialises every parameter with a seeded normal (diffusers zero-inits some
output projections, which would hide bugs), converts its state dict to the single-file LDM/SGM key
space (`model.diffusion_model.…`) and writes:

  unet_tiny.safetensors  the model in LDM keys, fp32. Metadata `config`: the lora-dist `UNetConfig.tiny`
                         values this model was made with.
  unet_sdxl_shapes.json  key → shape of the real SDXL base UNet (diffusers' stable-diffusion-xl-base-1.0
                         unet config, built on the meta device: no weights), in LDM keys.
  unet_io.safetensors    x [2,4,16,16], timesteps [2], context [2,11,ctx], text_embeds, time_ids and
                         y [2,adm] (the LDM label vector: text_embeds ⊕ timestep embeddings of the six
                         time ids, computed as diffusers does inside UNet2DConditionModel.forward),
                         output [2,4,16,16], g (a random cotangent) and grad.{x,context,y}: gradients of
                         L = (output · g).sum().

The diffusers → LDM mapping is written out here (`diffusers_to_ldm`) and checked two ways: it must be a
bijection over every tensor, and diffusers' own `convert_ldm_unet_checkpoint` (single-file loader) must
map the LDM dict back to the original diffusers state dict, tensor for tensor.

Widths 8/16/32 with 4 norm groups (not SDXL's 32) keep the file at ~1.6 MB: at 32/64/128 with 32 groups
the same topology is 24 MB.
"""

import json
import os

import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))

# Mirrors `UNetConfig.tiny` in Sources/SDXL/UNetConfig.swift.
MODEL_CHANNELS = 8
CHANNEL_MULT = (1, 2, 4)
RES_BLOCKS = 2
NORM_GROUPS = 4
HEAD_DIM = 8
CONTEXT_DIM = 24
POOLED_DIM = 16
TIME_ID_DIM = 8                      # addition_time_embed_dim (SDXL: 256)
ADM_IN = POOLED_DIM + 6 * TIME_ID_DIM  # 64 (SDXL: 1280 + 6·256 = 2816)
TOKENS = 11


def build_model(model_channels=MODEL_CHANNELS, norm_groups=NORM_GROUPS, head_dim=HEAD_DIM, depth=(1, 1, 1),
                context_dim=CONTEXT_DIM, time_id_dim=TIME_ID_DIM, adm_in=ADM_IN):
    widths = tuple(model_channels * m for m in CHANNEL_MULT)
    # diffusers' naming quirk: `attention_head_dim` is the number of heads per level; the head size is
    # width / heads. Level 0 has no attention (DownBlock2D), its entry is unused.
    heads = tuple(max(1, w // head_dim) for w in widths)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=widths, layers_per_block=RES_BLOCKS, transformer_layers_per_block=depth,
        norm_num_groups=norm_groups, norm_eps=1e-5, cross_attention_dim=context_dim, attention_head_dim=heads,
        use_linear_projection=True, flip_sin_to_cos=True, freq_shift=0,
        addition_embed_type="text_time", addition_time_embed_dim=time_id_dim,
        projection_class_embeddings_input_dim=adm_in,
    )


def reinit(model, seed):
    """Every parameter from a seeded normal: matrices ~N(0, 1/fan_in), norm scales 1 + N(0, 0.1²),
    biases N(0, 0.05²) — nothing zero, activations in a sane range."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)


RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
       "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
       "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def diffusers_to_ldm(key, has_attention_up):
    """One diffusers UNet key → its single-file SGM key (without the model.diffusion_model. prefix).
    Follows sgm's UNetModel layout: input_blocks.0 is conv_in, then per level `RES_BLOCKS` blocks
    [ResBlock, SpatialTransformer?] and a downsample block `[Downsample]` (not after the last level);
    output blocks mirror them with RES_BLOCKS + 1 per level, the upsample after the last module."""
    parts = key.split(".")
    leaf = parts[-1]
    module = ".".join(parts[:-1])
    for d, l in TOP.items():
        if module == d:
            return f"{l}.{leaf}"
    per_level = RES_BLOCKS + 1

    def resnet(rest):
        head, _, tail = rest.partition(".")
        return RESNET[head] + (f".{tail}" if tail else "")

    if parts[0] == "down_blocks":
        level, kind, j = int(parts[1]), parts[2], int(parts[3])
        rest = ".".join(parts[4:])
        if kind == "resnets":
            return f"input_blocks.{1 + level * per_level + j}.0.{resnet(rest)}"
        if kind == "attentions":
            return f"input_blocks.{1 + level * per_level + j}.1.{rest}"
        if kind == "downsamplers":
            assert rest.startswith("conv.")
            return f"input_blocks.{1 + level * per_level + RES_BLOCKS}.0.op.{rest[len('conv.'):]}"
    if parts[0] == "mid_block":
        kind, j = parts[1], int(parts[2])
        rest = ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{2 * j}.{resnet(rest)}"
        if kind == "attentions":
            return f"middle_block.1.{rest}"
    if parts[0] == "up_blocks":
        level, kind, j = int(parts[1]), parts[2], int(parts[3])
        rest = ".".join(parts[4:])
        if kind == "resnets":
            return f"output_blocks.{level * per_level + j}.0.{resnet(rest)}"
        if kind == "attentions":
            return f"output_blocks.{level * per_level + j}.1.{rest}"
        if kind == "upsamplers":
            slot = 2 if has_attention_up[level] else 1
            return f"output_blocks.{level * per_level + RES_BLOCKS}.{slot}.{rest}"
    raise KeyError(key)


def sdxl_shapes():
    """The real SDXL base UNet's LDM key → shape (stable-diffusion-xl-base-1.0/unet/config.json:
    320/640/1280, heads 5/10/20 of 64, transformer layers 1/2/10, context 2048, adm 2816)."""
    with torch.device("meta"):
        model = build_model(model_channels=320, norm_groups=32, head_dim=64, depth=(1, 2, 10), context_dim=2048,
                            time_id_dim=256, adm_in=2816)
    has_attention_up = [hasattr(b, "attentions") for b in model.up_blocks]
    shapes = {"model.diffusion_model." + diffusers_to_ldm(k, has_attention_up): list(v.shape)
              for k, v in model.state_dict().items()}
    assert len(shapes) == len(model.state_dict())
    return dict(sorted(shapes.items()))


def main():
    with open(os.path.join(HERE, "unet_sdxl_shapes.json"), "w") as f:
        json.dump(sdxl_shapes(), f, separators=(",", ":"))
    torch.manual_seed(0)
    model = build_model().float().eval()
    reinit(model, seed=1234)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}

    has_attention_up = [hasattr(b, "attentions") for b in model.up_blocks]
    ldm = {}
    for k, v in sd.items():
        lk = "model.diffusion_model." + diffusers_to_ldm(k, has_attention_up)
        assert lk not in ldm, f"two diffusers keys map to {lk}"
        ldm[lk] = v
    assert len(ldm) == len(sd)

    # diffusers' own single-file conversion (LDM → diffusers) must give the original state dict back.
    back = convert_ldm_unet_checkpoint(ldm, dict(model.config))
    assert set(back) == set(sd), (sorted(set(back) ^ set(sd)))[:10]
    for k in sd:
        assert torch.equal(back[k], sd[k]), k

    # Inputs. time_ids: (original h, w, crop top, left, target h, w), as SDXL pipelines pass them.
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    timesteps = torch.tensor([999.0, 17.0])
    context = torch.randn(2, TOKENS, CONTEXT_DIM, generator=gen)
    text_embeds = torch.randn(2, POOLED_DIM, generator=gen)
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0],
                             [832.0, 1216.0, 16.0, 32.0, 1024.0, 1024.0]])
    # y exactly as UNet2DConditionModel.forward builds add_embeds (add_time_proj = Timesteps(
    # addition_time_embed_dim, flip_sin_to_cos=True, freq_shift=0) on the flattened ids).
    time_embeds = get_timestep_embedding(time_ids.flatten(), TIME_ID_DIM, flip_sin_to_cos=True,
                                         downscale_freq_shift=0).reshape(2, -1)
    y = torch.cat([text_embeds, time_embeds], dim=-1)
    assert y.shape == (2, ADM_IN)
    g = torch.randn(2, 4, 16, 16, generator=gen)

    xv = x.clone().requires_grad_(True)
    cv = context.clone().requires_grad_(True)
    out = model(xv, timesteps, encoder_hidden_states=cv,
                added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
    (out * g).sum().backward()

    # The same model fed the LDM y directly (add_embedding(y) in place of the kwargs path): the
    # gradient w.r.t. y comes from here, and the output must agree with the kwargs path.
    yv = y.clone().requires_grad_(True)
    emb = model.time_embedding(model.time_proj(timesteps)) + model.add_embedding(yv)
    out_y = forward_with_emb(model, x, emb, context)
    assert torch.allclose(out_y, out, atol=1e-5, rtol=1e-5), (out_y - out).abs().max()
    (out_y * g).sum().backward()

    config = {"inChannels": 4, "outChannels": 4, "modelChannels": MODEL_CHANNELS,
              "channelMult": list(CHANNEL_MULT), "resBlocksPerLevel": RES_BLOCKS, "transformerDepth": [0, 1, 1],
              "middleTransformerDepth": 1, "contextDim": CONTEXT_DIM, "admInChannels": ADM_IN,
              "headDim": HEAD_DIM, "normGroups": NORM_GROUPS}
    save_file(ldm, os.path.join(HERE, "unet_tiny.safetensors"), metadata={"config": json.dumps(config)})
    io = {"x": x, "timesteps": timesteps, "context": context, "text_embeds": text_embeds, "time_ids": time_ids,
          "y": y, "output": out.detach(), "g": g, "grad.x": xv.grad, "grad.context": cv.grad, "grad.y": yv.grad}
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(HERE, "unet_io.safetensors"),
              metadata={"code": "out = UNet2DConditionModel(x, timesteps, encoder_hidden_states=context, "
                                "added_cond_kwargs={text_embeds, time_ids}).sample; L = (out * g).sum()"})
    print(f"{len(ldm)} tensors, {sum(v.numel() for v in ldm.values())} parameters; "
          f"output |max| {out.abs().max():.4f}")


def forward_with_emb(model, x, emb, context):
    """UNet2DConditionModel.forward from the point where `emb` is formed (diffusers 0.3x, no extras)."""
    h = model.conv_in(x)
    skips = (h,)
    for block in model.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, res = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
        else:
            h, res = block(hidden_states=h, temb=emb)
        skips += res
    h = model.mid_block(h, emb, encoder_hidden_states=context)
    for block in model.up_blocks:
        res = skips[-len(block.resnets):]
        skips = skips[:-len(block.resnets)]
        if getattr(block, "has_cross_attention", False):
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res, encoder_hidden_states=context)
        else:
            h = block(hidden_states=h, temb=emb, res_hidden_states_tuple=res)
    return model.conv_out(model.conv_act(model.conv_norm_out(h)))


if __name__ == "__main__":
    main()
