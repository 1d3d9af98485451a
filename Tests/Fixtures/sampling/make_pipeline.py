"""Golden generations from diffusers' StableDiffusionXLPipeline on lora-dist's tiny SDXL preset
(Tests/TrainingTests/GenerateTests.swift).

Run from the repository root (PyTorch 2.x CPU, diffusers 0.42, transformers, peft, open_clip_torch for the vocab):

    .build/debug/lora-dist make-model --preset tiny --dtype fp32 --seed 5 --out /tmp/tiny5.safetensors
    python3 Tests/Fixtures/sampling/make_pipeline.py --model /tmp/tiny5.safetensors

The checkpoint is not committed: `make-model` writes the same file every time (its weights depend only on seed and key);
its SHA-256 is recorded so the Swift test knows it regenerated this very file.

What it does:
 1. Converts the single file with diffusers' own single-file converters (convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint, as from_single_file does for
    SDXL) into UNet2DConditionModel / AutoencoderKL / CLIPTextModel / CLIPTextModelWithProjection built with the tiny
    preset's sizes (Sources/SDXL/Checkpoint.swift SDXLPreset.tiny), loaded strictly; CLIP tokenizers from the bundled
    BPE tables (make_tokens.write_vocab_files), tokenizer_2 padding with "!" as SDXL's does.
 2. Writes lora_tiny.safetensors: a kohya-format LoRA (rank 2, alpha 1, random down and up) on every Linear of the
    UNet's transformer blocks (kohya's default targets, LDM names) and on q/k/v/out_proj, fc1, fc2 of both text
    encoders (lora_te1_ / lora_te2_, transformers names).
 3. Runs the pipeline for each case below (scheduler: Class.from_config(SDXL's scheduler config), see
    make_samplers.py), with `generator=torch.Generator().manual_seed(seed)` (the initial latents and Euler a's
    per-step noise both come from it), or with `latents=` given (case "given_noise"), output_type="latent"; the
    LoRA through pipe.load_lora_weights + set_adapters(weight) (UNet and both text encoders); case "euler_a_given" also
    takes every step's noise from the file (the scheduler module's randn_tensor replaced); "vpred_zsnr" overrides
    prediction_type / rescale_betas_zero_snr / timestep_spacing in the scheduler config. The final latents
    are then decoded as the pipeline does (vae.decode(latents / scaling_factor), (x / 2 + 0.5).clamp(0, 1),
    (x · 255).round()).

Writes pipeline.safetensors: for case k, "k.latents" [1, 4, h, w] and "k.image" [H, W, 3] (uint8 values as F32);
"<case>.noise" (and "<case>.step_noise" [steps, 4, h, w]) for the cases that take their noise from a file; metadata "cases" (JSON list of the settings) and
"model_sha256".
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile

import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel)
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "sdxl"))
sys.path.insert(0, os.path.join(HERE))
import make_tokens  # noqa: E402
import make_unet  # noqa: E402
import make_vae  # noqa: E402
from make_samplers import SDXL_SCHEDULER  # noqa: E402
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module  # noqa: E402

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_L, CLIP_G = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
VOCAB, BOS, EOS = 49408, 49406, 49407

SCHEDULERS = {"euler_a": (EulerAncestralDiscreteScheduler, {}), "euler": (EulerDiscreteScheduler, {}),
              "euler_karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
              "dpm++_2m": (DPMSolverMultistepScheduler, {}),
              "dpm++_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
              "ddim": (DDIMScheduler, {})}

CASES = [
    dict(name="euler_a", sampler="euler_a", prompt="a red fox in the snow, masterpiece", negative="lowres, blurry",
         width=64, height=64, steps=6, cfg=5.0, seed=11, lora=None),
    dict(name="dpm_karras_lora", sampler="dpm++_2m_karras", prompt="a red fox in the snow, masterpiece",
         negative="lowres, blurry", width=64, height=64, steps=6, cfg=5.0, seed=12, lora=0.7),
    dict(name="euler_lora_wide", sampler="euler", prompt="portrait of a knight, detailed armor", negative="bad hands",
         width=96, height=64, steps=5, cfg=6.5, seed=13, lora=1.0),
    dict(name="ddim", sampler="ddim", prompt="a lighthouse at dusk", negative="", width=64, height=64, steps=6,
         cfg=5.0, seed=14, lora=None),
    dict(name="euler_karras_nocfg", sampler="euler_karras", prompt="a lighthouse at dusk", negative="",
         width=64, height=64, steps=4, cfg=1.0, seed=15, lora=None),
    dict(name="given_noise", sampler="dpm++_2m", prompt="a cat", negative="dog", width=64, height=64, steps=5,
         cfg=4.0, seed=16, lora=None, given_noise=True),
    # Euler a with the initial and every step's noise from the file (`--noise` with `step_noise`).
    dict(name="euler_a_given", sampler="euler_a", prompt="a cat", negative="dog", width=64, height=64, steps=4,
         cfg=4.0, seed=17, lora=0.5, given_noise=True),
    # A v-prediction, zero-terminal-SNR model sampled as NoobAI V-Pred's card says (diffusers: prediction_type
    # v_prediction, rescale_betas_zero_snr; trailing spacing so the first step is at t = 999).
    dict(name="vpred_zsnr", sampler="euler", prompt="a lighthouse at dusk", negative="lowres", width=64, height=64,
         steps=5, cfg=5.0, seed=18, lora=None, prediction="v_prediction", zsnr=True, spacing="trailing"),
]


def load_text(model, converted):
    """Strict load of a converted text tower (transformers 5 names the towers' parameters without `text_model.`;
    the position_ids buffer is not a weight)."""
    own = set(model.state_dict())
    if not any(k.startswith("text_model.") for k in own):
        converted = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in converted.items()}
    converted = {k: v for k, v in converted.items() if not k.endswith("position_ids")}
    missing, unexpected = own - set(converted) - {k for k in own if k.endswith("position_ids")}, set(converted) - own
    assert not missing and not unexpected, (sorted(missing)[:5], sorted(unexpected)[:5])
    model.load_state_dict(converted, strict=False)
    return model


def components(path):
    with safe_open(path, "pt") as f:
        sd = {k: f.get_tensor(k).float() for k in f.keys()}
    part = lambda prefix: {k: v for k, v in sd.items() if k.startswith(prefix)}
    # SDXLPreset.tiny: UNetConfig.tiny widths 8/16/32 (head 8, 4 groups), context 32 + 48, adm 48 + 6·8.
    unet = make_unet.build_model(context_dim=80, time_id_dim=8, adm_in=96).float().eval()
    unet.load_state_dict(convert_ldm_unet_checkpoint(part(UNET), {"layers_per_block": 2, "addition_embed_type": "text_time"}), strict=True)
    vae = make_vae.make_model(block_out=(32, 32, 32, 32), layers_per_block=1, scaling_factor=0.13025).float().eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(part(VAE), {"down_block_types": ["DownEncoderBlock2D"] * 4,
                                                               "up_block_types": ["UpDecoderBlock2D"] * 4}), strict=True)
    cfg_l = CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                           bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
    cfg_g = CLIPTextConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=192, num_hidden_layers=2, num_attention_heads=3,
                           max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=48,
                           bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0)
    te1 = load_text(CLIPTextModel(cfg_l).eval(), convert_ldm_clip_checkpoint(part(CLIP_L)))
    te2 = load_text(CLIPTextModelWithProjection(cfg_g).eval(), convert_open_clip_checkpoint(None, part(CLIP_G), prefix=CLIP_G))
    folder = tempfile.mkdtemp()
    make_tokens.write_vocab_files(folder)
    tok1 = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77)
    tok2 = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), pad_token="!", model_max_length=77)
    return unet, vae, te1, te2, tok1, tok2


def make_lora(unet, te1, te2, path):
    gen = torch.Generator().manual_seed(77)
    up_attn = [hasattr(b, "attentions") for b in unet.up_blocks]
    tensors = {}

    def add(name, module):
        din, dout = module.in_features, module.out_features
        tensors[name + ".lora_down.weight"] = torch.randn(2, din, generator=gen) / din ** 0.5
        tensors[name + ".lora_up.weight"] = torch.randn(dout, 2, generator=gen) * 0.5
        tensors[name + ".alpha"] = torch.tensor(1.0)

    for name, block in unet.named_modules():
        if block.__class__.__name__ != "Transformer2DModel":
            continue
        for child_name, child in block.named_modules():
            if child.__class__.__name__ == "Linear":
                ldm = make_unet.diffusers_to_ldm(f"{name}.{child_name}.weight", up_attn)[: -len(".weight")]
                add("lora_unet_" + ldm.replace(".", "_"), child)
    for prefix, te in (("lora_te1_", te1), ("lora_te2_", te2)):
        for name, module in te.named_modules():
            if module.__class__.__name__ == "Linear" and (".self_attn." in name or ".mlp." in name):
                # kohya names the towers' modules by transformers 4 paths (text_model.encoder...).
                kohya_path = name if name.startswith("text_model.") else "text_model." + name
                add(prefix + kohya_path.replace(".", "_"), module)
    save_file(tensors, path, metadata={"ss_network_module": "networks.lora", "ss_network_dim": "2", "ss_network_alpha": "1.0",
                                       "ss_base_model_version": "sdxl_base_v1-0"})
    return len([k for k in tensors if k.endswith(".alpha")])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
    torch.set_num_threads(2)
    unet, vae, te1, te2, tok1, tok2 = components(args.model)
    lora_path = os.path.join(HERE, "lora_tiny.safetensors")
    modules = make_lora(unet, te1, te2, lora_path)
    out, settings = {}, []
    for case in CASES:
        cls, extra = SCHEDULERS[case["sampler"]]
        extra = dict(extra)
        if case.get("prediction"):
            extra["prediction_type"] = case["prediction"]
        if case.get("zsnr"):
            extra["rescale_betas_zero_snr"] = True
        if case.get("spacing"):
            extra["timestep_spacing"] = case["spacing"]
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
                                         unet=unet, scheduler=cls.from_config(SDXL_SCHEDULER, **extra))
        pipe.set_progress_bar_config(disable=True)
        if case["lora"] is not None:
            pipe.load_lora_weights(lora_path, adapter_name="tiny")
            pipe.set_adapters(["tiny"], adapter_weights=[case["lora"]])
            # Every module of the file must have landed (peft layers in the UNet and both towers).
            landed = sum(1 for m in (unet, te1, te2) for _, mod in m.named_modules() if hasattr(mod, "lora_A") and "tiny" in mod.lora_A)
            assert landed == modules, (landed, modules)
        kwargs = dict(prompt=case["prompt"], negative_prompt=case["negative"], width=case["width"], height=case["height"],
                      num_inference_steps=case["steps"], guidance_scale=case["cfg"], output_type="latent")
        pending = []
        if case.get("given_noise"):
            g = torch.Generator().manual_seed(999 + case["seed"])
            shape = (1, 4, case["height"] // 8, case["width"] // 8)
            noise = torch.randn(shape, generator=g)
            out[case["name"] + ".noise"] = noise
            kwargs["latents"] = noise.clone()
            if case["sampler"] == "euler_a":
                steps = [torch.randn(shape, generator=g) for _ in range(case["steps"])]
                out[case["name"] + ".step_noise"] = torch.cat(steps)
                pending = list(steps)
        else:
            kwargs["generator"] = torch.Generator().manual_seed(case["seed"])
        original = euler_a_module.randn_tensor
        if pending:
            euler_a_module.randn_tensor = lambda shape, **kw: pending.pop(0)
        try:
            with torch.no_grad():
                latents = pipe(**kwargs).images
        finally:
            euler_a_module.randn_tensor = original
            image = vae.decode(latents / vae.config.scaling_factor).sample
        image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)[0]
        out[case["name"] + ".latents"] = latents.contiguous()
        out[case["name"] + ".image"] = (image * 255).round()
        if case["lora"] is not None:
            pipe.unload_lora_weights()
        settings.append(case)
        print(f"{case['name']}: latents {list(latents.shape)}, |latents| max {latents.abs().max():.3f}")
    sha = hashlib.sha256(open(args.model, "rb").read()).hexdigest()
    save_file({k: v.float().contiguous() for k, v in out.items()}, os.path.join(HERE, "pipeline.safetensors"),
              metadata={"cases": json.dumps(settings), "model_sha256": sha, "lora_modules": str(modules),
                        "produced_by": "Tests/Fixtures/sampling/make_pipeline.py"})
    print(f"wrote pipeline.safetensors ({len(settings)} cases) and lora_tiny.safetensors ({modules} modules); model sha256 {sha}")


if __name__ == "__main__":
    main()
