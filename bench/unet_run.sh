#!/usr/bin/env bash
# The SDXL UNet benchmark in one command: builds lora-dist-unet-bench and lora-dist (release), writes the
# random bf16 SDXL UNet to bench/out/ if missing (~5.1 GB), profiles one lora-dist 512² step with perf, with and without checkpointing (if
# installed), then runs every case on both sides (about 20-25 minutes on 2 cores) and writes the
# "SDXL UNet" section of bench/RESULTS.md. Extra arguments go to bench/unet_report.py (e.g. --cases bwd512).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
"$PY" -c "import torch, diffusers; print('torch', torch.__version__, '· diffusers', diffusers.__version__)" || {
    echo "needs PyTorch and diffusers: $PY -m pip install 'torch==2.13.0+cpu' diffusers" >&2; exit 1; }
df -BG --output=avail bench | tail -1 | awk '{ if ($1 + 0 < 8) { print "need ~8 GB free disk under bench/out" > "/dev/stderr"; exit 1 } }'

echo "== building lora-dist-unet-bench and lora-dist (release)"
swift build -c release --product lora-dist-unet-bench
swift build -c release --product lora-dist
mkdir -p bench/out
if [ ! -f bench/out/sdxl_unet_bf16.safetensors ]; then
    echo "== writing bench/out/sdxl_unet_bf16.safetensors"
    .build/release/lora-dist make-model --preset sdxl --dtype bf16 --unet-only --threads 2 \
        --out bench/out/sdxl_unet_bf16.safetensors
fi
if command -v perf >/dev/null; then
    echo "== profiling one lora-dist 512² forward + backward (perf)"
    "$PY" bench/unet_profile.py --model bench/out/sdxl_unet_bf16.safetensors || echo "(profile skipped)"
    "$PY" bench/unet_profile.py --model bench/out/sdxl_unet_bf16.safetensors --checkpointing \
        --out bench/out/unet_profile_ckpt.md || echo "(profile skipped)"
fi
echo "== running the cases"
"$PY" bench/unet_report.py "$@"
