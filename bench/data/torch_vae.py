"""PyTorch reference for the data-pipeline bench: PIL decode + resize (LANCZOS) + center crop, then
diffusers AutoencoderKL (SDXL VAE config, fp32, random init) encode. Stages timed separately.
precision: fp32 (default); bf16-autocast (weights fp32, encode under torch.autocast("cpu", bfloat16)); bf16 (the VAE
cast to bfloat16, as kohya caches latents when mixed_precision is bf16 and no_half_vae is off).
Usage: python3 torch_vae.py <image-folder> <resolution> <repeats> [precision]  -> one JSON line."""
import contextlib
import json, os, statistics, sys, time
import numpy as np, torch
from PIL import Image
from diffusers import AutoencoderKL

torch.set_num_threads(2)
folder, res, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
precision = sys.argv[4] if len(sys.argv) > 4 else "fp32"
assert precision in ("fp32", "bf16-autocast", "bf16"), precision
files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".png"))

def decode(path):
    im = Image.open(path).convert("RGB")
    s = res / min(im.size)  # cover the square, then center-crop (kohya resizes to the bucket then crops)
    w, h = max(res, round(im.size[0] * s)), max(res, round(im.size[1] * s))
    im = im.resize((w, h), Image.LANCZOS)
    l, t = (w - res) // 2, (h - res) // 2
    a = np.asarray(im.crop((l, t, l + res, t + res)), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1)[None].contiguous()

torch.manual_seed(0)
vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                    block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=1024).eval()
dtype = torch.bfloat16 if precision == "bf16" else torch.float32
vae.to(dtype)
ctx = (lambda: torch.autocast("cpu", torch.bfloat16)) if precision == "bf16-autocast" else contextlib.nullcontext
n_enc = 1  # one encode per repeat: a 1024² fp32 encode takes tens of seconds on 2 threads
dec_t, enc_t = [], []
with torch.inference_mode(), ctx():
    vae.encode(torch.zeros(1, 3, 64, 64, dtype=dtype)).latent_dist.sample()  # warm-up (allocator, kernels) at a small size
    for _ in range(reps):
        t0 = time.perf_counter(); xs = [decode(f) for f in files]; dec_t.append((time.perf_counter() - t0) / len(files))
        t0 = time.perf_counter()
        for x in xs[:n_enc]:
            vae.encode(x.to(dtype)).latent_dist.sample()
        enc_t.append((time.perf_counter() - t0) / n_enc)
d, e = statistics.median(dec_t), statistics.median(enc_t)
print(json.dumps({"impl": "torch", "precision": precision, "res": res, "decode_s": d, "encode_s": e, "images_per_s": 1 / (d + e),
                  "torch": torch.__version__, "threads": 2}))
