"""Reference key pairs between the single-file SDXL layout and a diffusers folder (Tests/SDXLTests/DiffusersLayoutTests.swift).

Run from the repository root (PyTorch, diffusers, transformers and open_clip_torch installed; CPU, a few seconds):

    python3 Tests/Fixtures/sdxl/make_diffusers_keys.py

The pairs come from diffusers' OWN single-file conversion code (diffusers/loaders/single_file_utils.py:
`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`,
called as `from_single_file` calls them for SDXL), never from lora-dist's table. Each is run on a single-file state dict
whose every tensor holds distinct integer ids (float64, exact), so where each value lands in the converted dict tells
both the key pairing and the transform:

    "="    the same tensor (a rename)
    "1x1"  canonical conv weight [C, C, 1, 1] == diffusers Linear weight [C, C] (VAE mid-block attention)
    "T"    canonical [C, P] == transpose of the diffusers [P, C] (OpenCLIP text_projection vs nn.Linear)
    "cat"  canonical == the diffusers tensors concatenated along dim 0, in the listed order (OpenCLIP in_proj = q, k, v)

Two layouts are recorded:

  sdxl  the real SDXL base key layout: UNet and VAE names from unet_sdxl_shapes.json / vae_sdxl_shapes.json (made by
        make_unet.py / make_vae.py from diffusers' SDXL configs), CLIP ViT-L from transformers' CLIPTextModel (12 layers,
        width 768) and OpenCLIP ViT-bigG from open_clip's own TextTransformer (32 layers, width 1280) plus `logit_scale`,
        all under their single-file prefixes. Shapes are shrunk (each dim divisible by 64 divided by 64, others capped at
        3; ranks kept) so the id tensors are small: the converters only look at ranks and at text_projection's first dim.
  tiny  the names and real shapes of the tiny fixtures unet_tiny / vae_tiny / text_tiny.safetensors; the Swift test
        builds its tiny diffusers folder from these pairs.

Writes diffusers_keys_sdxl.json: {"layouts": {layout: {component: {"entries": [...], "dropped": [...]}}}} with component
one of unet, vae, text_encoder, text_encoder_2 (the diffusers subfolder). An entry is [canonical, transform, [diffusers
keys]]; `dropped` lists canonical keys the converter does not carry over (bigG's logit_scale). Key strings are
front-coded to keep the file small: "n:suffix" = the first n characters of the previous key in the same column, then
suffix (the canonical column runs through `entries` then `dropped`; the diffusers column through every listed diffusers key).
"""

import importlib.util
import json
import os
import sys
import types

import torch
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

HERE = os.path.dirname(os.path.abspath(__file__))
UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_L, CLIP_G = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."


def open_clip_text_transformer():
    """open_clip's TextTransformer class. open_clip's package __init__ needs torchvision (not installed here); its
    transformer module only needs torchvision.ops.misc.FrozenBatchNorm2d (for image towers), so that one name is
    stubbed and the module is imported from the installed package without running the package __init__."""
    spec = importlib.util.find_spec("open_clip")
    if "open_clip" not in sys.modules:
        pkg = types.ModuleType("open_clip")
        pkg.__path__ = [os.path.dirname(spec.origin)]
        sys.modules["open_clip"] = pkg
    for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc"):
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = []
            sys.modules[name] = module
    if not hasattr(sys.modules["torchvision.ops.misc"], "FrozenBatchNorm2d"):
        sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = torch.nn.Module
    from open_clip.transformer import TextTransformer
    return TextTransformer


def sdxl_text_shapes():
    """Single-file key -> shape of SDXL's two text towers, built on the meta device (no weights)."""
    config_l = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
    with torch.device("meta"):
        model_l = CLIPTextModel(config_l)
        # sgm's FrozenOpenCLIPEmbedder2 keeps open_clip's CLIP minus the image tower: the text transformer + logit_scale.
        tower_g = open_clip_text_transformer()(context_length=77, vocab_size=49408, width=1280, heads=20, layers=32,
                                               output_dim=1280, act_layer=torch.nn.GELU)
    # sgm wraps transformers' CLIPTextModel as `transformer`; its state dict is `text_model.*` (transformers 4.x names;
    # 5.x's CLIPTextModel has no `text_model` wrapper, so the prefix is put back).
    shapes = {CLIP_L + ("" if k.startswith("text_model.") else "text_model.") + k: list(v.shape)
              for k, v in model_l.state_dict().items() if not k.endswith("position_ids")}
    shapes.update({CLIP_G + k: list(v.shape) for k, v in tower_g.state_dict().items()})
    shapes[CLIP_G + "logit_scale"] = []
    return shapes


