#!/usr/bin/env python3
"""PyTorch CPU side of the engine benchmark: same row specs and JSON lines as lora-dist-bench.

    python3 bench/torch_bench.py --rows 'linear:4096,640,640;conv_fwd:1,320,64,64,320,1,1' [--reps 3] [--min-time 0.3]
    python3 bench/torch_bench.py --mem --warmup-row attn:1,128,128,640,10 --rows attn:1,4096,4096,640,10
    python3 bench/torch_bench.py --serve     # one 'spec reps min_time' line per command on stdin

Each row is the PyTorch equivalent of the lora-dist kernel call (see bench/README.md):
  linear:M,K,N        F.linear(x[M,K], w[N,K])                      (no bias)
  conv_fwd:N,Ci,H,W,Co,s,p   F.conv2d(x, w[Co,Ci,3,3], b, s, p)
  conv_dx:...         torch.autograd.grad(y, x, dY) on a retained graph (weight, bias frozen)
  attn:B,Nq,Nk,C,H    F.scaled_dot_product_attention on [B,H,N,D], forward + grad for q, k, v
  gn:N,C,H,W,G        F.group_norm forward + grad for x, weight, bias
  geglu:B,M,2F        h, g = x.chunk(2, -1); h * F.gelu(g), forward + grad for x
"""
import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F


def proc_status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def ints(spec, count):
    v = [int(t) for t in spec.split(":", 1)[1].split(",")]
    if len(v) != count:
        raise SystemExit(f"row {spec} needs {count} integers")
    return v


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(shape, seed, std=1.0):
    return torch.randn(shape, generator=gen(seed)) * std


