#!/usr/bin/env bash
# The end-to-end training benchmark in one command: builds TrainBench and lora-dist (release), writes the random
# tiny model (and the random bf16 SDXL UNet, ~5.1 GB, if bench/unet_run.sh has not already) under bench/out/, then
# runs bench/train/report.py: one LoRA training step, lora-dist against PyTorch (diffusers + peft) fp32 and bf16
# autocast, on the tiny and the sdxl preset at 512², batch 1; then `lora-dist train` images/s at np = 1 and 2
# (locally and across cluster/netns/harness.sh at 1 Gbit/s, which needs root). Writes the "LoRA training step"
# section of bench/RESULTS.md. About 20–25 minutes on 2 cores (the release build not counted).
#
# Usage: bench/train/run.sh [report.py options: --phases step,scale --cases sdxl512 --runs np1t2,np2 …]
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PYTHON:-python3}
"$PY" -c "import torch, diffusers, peft; print('torch', torch.__version__, '· diffusers', diffusers.__version__, '· peft', peft.__version__)" || {
    echo "needs PyTorch, diffusers and peft: $PY -m pip install 'torch==2.13.0+cpu' diffusers peft" >&2; exit 1; }
command -v mpirun >/dev/null || { echo "needs mpirun (apt-get install openmpi-bin) for the np = 2 rows" >&2; exit 1; }

echo "== building TrainBench, lora-dist-unet-bench (the no-LoRA reference row) and lora-dist (release)"
swift build -c release --product TrainBench
swift build -c release --product lora-dist-unet-bench
swift build -c release --product lora-dist
mkdir -p bench/out
if [ ! -f bench/out/tiny_f32.safetensors ]; then
    .build/release/lora-dist make-model --preset tiny --dtype fp32 --unet-only --out bench/out/tiny_f32.safetensors
fi
if [ ! -f bench/out/sdxl_unet_bf16.safetensors ]; then
    df -BG --output=avail bench | tail -1 | awk '{ if ($1 + 0 < 8) { print "need ~8 GB free disk under bench/out" > "/dev/stderr"; exit 1 } }'
    echo "== writing bench/out/sdxl_unet_bf16.safetensors"
    .build/release/lora-dist make-model --preset sdxl --dtype bf16 --unet-only --threads 2 \
        --out bench/out/sdxl_unet_bf16.safetensors
fi
echo "== load before: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" bench/train/report.py "$@"
