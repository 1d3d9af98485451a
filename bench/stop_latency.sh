#!/usr/bin/env bash
# Signal → saved state → exit, for SDXL LoRAs (issue 13): a random bf16 SDXL checkpoint (`lora-dist make-model
# --preset sdxl`, 6.9 GB, made once under bench/out/), one 512² image, UNet LoRA rank 16 and 64 (AdamW: the state
# holds the LoRA and both moments), mixed_precision bf16, one rank. SIGTERM arrives 2 s into step 2; the trainer
# saves step 1's state and exits 75. Prints one line per run and the medians; the CPU model and the load with each.
#
#   bench/stop_latency.sh [ROUNDS]        (default 3; needs the release build: swift build -c release)
set -uo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
BIN=.build/release/lora-dist
W=bench/out/stop_latency
mkdir -p "$W/img"
[[ -x "$BIN" ]] || { echo "build first: swift build -c release --product lora-dist" >&2; exit 2; }
[[ -f bench/out/sdxl_bf16.safetensors ]] || "$BIN" make-model --preset sdxl --seed 1 --dtype bf16 --out bench/out/sdxl_bf16.safetensors
python3 - "$W/img/a.png" <<'EOF'
import sys
from PIL import Image
im = Image.new("RGB", (512, 512))
px = im.load()
for y in range(512):
    for x in range(512):
        px[x, y] = ((x * 3) % 256, (y * 5) % 256, ((x + y) * 7) % 256)
im.save(sys.argv[1])
EOF
echo "a gradient, test image" > "$W/img/a.txt"
for r in 16 64; do
    cat > "$W/cfg$r.toml" <<EOF
pretrained_model_name_or_path = "$PWD/bench/out/sdxl_bf16.safetensors"
train_data_dir = "$PWD/$W/img"
caption_extension = ".txt"
resolution = 512
network_module = "networks.lora"
network_dim = $r
network_alpha = $r
network_train_unet_only = true
optimizer_type = "AdamW"
learning_rate = 1e-4
max_train_steps = 3
mixed_precision = "bf16"
seed = 1
output_dir = "$PWD/$W/out$r"
output_name = "lat"
EOF
done
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $(date -u '+%Y-%m-%d %H:%M UTC')"
declare -A all
for round in $(seq 1 "$ROUNDS"); do
    for r in 16 64; do
        rm -rf "$W/out$r"
        "$BIN" train "$W/cfg$r.toml" --requeue-on-stop > "$W/log$r.txt" 2>&1 &
        pid=$!
        while ! grep -q '"step":1' "$W/out$r/lat-metrics.jsonl" 2>/dev/null; do
            sleep 0.2; kill -0 $pid 2>/dev/null || { echo "rank $r: the run ended early:"; tail -5 "$W/log$r.txt"; exit 1; }
        done
        sleep 2
        load=$(cut -d' ' -f1 /proc/loadavg)
        t0=$(date +%s.%N)
        kill -TERM $pid
        wait $pid; rc=$?
        s=$(echo "$(date +%s.%N) - $t0" | bc)
        size=$(stat -c %s "$W"/out$r/lat-state/*.ldstate)
        echo "rank $r round $round: exit $rc, signal→exit $s s, state $size bytes, load $load; $(grep -o 'saved the state of step [0-9]* in [0-9.]* s' "$W/log$r.txt")"
        all[$r]="${all[$r]:-} $s"
    done
done
for r in 16 64; do
    echo "rank $r: median $(echo ${all[$r]} | tr ' ' '\n' | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}') s, best $(echo ${all[$r]} | tr ' ' '\n' | sort -g | head -1) s"
done
