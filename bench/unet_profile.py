#!/usr/bin/env python3
"""Where the time of one lora-dist UNet step goes: perf samples of the main thread, by op kind and phase.

    python3 bench/unet_profile.py --model bench/out/sdxl_unet_bf16.safetensors [--latent 64] [--checkpointing] [--mode forward]
                                  [--freq 97] [--out bench/out/unet_profile.md]

Runs `lora-dist-unet-bench --mode backward (or forward) --warmup 1 --steps 1` under
`perf record -k CLOCK_MONOTONIC --call-graph dwarf` and keeps the main thread's samples inside the timed
step (the bench reports each step's [start, forward end, backward end] on the same clock). The main
thread runs every op and takes part in every parallel loop and OpenBLAS call, so its samples divide the
step's wall time; time it spent blocked (no sample) is shown as the remainder. Each sample is charged to
  - the op: the innermost engine op frame (Linear, Conv2d, Attention, norms, activations, elementwise,
    shape ops, autograd bookkeeping) on its stack, and
  - what the CPU was doing: sgemm (OpenBLAS kernels and packing), page zeroing (the kernel clearing fresh
    pages for new allocations), bf16→fp32 weight widening, OpenBLAS/dispatch spin-waiting, or the op's
    own loops.
Needs `perf` (linux-tools) with permission to profile the process (perf_event_paranoid ≤ 2).
"""
import argparse
import collections
import datetime
import json
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BIN = os.path.join(ROOT, ".build", "release", "lora-dist-unet-bench")
sys.path.insert(0, os.path.join(HERE, "bf16"))
from report import cpu_line  # noqa: E402  (one CPU description for every bench header)

# Innermost frame that names the op (Swift-mangled names contain these words).
OPS = [
    ("attention", re.compile(r"Tensor9Attention|Tape\w*attention")),
    ("conv2d", re.compile(r"Tensor6Conv2d|Tensor8Winograd|im2col|col2im|Tape\w*conv2d")),
    ("linear", re.compile(r"Tensor6Linear|Tape\w*6linear")),
    ("group norm", re.compile(r"Tensor9GroupNorm|Tape\w*groupNorm")),
    ("layer norm", re.compile(r"Tensor9LayerNorm|Tape\w*layerNorm")),
    ("GEGLU / SiLU / GELU", re.compile(r"Tensor10Activation|Tape\w*(geglu|silu|gelu)")),
    ("elementwise add/mul", re.compile(r"Tensor11Elementwise|BroadcastPlan|Tape\w*C3add|Tape\w*C3mul|Tape\w*C3sub")),
    ("shape (permute/concat/reshape)", re.compile(r"Tensor8ShapeOps|Tape\w*(permute|concat|reshape|slice|split|chunk)")),
    ("upsample", re.compile(r"Upsample|Tape\w*upsample")),
    ("embedding", re.compile(r"Tensor9Embedding|timestep")),
    ("autograd (gradient accumulation, tape)", re.compile(r"GradStore|Tape\w*8backward")),
]

LEAVES = [
    ("oneDNN kernels", re.compile(r"dnnl|jit_|brgemm|brgconv")),
    ("fp32→bf16 rounding", re.compile(r"lora_dnnl_to_bf16|packBF16")),
    ("OpenMP wait", re.compile(r"gomp_|GOMP_")),
    ("sgemm", re.compile(r"sgemm|exec_blas|inner_thread|blas_thread")),
    ("page zeroing (new allocations)", re.compile(r"clear_page|folio_zero|do_huge_pmd|do_anonymous_page|alloc_pages|get_page_from_freelist")),
    ("bf16→fp32 widen", re.compile(r"widen")),
    ("spin / yield / wake-up", re.compile(r"sched_yield|__schedule|do_sched_yield|futex|dispatch_semaphore|_dispatch_.*wait|syscall")),
    ("free / munmap", re.compile(r"munmap|unmap_page|free_pages|release_pages|__free|_int_free|zap_")),
]