def make_row(spec):
    """Returns a function that runs one timed iteration. "bf16.<row>": the row as kohya's mixed_precision = "bf16"
    runs it — frozen weights cast to bf16 once, the op under torch.autocast("cpu", bfloat16)."""
    if spec.startswith("bf16."):
        inner = spec[5:]
        kind = inner.split(":", 1)[0]
        if kind == "linear":
            m, k, n = ints(inner, 3)
            x, w = randn([m, k], 1), randn([n, k], 2, 0.05).bfloat16()

            def run():
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    F.linear(x, w)
            return run
        if kind in ("conv_fwd", "conv_dx"):
            n, cin, h, wd, cout, s, p = ints(inner, 7)
            x = randn([n, cin, h, wd], 1)
            w, b = randn([cout, cin, 3, 3], 2, 0.02).bfloat16(), randn([cout], 3, 0.1).bfloat16()
            if kind == "conv_fwd":
                def run():
                    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                        F.conv2d(x, w, b, stride=s, padding=p)
                return run
            x.requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = F.conv2d(x, w, b, stride=s, padding=p)
            dy = randn(list(y.shape), 4).bfloat16()

            def run():
                torch.autograd.grad(y, x, dy, retain_graph=True)
            return run
        raise SystemExit(f"no bf16 variant of {spec}")
    kind = spec.split(":", 1)[0]
    if kind == "linear":
        m, k, n = ints(spec, 3)
        x, w = randn([m, k], 1), randn([n, k], 2, 0.05)

        def run():
            with torch.no_grad():
                F.linear(x, w)
        return run
    if kind in ("conv_fwd", "conv_dx"):
        n, cin, h, wd, cout, s, p = ints(spec, 7)
        x = randn([n, cin, h, wd], 1)
        w, b = randn([cout, cin, 3, 3], 2, 0.02), randn([cout], 3, 0.1)
        if kind == "conv_fwd":
            def run():
                with torch.no_grad():
                    F.conv2d(x, w, b, stride=s, padding=p)
            return run
        x.requires_grad_(True)   # weight and bias frozen: input gradient only (LoRA)
        y = F.conv2d(x, w, b, stride=s, padding=p)
        dy = randn(list(y.shape), 4)

        def run():
            torch.autograd.grad(y, x, dy, retain_graph=True)
        return run
    if kind == "attn":
        b, nq, nk, c, heads = ints(spec, 5)
        d = c // heads
        q = randn([b, heads, nq, d], 1).requires_grad_(True)
        k = randn([b, heads, nk, d], 2).requires_grad_(True)
        v = randn([b, heads, nk, d], 3).requires_grad_(True)
        do = randn([b, heads, nq, d], 4)

        def run():
            out = F.scaled_dot_product_attention(q, k, v)
            torch.autograd.grad(out, (q, k, v), do)
        return run
    if kind == "gn":
        n, c, h, wd, groups = ints(spec, 5)
        x = randn([n, c, h, wd], 1).requires_grad_(True)
        w = randn([c], 2, 0.1).requires_grad_(True)
        bias = randn([c], 3, 0.1).requires_grad_(True)
        dy = randn([n, c, h, wd], 4)

        def run():
            y = F.group_norm(x, groups, w, bias, eps=1e-5)
            # Same as grad of (y·dy).sum(), without the extra multiply and sum kernels.
            torch.autograd.grad(y, (x, w, bias), dy)
        return run
    if kind == "geglu":
        b, m, two = ints(spec, 3)
        x = randn([b, m, two], 1).requires_grad_(True)
        dy = randn([b, m, two // 2], 2)

        def run():
            h, g = x.chunk(2, dim=-1)
            y = h * F.gelu(g)
            torch.autograd.grad(y, x, dy)
        return run
    raise SystemExit(f"unknown row kind in {spec}")


def measure(run, reps, min_time, warmup):
    """Warm-up (`warmup` calls, then more while a short row has had under 0.1 s), then samples until
    there are at least `reps` of them and `min_time` seconds have passed (at most 200)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        run()
    if warmup > 0:
        while time.perf_counter() - t0 < 0.1:
            s = time.perf_counter()
            run()
            if time.perf_counter() - s > 0.05:
                break
    samples = []
    t0 = time.perf_counter()
    while len(samples) < reps or (time.perf_counter() - t0 < min_time and len(samples) < 200):
        s = time.perf_counter()
        run()
        samples.append(time.perf_counter() - s)
    return samples


def emit(obj):
    print(json.dumps(obj), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="")
    ap.add_argument("--serve", action="store_true", help="read 'spec reps min_time' lines on stdin")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=0.3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem", action="store_true")
    ap.add_argument("--warmup-row")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(True)
    emit({"side": "torch", "info": {"torch": torch.__version__, "threads": torch.get_num_threads()}})
    rows = [r for r in a.rows.split(";") if r]
    if a.mem:
        if a.warmup_row:
            make_row(a.warmup_row)()
        for spec in rows:
            run = make_row(spec)
            base = proc_status_kb("VmRSS")
            reset_peak_rss()
            run()
            peak = proc_status_kb("VmHWM")
            emit({"side": "torch", "row": spec, "peak_mb": round((peak - base) / 1024, 1)})
        return
    if a.serve:
        # One command per stdin line, "spec reps min_time"; rows are built once and kept.
        cache, last = {}, {}
        for line in sys.stdin:
            parts = line.split()
            if not parts:
                continue
            if parts[0] == "quit":
                break
            spec = parts[0]
            reps = int(parts[1]) if len(parts) > 1 else a.reps
            min_time = float(parts[2]) if len(parts) > 2 else a.min_time
            first = spec not in cache
            if first:
                cache[spec] = make_row(spec)
            warm = max(a.warmup, 1) if first else (1 if last.get(spec, 0) < 0.3 else 0)
            samples = measure(cache[spec], reps, min_time, warm)
            last[spec] = samples[-1]
            emit({"side": "torch", "row": spec, "samples": [round(t, 7) for t in samples]})
        return
    for spec in rows:
        emit({"side": "torch", "row": spec,
              "samples": [round(t, 7) for t in measure(make_row(spec), a.reps, a.min_time, max(a.warmup, 1))]})

if __name__ == "__main__":
    sys.exit(main())
