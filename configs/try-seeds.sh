#!/usr/bin/env bash
# Runs the two seed configs for a few steps on this machine, without the real checkpoints or datasets: a random-weight
# SDXL checkpoint (`lora-dist make-model --preset sdxl`, the real dims and key layout) stands in for the model, and drawn
# shapes (builtin:shapes images at SDXL sizes) for the datasets, in the layouts the configs name:
#   models/Illustrious-XL-v0.1.safetensors, models/wai-illustrious-sdxl.safetensors  → one stand-in (a symlink)
#   dataset/img/1_character_name/   (kohya repeat folder, illustrious-character.toml)
#   dataset/character/              (flat folder + .txt, wai-character.toml)
# Paths in the configs are relative to the working directory (as kohya's), so everything happens in WORK.
#
#   configs/try-seeds.sh [WORK] [STEPS] [IMAGES]      defaults: /tmp/lora-dist-seeds, 1 step, 2 images per dataset
#
# Real data takes the same commands: put the checkpoint and images at those paths and drop --max-train-steps.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-/tmp/lora-dist-seeds}"
steps="${2:-1}"
images="${3:-2}"
bin="$root/.build/release/lora-dist"
[ -x "$bin" ] || (cd "$root" && swift build -c release --product lora-dist)
mkdir -p "$work/models" "$work/dataset"
cd "$work"

model="$work/models/sdxl-random-bf16.safetensors"
if [ ! -f "$model" ]; then
    echo "== making a random-weight SDXL checkpoint (bf16, ~7 GB)"
    /usr/bin/time -f "make-model: %e s, peak %M KB" "$bin" make-model --preset sdxl --dtype bf16 --seed 1 --out "$model"
fi
ln -sf "$model" models/Illustrious-XL-v0.1.safetensors
ln -sf "$model" models/wai-illustrious-sdxl.safetensors

# Stand-in images: the drawn-shapes demo set at SDXL sizes (1024², 832×1216, …; `lora-dist dataset builtin:shapes`
# writes it to $TMPDIR/lora-dist-builtin-shapes), the first $images into each folder.
"$bin" dataset builtin:shapes >/dev/null
shapes="${TMPDIR:-/tmp}/lora-dist-builtin-shapes"
for folder in dataset/img/1_character_name dataset/character; do
    rm -rf "$folder" && mkdir -p "$folder"
    for ((i = 0; i < images; i++)); do
        n=$(printf "%04d" "$i")
        cp "$shapes/shapes_$n.png" "$folder/img_$n.png"
        cp "$shapes/shapes_$n.txt" "$folder/img_$n.txt"
    done
done

for cfg in illustrious-character wai-character; do
    echo "== $cfg: $steps step(s) on $images stand-in images"
    /usr/bin/time -f "$cfg: %e s wall, peak RSS %M KB" \
        "$bin" train "$root/configs/$cfg.toml" --output-dir "$work/out/$cfg" --max-train-steps "$steps"
done
