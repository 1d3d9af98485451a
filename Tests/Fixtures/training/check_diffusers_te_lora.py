"""Checks the text-encoder modules of a kohya-format SDXL LoRA against diffusers' own kohya loader, on the tiny
text towers of te_step.safetensors (make_te_step.py). PyTorch (CPU) + transformers + diffusers + peft. From the
repository root:

    python3 Tests/Fixtures/training/check_diffusers_te_lora.py --lora L.safetensors --compare swift.safetensors

What it does, failing loudly (exit 1) at the first disagreement:
 1. Rebuilds the two towers exactly as make_te_step.py made them (same configs and seeded weights) and checks that
    they equal the single-file weights stored in te_step.safetensors (bigG through make_text.to_openclip).
 2. Loads the LoRA with diffusers: StableDiffusionXLPipeline.lora_state_dict (kohya → diffusers key conversion),
    then load_lora_into_text_encoder for text_encoder (lora_te1_) and text_encoder_2 (lora_te2_) — peft injection.
    Warnings from diffusers/peft (an unexpected or missing key) fail the check.
 3. Every lora_te1_/lora_te2_ module of the file must have landed where kohya means it (transformers module path):
    a peft LoRA layer whose lora_A/lora_B equal the file's lora_down/lora_up exactly, scaling alpha/rank; and no
    other module got one. So no key is unused and none missing.
 4. With the LoRA, on te_step's ids: kohya's conditioning (hidden_states[-2] of both towers side by side, and
    kohya's pool_workaround on the last state of tower 2) must differ from the towers without LoRA, and, with
    --compare, equal the file's "context" [B, 77, 24] and "pooled" [B, 16] (what lora-dist computed with the same
    LoRA) within atol + rtol·|diffusers|.
"""

import argparse
import io
import json
import logging
import os
import sys
import warnings
from contextlib import redirect_stderr, redirect_stdout

import torch
from safetensors import safe_open
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_te_step  # noqa: E402
from make_te_step import CONFIG_G, CONFIG_L, EOS, make_text  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def towers():
    te1 = CLIPTextModel(CLIPTextConfig(**CONFIG_L, attn_implementation="eager")).eval()
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CONFIG_G, attn_implementation="eager")).eval()
    make_text.reinitialise(te1, 11)
    make_text.reinitialise(te2, 12)
    stored = load_file(os.path.join(HERE, "te_step.safetensors"))
    for k, v in te1.state_dict().items():
        key = make_text.PREFIX_L + k.removeprefix("text_model.")
        if key in stored and not torch.equal(stored[key], v):
            fail(f"{key}: the rebuilt CLIP-L tower differs from te_step.safetensors")
    for k, v in make_text.to_openclip(te2.state_dict()).items():
        if not torch.equal(stored[make_text.PREFIX_G + k], v):
            fail(f"{make_text.PREFIX_G + k}: the rebuilt bigG tower differs from te_step.safetensors")
    return te1, te2, stored


def conditioning(te1, te2, ids1, ids2):
    with torch.no_grad():
        out1 = te1(ids1, output_hidden_states=True, return_dict=True)
        out2 = te2(ids2, output_hidden_states=True, return_dict=True)
        pooled = make_text.kohya_pool_workaround(te2, out2.last_hidden_state, ids2, EOS)
        return torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1), pooled


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lora", required=True)
    ap.add_argument("--compare")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--rtol", type=float, default=1e-4)
    args = ap.parse_args()

    te1, te2, stored = towers()
    ids1, ids2 = stored["ids1"], stored["ids2"]
    base_context, base_pooled = conditioning(te1, te2, ids1, ids2)

    from diffusers import StableDiffusionXLPipeline
    kohya = load_file(args.lora)
    te_modules = sorted({k.split(".")[0] for k in kohya if k.startswith(("lora_te1_", "lora_te2_"))})
    if not te_modules:
        fail(f"{args.lora} has no lora_te1_/lora_te2_ modules")
    captured = io.StringIO()
    logging.captureWarnings(True)
    handler = logging.StreamHandler(captured)
    for name in ("diffusers", "peft", "py.warnings"):
        logging.getLogger(name).addHandler(handler)
    with warnings.catch_warnings(), redirect_stderr(captured), redirect_stdout(captured):
        warnings.simplefilter("always")
        state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(args.lora)
        for prefix, model in (("text_encoder", te1), ("text_encoder_2", te2)):
            StableDiffusionXLPipeline.load_lora_into_text_encoder(state_dict, alphas, text_encoder=model, prefix=prefix)
    noise = [line for line in captured.getvalue().splitlines()
             if any(w in line.lower() for w in ("unexpected", "missing", "not used", "were not", "ignored"))]
    if noise:
        fail("diffusers/peft reported: " + " | ".join(noise[:5]))

    # 3. Every module where kohya means it, and nowhere else.
    expected = {}
    for m in te_modules:
        tower, rest = ("te1", m[len("lora_te1_"):]) if m.startswith("lora_te1_") else ("te2", m[len("lora_te2_"):])
        expected[(tower, rest)] = m
    found = {}
    for tower, model in (("te1", te1), ("te2", te2)):
        for name, module in model.named_modules():
            adapters = list(getattr(module, "lora_A", {}).keys()) if hasattr(module, "lora_A") else []
            if not adapters:
                continue
            if len(adapters) != 1:
                fail(f"{tower}.{name}: {len(adapters)} adapters, expected one")
            adapter = adapters[0]
            path = name if name.startswith("text_model.") else "text_model." + name
            key = (tower, path.replace(".", "_"))
            if key not in expected:
                fail(f"peft put a LoRA on {tower}.{name}, which the file has no module for")
            m = expected[key]
            down, up = kohya[f"{m}.lora_down.weight"].float(), kohya[f"{m}.lora_up.weight"].float()
            alpha = float(kohya[f"{m}.alpha"]) if f"{m}.alpha" in kohya else down.shape[0]
            if not torch.equal(module.lora_A[adapter].weight.float(), down):
                fail(f"{m}: lora_A differs from the file's lora_down")
            if not torch.equal(module.lora_B[adapter].weight.float(), up):
                fail(f"{m}: lora_B differs from the file's lora_up")
            if abs(module.scaling[adapter] - alpha / down.shape[0]) > 1e-6:
                fail(f"{m}: scaling {module.scaling[adapter]} != alpha/rank {alpha / down.shape[0]}")
            found[key] = m
    missing = sorted(set(expected.values()) - set(found.values()))
    if missing:
        fail(f"{len(missing)} modules of the file were not applied: {missing[:4]}")
    print(f"diffusers loaded {len(found)} text-encoder modules into exactly those modules")

    context, pooled = conditioning(te1, te2, ids1, ids2)
    if torch.allclose(context, base_context, atol=1e-6) and torch.allclose(pooled, base_pooled, atol=1e-6):
        fail("the LoRA changes nothing")
    if args.compare:
        with safe_open(args.compare, "pt") as f:
            ours = {k: f.get_tensor(k).float() for k in ("context", "pooled")}
        for name, theirs in (("context", context), ("pooled", pooled)):
            err = (ours[name] - theirs).abs()
            tol = args.atol + args.rtol * theirs.abs()
            if not bool((err <= tol).all()):
                fail(f"{name}: lora-dist and diffusers differ by up to {err.max().item():.3g}")
            print(f"{name}: lora-dist = diffusers (max |Δ| {err.max().item():.2e})")
    print(json.dumps({"modules": len(found)}))


if __name__ == "__main__":
    main()
