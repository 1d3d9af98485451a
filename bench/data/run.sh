#!/usr/bin/env bash
# Data-pipeline bench: decode + resize + VAE encode throughput (lora-dist cache vs PyTorch/PIL reference) and
# latent-cache wall time at np = 1 and 2. Random-weight models; 2 threads per process. Appends JSON lines to
# bench/out/data_raw.jsonl. Usage: bench/data/run.sh [lora-dist binary] [sdxl checkpoint or ""]
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${1:-.build/debug/lora-dist}; SDXL=${2:-}
W=$(mktemp -d); OUT=bench/out/data_raw.jsonl; mkdir -p bench/out
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
"$BIN" make-model --preset tiny --out "$W/tiny.safetensors" >/dev/null
python3 bench/data/make_images.py "$W"
# One timed `lora-dist cache` on a fresh cache dir; wall seconds on stdout.
cache_once() { # model res np
  rm -rf "$W/cache"; local t0 t1
  t0=$(date +%s.%N)
  if [ "$3" = 1 ]; then "$BIN" cache "$W/img$2" --model "$1" --cache-dir "$W/cache" --resolution "$2" --threads 2 >/dev/null 2>&1
  else mpirun -np "$3" --oversubscribe "$BIN" cache "$W/img$2" --model "$1" --cache-dir "$W/cache" --resolution "$2" --threads 2 >/dev/null 2>&1; fi
  t1=$(date +%s.%N); echo "$t1 - $t0" | bc
}
median() { sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
for spec in "tiny $W/tiny.safetensors 512 1" "tiny $W/tiny.safetensors 1024 1" "tiny $W/tiny.safetensors 512 2" \
            ${SDXL:+"sdxl $SDXL 512 1"}; do
  set -- $spec; reps=3; [ "$1" = sdxl ] && reps=1
  m=$(for i in $(seq $reps); do cache_once "$2" "$3" "$4"; done | median)
  n=$(ls "$W/img$3"/*.png | wc -l)
  echo "{\"impl\":\"lora-dist\",\"preset\":\"$1\",\"res\":$3,\"np\":$4,\"images\":$n,\"wall_s\":$m,\"reps\":$reps}" | tee -a "$OUT"
done
DB=$(dirname "$BIN")/DataBench
if [ -x "$DB" ]; then  # swift build --product DataBench
  for spec in "512 tiny" "1024 tiny" "512 sdxl" "1024 sdxl"; do set -- $spec; "$DB" "$W/img$1" "$1" "$2" 3 2 | tee -a "$OUT"; done
fi
for res in 512 1024; do python3 bench/data/torch_vae.py "$W/img$res" "$res" 3 | tee -a "$OUT"; done
rm -rf "$W"
