#!/usr/bin/env bash
# Gradient all-reduce benchmark: MPIHarness's `bench` mode (Tests/MPIHarness/main.swift) at np = 2 and 3,
# every wire format and algorithm side by side with plain MPI_Allreduce in the same mpirun, over loopback
# (Open MPI's shared-memory/TCP transports on one machine) and over network-namespace links shaped with tc
# (cluster/netns/harness.sh: veth + tbf at the given rate, TCP only; --delay adds a one-way netem delay
# where the kernel has sch_netem — this machine's kernel does not, so the default is none). Appends JSON
# lines to bench/out/allreduce.jsonl, then rewrites the "Gradient all-reduce" section of bench/RESULTS.md.
#
# Usage: bench/allreduce/run.sh [--floats "42600000 170000000"] [--reps 5] [--nps "2 3"]
#                               [--links "loopback 10gbit 1gbit"] [--delay 0.5ms] [--level 1] [--report-only]
#                               [--gradients DIR --steps "1 5"]   (real gradients: `lora-dist train` with
#                               LORA_DIST_BENCH_DUMP_GRADIENTS=DIR LORA_DIST_BENCH_DUMP_STEPS=1,5; replaces --floats)
# 42.6 M floats = SDXL kohya-default LoRA targets at rank 16 (170 MB); 170 M = rank 64 (681 MB).
# netns links need root (ip netns); the harness cleans up after itself.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
FLOATS="42600000"; REPS=5; NPS="2 3"; LINKS="loopback 10gbit 1gbit"; LEVEL=1; REPORT_ONLY=0; DELAY=""; GRADIENTS=""; STEPS="1"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --floats) FLOATS="$2"; shift 2 ;;
        --reps) REPS="$2"; shift 2 ;;
        --nps) NPS="$2"; shift 2 ;;
        --links) LINKS="$2"; shift 2 ;;
        --level) LEVEL="$2"; shift 2 ;;
        --delay) DELAY="$2"; shift 2 ;;
        --report-only) REPORT_ONLY=1; shift ;;
        --gradients) GRADIENTS="$2"; shift 2 ;;
        --steps) STEPS="$2"; shift 2 ;;
        *) echo "run.sh: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
OUT="$ROOT/bench/out/allreduce.jsonl"
mkdir -p "$ROOT/bench/out"
if [[ $REPORT_ONLY == 0 ]]; then
    BIN="${MPIHARNESS_BIN:-}"
    if [[ -z "$BIN" ]]; then
        swift build -c release --product MPIHarness
        BIN="$ROOT/.build/release/MPIHarness"
    fi
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    for link in $LINKS; do
        for np in $NPS; do
            # Real gradients (--gradients DIR): one run per dumped step; otherwise one per synthetic size.
            for item in $([[ -n $GRADIENTS ]] && echo "$STEPS" || echo "$FLOATS"); do
                if [[ -n $GRADIENTS ]]; then
                    echo "== $link np=$np gradients=$GRADIENTS step=$item" >&2
                    args=(bench --gradients "$GRADIENTS" --step "$item" --reps "$REPS" --level "$LEVEL")
                else
                    echo "== $link np=$np floats=$item" >&2
                    args=(bench --floats "$item" --reps "$REPS" --level "$LEVEL")
                fi
                if [[ $link == loopback ]]; then
                    mpirun -np "$np" --oversubscribe "$BIN" "${args[@]}"
                else
                    cluster/netns/harness.sh with "$np" --rate "$link" ${DELAY:+--delay "$DELAY"} -- \
                        sh -c '"$HARNESS" run "$HARNESS_ID" -np '"$np"' -- "$0" "$@"' "$BIN" "${args[@]}"
                fi | grep '^{' | sed "s/^{/{\"link\": \"$link\", /" | tee -a "$OUT"
            done
        done
    done
fi
python3 "$ROOT/bench/allreduce/report.py" "$OUT" "$ROOT/bench/RESULTS.md"
