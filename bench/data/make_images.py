"""Eight photo-sized PNGs per resolution (gradients + noise, so PNG decode does real work), with captions."""
import os, sys
import numpy as np
from PIL import Image
root = sys.argv[1]; rng = np.random.default_rng(0)
for res, (w, h) in [(512, (768, 512)), (1024, (1216, 832))]:
    d = f"{root}/img{res}"; os.makedirs(d, exist_ok=True)
    y, x = np.mgrid[0:h, 0:w]
    for i in range(8):
        a = np.stack([x * (i + 1) % 256, y * (i + 2) % 256, (x + y) // 3 % 256], -1).astype(np.float32)
        a = np.clip(a + rng.normal(0, 12, a.shape), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(f"{d}/{i:02d}.png")
        open(f"{d}/{i:02d}.txt", "w").write("a test image")