def sdxl_layout():
    with open(os.path.join(HERE, "unet_sdxl_shapes.json")) as f:
        shapes = json.load(f)
    with open(os.path.join(HERE, "vae_sdxl_shapes.json")) as f:
        shapes.update(json.load(f)["shapes"])
    shapes.update(sdxl_text_shapes())
    return {k: [d // 64 if d % 64 == 0 else min(d, 3) for d in s] for k, s in shapes.items()}


def tiny_layout():
    shapes = {}
    for name in ("unet_tiny", "vae_tiny", "text_tiny"):
        with safe_open(os.path.join(HERE, f"{name}.safetensors"), "pt") as f:
            for k in f.keys():
                if not k.endswith("position_ids"):   # an int buffer no network loads (CLIPTextEncoderL.isIgnorable)
                    shapes[k] = list(f.get_slice(k).get_shape())
    return shapes


def id_tensors(shapes):
    """Every tensor filled with its own run of consecutive integers (exact in float64)."""
    tensors, start = {}, 0
    for key in sorted(shapes):
        n = 1
        for d in shapes[key]:
            n *= d
        tensors[key] = torch.arange(start, start + n, dtype=torch.float64).reshape(shapes[key])
        start += n
    return tensors


def pairs(canonical, converted):
    """Which converted tensor(s) each canonical tensor became, and how (see the module docstring)."""
    by_first = {}
    for key, t in canonical.items():
        by_first[int(t.flatten()[0])] = key
    found = {}
    for dkey, d in converted.items():
        first = int(d.flatten()[0])
        if first in by_first:                      # starts where a canonical tensor starts
            found.setdefault(by_first[first], []).append(dkey)
            continue
        # A transposed or sliced tensor starts inside its source: find the source holding that id.
        source = next(k for k, t in canonical.items() if int(t.flatten()[0]) <= first <= int(t.flatten()[-1]))
        found.setdefault(source, []).append(dkey)
    entries, dropped = [], []
    for ckey in sorted(canonical):
        c = canonical[ckey]
        dkeys = found.get(ckey, [])
        if not dkeys:
            dropped.append(ckey)
            continue
        ds = [converted[k] for k in dkeys]
        if len(ds) > 1:
            ds_sorted = sorted(zip(dkeys, ds), key=lambda kv: int(kv[1].flatten()[0]))
            dkeys, ds = [k for k, _ in ds_sorted], [t for _, t in ds_sorted]
            assert torch.equal(torch.cat(ds, dim=0), c), ckey
            transform = "cat"
        elif torch.equal(ds[0], c):
            transform = "="
        elif c.dim() == 4 and c.shape[2:] == (1, 1) and torch.equal(ds[0], c[:, :, 0, 0]):
            transform = "1x1"
        elif c.dim() == 2 and torch.equal(ds[0], c.T):
            transform = "T"
        else:
            raise AssertionError(f"{ckey} -> {dkeys}: unrecognised relation {list(c.shape)} -> {list(ds[0].shape)}")
        entries.append((ckey, transform, dkeys))
    return entries, dropped


def convert(shapes):
    """component -> (entries, dropped), from diffusers' converters as from_single_file calls them for SDXL."""
    tensors = id_tensors(shapes)
    part = lambda prefix: {k: v for k, v in tensors.items() if k.startswith(prefix)}
    unet, vae, clip_l, clip_g = part(UNET), part(VAE), part(CLIP_L), part(CLIP_G)
    # layers_per_block as in SDXL's unet config (both layouts have 2 ResBlocks per level); text_time adds label_emb.
    unet_config = {"layers_per_block": 2, "addition_embed_type": "text_time"}
    levels = 1 + max(int(k.split(".")[3]) for k in vae if k.startswith(VAE + "encoder.down."))
    vae_config = {"down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}
    out = {
        "unet": pairs(unet, convert_ldm_unet_checkpoint(unet, unet_config)),
        "vae": pairs(vae, convert_ldm_vae_checkpoint(vae, vae_config)),
        "text_encoder": pairs(clip_l, convert_ldm_clip_checkpoint(clip_l)),
        # text_model is only consulted when text_projection is absent; SDXL files have it.
        "text_encoder_2": pairs(clip_g, convert_open_clip_checkpoint(None, clip_g, prefix=CLIP_G)),
    }
    covered = sum(len(e) + len(d) for e, d in out.values())
    assert covered == len(tensors), (covered, len(tensors))
    return out


class FrontCoder:
    def __init__(self):
        self.previous = ""

    def __call__(self, s):
        n = 0
        while n < min(len(s), len(self.previous)) and s[n] == self.previous[n]:
            n += 1
        self.previous = s
        return f"{n}:{s[n:]}"


def encode(entries, dropped):
    canonical, diffusers = FrontCoder(), FrontCoder()
    coded = [[canonical(c), t, [diffusers(d) for d in ds]] for c, t, ds in entries]
    return {"entries": coded, "dropped": [canonical(c) for c in dropped]}


def main():
    layouts = {}
    for name, shapes in (("sdxl", sdxl_layout()), ("tiny", tiny_layout())):
        converted = convert(shapes)
        layouts[name] = {component: encode(*pair) for component, pair in converted.items()}
        counts = {c: len(e) for c, (e, _) in converted.items()}
        transforms = {}
        for e, _ in converted.values():
            for _, t, _ in e:
                transforms[t] = transforms.get(t, 0) + 1
        print(f"{name}: {counts}, transforms {transforms}, dropped {[d for _, d in converted.values() if d]}")
    path = os.path.join(HERE, "diffusers_keys_sdxl.json")
    with open(path, "w") as f:
        json.dump({"source": "make_diffusers_keys.py: diffusers single_file_utils conversions on id tensors",
                   "layouts": layouts}, f, separators=(",", ":"))
    print(f"wrote {path}: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