def classify(frames, table, default):
    for f in frames:
        for name, rx in table:
            if rx.search(f):
                return name
    return default


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(HERE, "out", "sdxl_unet_bf16.safetensors"))
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--mode", choices=["backward", "forward"], default="backward",
                    help="forward: one inference forward (what each image-generation step runs)")
    ap.add_argument("--bf16", action="store_true", help="the bf16 kernel family (lora-dist-unet-bench --bf16)")
    ap.add_argument("--freq", type=int, default=97)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "out", "unet_profile.md"))
    ap.add_argument("--reuse", action="store_true", help="analyse the last recording again")
    a = ap.parse_args()
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    data = os.path.join(HERE, "out", "unet_profile.perf.data")
    cmd = [BIN, "--model", a.model, "--latent", str(a.latent), "--mode", a.mode, "--warmup", "1",
           "--steps", "1", "--threads", str(a.threads)] + (["--checkpointing"] if a.checkpointing else []) + (
           ["--bf16"] if a.bf16 else [])
    saved = os.path.join(HERE, "out", "unet_profile.json")
    if not a.reuse:
        rec = ["perf", "record", "-q", "-k", "CLOCK_MONOTONIC", "-F", str(a.freq), "--call-graph", "dwarf,16384",
               "-o", data, "--"] + cmd
        print("running:", " ".join(rec), flush=True)
        p = subprocess.run(rec, capture_output=True, text=True)
        result = None
        for line in p.stdout.splitlines():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "phases" in obj:
                result = obj
        if p.returncode != 0 or result is None:
            sys.exit(f"bench failed ({p.returncode}): {p.stderr.strip()[-2000:]}")
        with open(saved, "w") as f:
            json.dump(result, f)
    with open(saved) as f:
        result = json.load(f)
    start, fwd_end, bwd_end, _ = [ph for ph in result["phases"] if not ph[3]][0]

    script = subprocess.run(["perf", "script", "-i", data, "-F", "pid,tid,time,period,ip,sym"],
                            capture_output=True, text=True).stdout
    # seconds per (phase, op, leaf) from the main thread's samples
    cells = collections.Counter()
    sampled = collections.Counter()
    for block in script.split("\n\n"):
        lines = [l for l in block.strip().split("\n") if l.strip()]
        if not lines:
            continue
        head = lines[0].split()
        pid, tid = head[0].split("/")
        if pid != tid:
            continue
        t = float(head[1].rstrip(":"))
        period_s = int(head[2]) * 1e-9
        if not (start <= t < bwd_end):
            continue
        phase = "forward" if t < fwd_end else "backward"
        frames = [l.strip().split(None, 1)[1] if len(l.strip().split(None, 1)) > 1 else "" for l in lines[1:]]
        op = classify(frames, OPS, "other")
        leaf = classify(frames[:1] + frames[1:6], LEAVES, "op's own loops")
        if leaf == "op's own loops" and any("sgemm" in f or "exec_blas" in f for f in frames[:12]):
            leaf = "sgemm"
        cells[(phase, op, leaf)] += period_s
        sampled[phase] += period_s

    wall = {"forward": fwd_end - start, "backward": bwd_end - fwd_end}
    ops = sorted({k[1] for k in cells}, key=lambda o: -sum(v for k, v in cells.items() if k[1] == o))
    leaves = [n for n, _ in LEAVES] + ["op's own loops"]
    L = []
    L.append(f"Profile of one lora-dist {'bf16 ' if a.bf16 else ''}UNet forward{' + input-gradient backward' if a.mode == 'backward' else ' (inference)'}, latent {a.latent}×{a.latent}"
             f"{' with checkpointing' if a.checkpointing else ''} (perf, {a.freq} Hz, main thread, timed step only): "
             f"forward {wall['forward']:.2f} s, backward {wall['backward']:.2f} s; "
             f"sampled {sampled['forward']:.2f} / {sampled['backward']:.2f} s (the rest: main thread blocked). "
             f"Run {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC on **{cpu_line()}**.\n")
    L.append("| op | forward s | backward s | total s | share | " + " | ".join(leaves) + " |")
    L.append("|---|---:|---:|---:|---:|" + "---:|" * len(leaves))
    total_all = sum(cells.values())
    for op in ops:
        f = sum(v for k, v in cells.items() if k[0] == "forward" and k[1] == op)
        b = sum(v for k, v in cells.items() if k[0] == "backward" and k[1] == op)
        per = [sum(v for k, v in cells.items() if k[1] == op and k[2] == lf) for lf in leaves]
        L.append(f"| {op} | {f:.2f} | {b:.2f} | {f + b:.2f} | {100 * (f + b) / total_all:.0f} % | "
                 + " | ".join(f"{x:.2f}" for x in per) + " |")
    per = [sum(v for k, v in cells.items() if k[2] == lf) for lf in leaves]
    L.append(f"| **all** | {sampled['forward']:.2f} | {sampled['backward']:.2f} | {total_all:.2f} | 100 % | "
             + " | ".join(f"{x:.2f}" for x in per) + " |")
    if result.get("dnnl"):
        # oneDNN's JIT code has no unwind tables, so its samples above lose their op; the shim's own clocks
        # (DNNL.takeCounters, the timed step) say which oneDNN calls the time went to and at what rate.
        peak = None
        raw = os.path.join(HERE, "out", "bf16_raw.jsonl")
        if os.path.exists(raw):
            for line in open(raw):
                o = json.loads(line)
                if o.get("phase") == "peak":
                    peak = o.get("bf16_dot")
        L.append("")
        L.append("oneDNN calls in the same step (the shim's clocks around each call; the calling thread waits for each):")
        L.append("")
        L.append("| oneDNN call | forward s | backward s | calls | GFLOP | GFLOP/s" +
                 (f" | % of bf16 peak ({peak:.0f})" if peak else "") + " |")
        L.append("|---|---:|---:|---:|---:|---:|" + ("---:|" if peak else ""))
        kinds = []
        for c in result["dnnl"]:
            if c["kind"] not in kinds:
                kinds.append(c["kind"])
        tot = {"forward": 0.0, "backward": 0.0}
        for kind in kinds:
            rows = {c["phase"]: c for c in result["dnnl"] if c["kind"] == kind}
            fs, bs = rows.get("forward", {}).get("seconds", 0), rows.get("backward", {}).get("seconds", 0)
            fl = sum(r.get("flops", 0) for r in rows.values())
            calls = sum(r.get("calls", 0) for r in rows.values())
            tot["forward"] += fs
            tot["backward"] += bs
            rate = fl / (fs + bs) / 1e9 if fl and fs + bs else None
            L.append(f"| {kind} | {fs:.2f} | {bs:.2f} | {calls} | {fl / 1e9:.0f} | " + (f"{rate:.0f}" if rate else "—") +
                     (f" | {100 * rate / peak:.0f} %" if peak and rate else (" | —" if peak else "")) + " |")
        L.append(f"| **all oneDNN** | {tot['forward']:.2f} | {tot['backward']:.2f} | | | |" + (" |" if peak else ""))
        L.append(f"| rest of the step (engine loops, allocation, bookkeeping) | {wall['forward'] - tot['forward']:.2f} | "
                 f"{wall['backward'] - tot['backward']:.2f} | | | |" + (" |" if peak else ""))
    text = "\n".join(L) + "\n"
    with open(a.out, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
