#!/usr/bin/env bash
# SDXL np 1 / np 2 scaling rows (issue 14): builds lora-dist (release), writes the random full SDXL checkpoint in bf16
# (~6.9 GB under bench/out/, once), then bench/scaling/report.py. Needs root for the netns links (cluster/netns).
# About 2–3 minutes per run on 2 cores; every run: `bench/scaling/report.py --help`.
#
# Usage: bench/scaling/run.sh [report.py options: --runs r16-np1,r16-np2-1gbit-overlap … --steps 4]
set -euo pipefail
cd "$(dirname "$0")/../.."
swift build -c release --product lora-dist
mkdir -p bench/out
if [ ! -f bench/out/sdxl_bf16.safetensors ]; then
    df -BG --output=avail bench | tail -1 | awk '{ if ($1 + 0 < 10) { print "need ~10 GB free disk under bench/out" > "/dev/stderr"; exit 1 } }'
    .build/release/lora-dist make-model --preset sdxl --dtype bf16 --threads 2 --out bench/out/sdxl_bf16.safetensors
fi
echo "== $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-) · load before: $(cut -d' ' -f1-3 /proc/loadavg)"
python3 bench/scaling/report.py "$@"
