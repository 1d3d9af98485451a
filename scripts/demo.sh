#!/usr/bin/env bash
# The main job on a fresh machine: set up (scripts/setup.sh: packages + release build), then train the demo LoRA
# (configs/demo.toml: the built-in tiny SDXL-shaped model on the built-in drawn-shapes dataset) on 2 MPI ranks.
#   scripts/demo.sh                 → output/demo/demo.safetensors (+ metrics, TensorBoard events, sample images in
#                                     output/demo/sample/)
#   scripts/demo.sh --ranks 4       more ranks (oversubscribed when the machine has fewer cores)
# Extra arguments after the options go to `lora-dist train` (e.g. --max-train-steps 20).
set -euo pipefail
cd "$(dirname "$0")/.."
ranks=2
if [ "${1:-}" = "--ranks" ]; then ranks=$2; shift 2; fi
scripts/setup.sh
# Open MPI refuses to run as root unless told; CI containers and fresh cloud machines often are root.
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
mpirun -np "$ranks" --oversubscribe .build/release/lora-dist train configs/demo.toml "$@"
if compgen -G "output/demo/sample/*.png" > /dev/null; then
    echo "sample images (made with the LoRA at the end of training): $(pwd)/output/demo/sample/"
    echo "more: .build/release/lora-dist generate --model output/demo/cache/builtin-tiny.safetensors --lora output/demo/demo.safetensors --prompt 'demo_trigger, red star, blue background' --width 128 --height 128"
fi
