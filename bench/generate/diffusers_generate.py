#!/usr/bin/env python3
"""diffusers side of the generation benchmark: StableDiffusionXLPipeline on CPU, one image, one process.

    python3 bench/generate/diffusers_generate.py --model bench/out/sdxl_bf16.safetensors --size 1024 --steps 2 \
        [--precision fp32|bf16-autocast] [--threads 2] [--cfg 7]

The pipeline is built from the same single-file checkpoint lora-dist reads (random weights: speed only), with
diffusers' own single-file converters (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint,
convert_open_clip_checkpoint) into UNet2DConditionModel / AutoencoderKL / CLIPTextModel / CLIPTextModelWithProjection with
SDXL base's configurations, fp32 parameters; the scheduler EulerAncestralDiscreteScheduler from SDXL's scheduler config
(Euler a, lora-dist generate's default); CLIP tokenizers from lora-dist's bundled BPE tables. Attention: diffusers'
default AttnProcessor2_0 (SDPA). bf16-autocast: the pipeline call and the decode under torch.autocast("cpu", bfloat16).

Timed separately: encode_prompt (both encoders, prompt and negative), each denoising step (callback_on_step_end
timestamps; CFG: the UNet at batch 2), the VAE decode (vae.decode + postprocess). Prints one JSON line:
{"side": "diffusers", "precision", "size", "steps": [s…], "text", "decode", "total", "peak_mb", "torch"}.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "bench"))
sys.path.insert(0, os.path.join(REPO, "Tests/Fixtures/sdxl"))
sys.path.insert(0, os.path.join(REPO, "Tests/Fixtures/sampling"))


def peak_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def build(path):
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    from unet_bench import SDXL_UNET_CONFIG
    from make_pipeline import load_text
    from make_samplers import SDXL_SCHEDULER
    import make_tokens

    def part(prefix):
        with safe_open(path, "pt") as f:
            return {k: f.get_tensor(k).float() for k in f.keys() if k.startswith(prefix)}

    unet = UNet2DConditionModel(**SDXL_UNET_CONFIG).eval()
    unet.load_state_dict(convert_ldm_unet_checkpoint(part("model.diffusion_model."), {"layers_per_block": 2, "addition_embed_type": "text_time"}), strict=True)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=False).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(part("first_stage_model."), {"down_block_types": ["DownEncoderBlock2D"] * 4,
                                                                               "up_block_types": ["UpDecoderBlock2D"] * 4}), strict=True)
    cfg_l = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406,
                           eos_token_id=49407, pad_token_id=49407)
    cfg_g = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                           max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, bos_token_id=49406,
                           eos_token_id=49407, pad_token_id=0)
    te1 = load_text(CLIPTextModel(cfg_l).eval(), convert_ldm_clip_checkpoint(part("conditioner.embedders.0.transformer.")))
    te2 = load_text(CLIPTextModelWithProjection(cfg_g).eval(),
                    convert_open_clip_checkpoint(None, part("conditioner.embedders.1.model."), prefix="conditioner.embedders.1.model."))
    folder = tempfile.mkdtemp()
    make_tokens.write_vocab_files(folder)
    tok1 = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77)
    tok2 = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), pad_token="!", model_max_length=77)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2, unet=unet,
                                     scheduler=EulerAncestralDiscreteScheduler.from_config(SDXL_SCHEDULER))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--precision", choices=["fp32", "bf16-autocast"], default="fp32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", default="1girl, solo, masterpiece, best quality, looking at viewer, upper body, city at night")
    ap.add_argument("--negative", default="lowres, bad anatomy, bad hands, worst quality, low quality")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    load_start = time.perf_counter()
    pipe = build(a.model)
    load = time.perf_counter() - load_start
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.precision == "bf16-autocast")
    with torch.no_grad(), autocast:
        t0 = time.perf_counter()
        emb = pipe.encode_prompt(a.prompt, negative_prompt=a.negative, do_classifier_free_guidance=a.cfg > 1)
        text = time.perf_counter() - t0
        marks = []

        def on_step(p, i, t, kw):
            marks.append(time.perf_counter())
            return kw

        start = time.perf_counter()
        latents = pipe(prompt_embeds=emb[0], negative_prompt_embeds=emb[1], pooled_prompt_embeds=emb[2],
                       negative_pooled_prompt_embeds=emb[3], width=a.size, height=a.size, num_inference_steps=a.steps,
                       guidance_scale=a.cfg, generator=torch.Generator().manual_seed(1), output_type="latent",
                       callback_on_step_end=on_step).images
        steps = [m - p for m, p in zip(marks, [start] + marks[:-1])]
        t1 = time.perf_counter()
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
        image = (image * 255).round().astype("uint8")
        decode = time.perf_counter() - t1
    print(json.dumps({"side": "diffusers", "precision": a.precision, "size": a.size, "steps": steps, "text": text, "decode": decode,
                      "total": text + sum(steps) + decode, "load": load, "peak_mb": peak_mb(), "threads": a.threads,
                      "torch": torch.__version__, "diffusers": __import__("diffusers").__version__}), flush=True)


if __name__ == "__main__":
    main()
