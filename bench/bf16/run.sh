#!/usr/bin/env bash
# The bf16 kernel family against fp32 and PyTorch's bf16 in one run: machine peaks (bench/bf16/peak.c), GEMM and conv
# rows (lora-dist-bench vs bench/torch_bench.py), and the SDXL LoRA step at 512² (and 1024²) (TrainBench vs
# bench/train/torch_train.py). Writes the bf16 section of bench/RESULTS.md. Needs PyTorch + diffusers + peft, a CPU
# with AVX512-BF16 and ~8 GB of disk for the random SDXL UNet (shared with bench/train/run.sh).
#
# Usage: bench/bf16/run.sh [report.py options: --phases peak,kernels,step,vae --cases sdxl512,sdxl1024ckpt,sdxl1024]
set -euo pipefail
cd "$(dirname "$0")/../.."

PY=${PYTHON:-python3}
"$PY" -c "import torch, diffusers, peft; print('torch', torch.__version__, '· diffusers', diffusers.__version__, '· peft', peft.__version__)" || {
    echo "needs PyTorch, diffusers and peft: $PY -m pip install 'torch==2.13.0+cpu' diffusers peft" >&2; exit 1; }
grep -q avx512_bf16 /proc/cpuinfo || { echo "this CPU has no AVX512-BF16: lora-dist's bf16 family falls back to fp32 here" >&2; exit 1; }

echo "== building lora-dist-bench, TrainBench and lora-dist (release), bench/out/peak"
swift build -c release --product lora-dist-bench
swift build -c release --product TrainBench
swift build -c release --product lora-dist
swift build -c release --product DataBench
mkdir -p bench/out
cc -O3 -funroll-loops -fopenmp -mavx512f -mavx512bf16 bench/bf16/peak.c -o bench/out/peak
if [ ! -f bench/out/sdxl_unet_bf16.safetensors ]; then
    echo "== writing bench/out/sdxl_unet_bf16.safetensors"
    .build/release/lora-dist make-model --preset sdxl --dtype bf16 --unet-only --threads 2 \
        --out bench/out/sdxl_unet_bf16.safetensors
fi
echo "== load before: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" bench/bf16/report.py "$@"
