#!/usr/bin/env bash
# lora-dist generate vs diffusers' StableDiffusionXLPipeline (CPU), and a prompt list on 1 vs 2 ranks: writes the
# generation section of bench/RESULTS.md (bench/generate/report.py says what is timed). Needs PyTorch + diffusers +
# transformers (+ ftfy and open_clip_torch for the CLIP vocabulary), and bench/out/sdxl_bf16.safetensors (written here if
# missing, ~7 GB). About 25 minutes on 2 cores at the defaults.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
"$PY" -c "import torch, diffusers, transformers, ftfy" || {
    echo "needs: $PY -m pip install 'torch==2.13.0+cpu' diffusers transformers ftfy open_clip_torch" >&2; exit 1; }
swift build -c release --product lora-dist
if [ ! -f bench/out/sdxl_bf16.safetensors ]; then
    .build/release/lora-dist make-model --preset sdxl --dtype bf16 --threads 2 --out bench/out/sdxl_bf16.safetensors
fi
exec "$PY" bench/generate/report.py "$@"
