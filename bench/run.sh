#!/usr/bin/env bash
# The engine benchmark in one command: installs PyTorch CPU if missing, builds lora-dist-bench
# (release), runs it side by side with bench/torch_bench.py and writes bench/RESULTS.md.
# Extra arguments go to bench/report.py (e.g. --rounds 5, --groups conv,attn).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "== installing PyTorch 2.13.0 (CPU)"
    "$PY" -m pip install "torch==2.13.0+cpu"
fi
"$PY" -c "import torch; v = torch.__version__; print('torch', v)
if not v.startswith('2.13'): print('warning: the bench is written against torch 2.13, found', v)"

echo "== building lora-dist-bench (release)"
swift build -c release --product lora-dist-bench

echo "== running (about 5 minutes on 2 cores)"
"$PY" bench/report.py "$@"
