#!/usr/bin/env python3
"""SDXL data-parallel scaling (issue 14): `lora-dist train` on the full random SDXL checkpoint at np = 1 and np = 2,
one thread per rank, 512², batch 1 per rank, bf16 compute with gradient checkpointing, LoRA rank 16 and 64, over
loopback (Open MPI's shared memory) and cluster/netns/harness.sh links shaped to 1 and 10 Gbit/s, the all-reduce
overlapped with backward or after it. Figures come from rank 0's metrics JSONL: medians over the steps after the
first. Writes the "SDXL scaling" section of bench/RESULTS.md (between <!-- scaling:begin --> and <!-- scaling:end -->)
and bench/out/scaling_raw.jsonl.

    python3 bench/scaling/report.py [--runs r16-np1,r16-np2-1g-overlap,…] [--steps 4] [--from-raw]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
from unet_report import loadavg, mem_available_gb, replace_section, train_command  # noqa: E402  (shared bench helpers)

LORA_DIST = os.path.join(ROOT, ".build", "release", "lora-dist")
MODEL = os.path.join(BENCH, "out", "sdxl_bf16.safetensors")
WORK = os.path.join(BENCH, "out", "scaling")
# SCALING_RAW: another raw file (a rerun kept apart from the table's runs).
RAW = os.environ.get("SCALING_RAW", os.path.join(BENCH, "out", "scaling_raw.jsonl"))
RESULTS = os.path.join(BENCH, "RESULTS.md")
BEGIN, END = "<!-- scaling:begin -->", "<!-- scaling:end -->"

# name → (LoRA rank, ranks, link, overlap, wire format)
RUNS = {}
for r in (16, 64):
    RUNS[f"r{r}-np1"] = (r, 1, "—", None, "fp32")
    for link in ("loopback", "1gbit", "10gbit"):
        for overlap in (True, False):
            RUNS[f"r{r}-np2-{link}-{'overlap' if overlap else 'after'}"] = (r, 2, link, overlap, "fp32")
        # The plain MPI all-reduce (no codec on the communication thread), overlapped.
        RUNS[f"r{r}-np2-{link}-overlap-none"] = (r, 2, link, True, "none")


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def config(name, rank, steps, overlap, wire):
    out = os.path.join(WORK, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    text = f"""pretrained_model_name_or_path = "{MODEL}"
train_data_dir = "builtin:shapes"
caption_extension = ".txt"
resolution = 512
enable_bucket = false
cache_latents = true
network_module = "networks.lora"
network_dim = {rank}
network_alpha = {rank}
network_train_unet_only = true
optimizer_type = "AdamW"
learning_rate = 1e-4
lr_scheduler = "constant"
max_grad_norm = 1.0
train_batch_size = 1
max_train_steps = {steps}
mixed_precision = "bf16"
gradient_checkpointing = true
seed = 42
output_dir = "{out}"
output_name = "bench"

[lora_dist]
cache_dir = "{os.path.join(WORK, 'cache')}"
threads_per_rank = 1
wire_format = "{wire}"
parameter_check_every = 0
overlap_reduction = {'true' if overlap is not False else 'false'}
"""
    path = os.path.join(WORK, f"{name}.toml")
    with open(path, "w") as f:
        f.write(text)
    return path, os.path.join(out, "bench-metrics.jsonl")


def run(name, steps):
    rank, ranks, link, overlap, wire = RUNS[name]
    cfg, metrics_path = config(name, rank, steps, overlap, wire)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = train_command(LORA_DIST, cfg, ranks, link)
    log_path = os.path.join(WORK, f"{name}.log")
    load0, mem0, t0 = loadavg(), mem_available_gb(), time.time()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=3000).returncode
    res = {"run": name, "lora_rank": rank, "ranks": ranks, "link": link, "overlap": overlap, "wire": wire,
           "wall_s": round(time.time() - t0, 1), "load_before": load0, "load_after": loadavg(),
           "mem_available_gb_before": round(mem0, 1), "cpu": cpu_model(), "time": time.strftime("%Y-%m-%d %H:%M")}
    steps_seen = []
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            steps_seen = [json.loads(line) for line in f if line.strip() and '"run_start"' not in line]
    if rc != 0 or len(steps_seen) != steps:
        with open(log_path) as f:
            tail = (f.read().strip().splitlines() or ["(no output)"])[-1]
        res["error"] = f"exit {rc}, {len(steps_seen)} metric lines: {tail}"
    else:
        timed = steps_seen[1:]
        res.update({
            "step_s": [s["step_seconds"] for s in timed],
            "comm_s": [s["communication_seconds"] for s in timed],
            "exposed_s": [s.get("exposed_communication_seconds", s["communication_seconds"]) for s in timed],
            "images_per_s": [s["images_per_second"] for s in timed],
            "ratio": [s["compression_ratio"] for s in steps_seen if s.get("compression_ratio") is not None],
            "loss": [s["loss"] for s in steps_seen]})
    return res


def med(v):
    return statistics.median(v) if v else float("nan")


def write_section(results):
    ok = {r["run"]: r for r in results if "error" not in r}
    L = [BEGIN, "## SDXL data-parallel scaling (issue 14)", ""]
    cpus = sorted({r["cpu"] for r in results})
    L.append(f"`bench/scaling/run.sh` on {', '.join(cpus)} (2 cores, 24 GB). `lora-dist train` on the full random SDXL "
             "checkpoint (bench/out/sdxl_bf16.safetensors, written by `lora-dist make-model --preset sdxl --dtype bf16`), "
             "builtin:shapes at 512² (no buckets), batch 1 per rank, `mixed_precision = \"bf16\"`, gradient "
             "checkpointing, UNet LoRA rank 16 (42.6 M parameters, 170 MB fp32) and rank 64 (170 M, 681 MB), AdamW, "
             "lossless fp32 wire, **one thread per rank**. np 2 runs both ranks on this machine's 2 cores: over "
             "loopback (Open MPI shared memory) or two network namespaces joined by tbf-shaped veth links "
             "(cluster/netns/harness.sh, TCP). `overlap` = buckets reduced during backward on a communication thread "
             "(`overlap_reduction = true`); `after` = `false` (the default, `\"auto\"`, times both in each run and "
             "keeps the faster). Measured before lora-dist kept freed memory in the heap (`Memory.keepFreedBlocks`, which "
             "halved the all-reduce's own time: \"On real LoRA gradients\" above); the communication columns would be "
             "lower now. Medians over the steps after the first "
             "(first step: lazy allocation, cache warm-up); every step in brackets.")
    L.append("")
    L.append("| run | ranks | link | wire | reduction | step s (each) | images/s | comm s | exposed s | hidden | wire ratio | "
             "per-rank efficiency | load (1 min) |")
    L.append("|---|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---|")
    for name in RUNS:
        r = next((x for x in results if x["run"] == name), None)
        if r is None:
            continue
        rank, ranks, link, overlap, wire = RUNS[name]
        red = "—" if ranks == 1 else ("overlap" if overlap else "after")
        wire = wire if ranks > 1 else "—"
        if "error" in r:
            L.append(f"| {name} | {ranks} | {link} | {wire} | {red} | failed: {r['error']} | | | | | | | |")
            continue
        one = ok.get(f"r{rank}-np1")
        ips = med(r["images_per_s"])
        eff = f"{ips / (ranks * med(one['images_per_s'])):.2f}" if one and ranks > 1 else "—"
        comm, exp_ = med(r["comm_s"]), med(r["exposed_s"])
        hidden = f"{100 * max(0.0, 1 - exp_ / comm):.0f} %" if ranks > 1 and comm > 0 else "—"
        ratio = f"{med(r['ratio'][1:]):.2f} (step 1: {r['ratio'][0]:.2f})" if len(r["ratio"]) > 1 else "—"
        L.append(f"| {name} | {ranks} | {link} | {wire} | {red} | {med(r['step_s']):.2f} ({', '.join(f'{v:.1f}' for v in r['step_s'])}) | "
                 f"{ips:.4f} | {comm:.2f} | {exp_:.2f} | {hidden} | {ratio} | {eff} | {r['load_before']}→{r['load_after']} |")
    L.append("")
    L.append("comm s = `communication_seconds` (time inside the all-reduce: with overlap, the communication thread's "
             "busy time, which includes waiting for the other rank's buckets); exposed s = "
             "`exposed_communication_seconds` (what the step waited for after backward); hidden = 1 − exposed / comm. "
             "Per-rank efficiency = images/s(np 2) / (2 × images/s(np 1)), each rank on one thread (target ≥ 0.90 at "
             "1 Gbit/s). Wire ratio: raw fp32 bytes / bytes sent (lossless fp32 wire, real gradients), median of "
             "steps 2–4, step 1 apart (LoRA-B is zero at step 1, so half of that gradient is exact zeros). Raw: bench/out/scaling_raw.jsonl; logs: bench/out/scaling/*.log (not committed).")
    L.append("")
    eff = {n: med(ok[f"r{RUNS[n][0]}-np1"]["images_per_s"]) and med(ok[n]["images_per_s"]) / (2 * med(ok[f"r{RUNS[n][0]}-np1"]["images_per_s"]))
           for n in ok if RUNS[n][1] == 2 and f"r{RUNS[n][0]}-np1" in ok}
    for rank in (16, 64):
        cands = {n: e for n, e in eff.items() if RUNS[n][0] == rank and RUNS[n][2] == "1gbit"}
        if cands:
            best = max(cands, key=cands.get)
            L.append(f"- **Target (per-rank efficiency ≥ 0.90 at 1 Gbit/s), rank {rank}: "
                     f"{'met' if cands[best] >= 0.90 else 'missed'}** — best {cands[best]:.2f} ({best}); "
                     + ", ".join(f"{n} {e:.2f}" for n, e in sorted(cands.items())) + ".")
    L.append("- **Overlap vs after, on this machine.** Overlapping wins where the wire time is long (1 Gbit/s: rank 16 "
             "and 64) and loses 1–3 % where the all-reduce is mostly CPU (loopback; the netns \"10 Gbit/s\" link, "
             "which is TCP over veth + tbf on the same 2 cores and moves ~450 MB/s): its thread has no core here, so "
             "it preempts the 1-thread compute of both ranks (cost model: ~5.6 s lost per GB reduced). Hence "
             "`overlap_reduction = \"auto\"`: each run times both ways (steps 2–3 after, 4–5 during) and keeps the "
             "faster. On real nodes, one core of many given to the thread, the loss term should vanish (not measurable "
             "here). One run with the default (rank 16, 1 Gbit/s, 7 steps, same config; log "
             "bench/out/scaling/auto-1gbit.log) printed `overlap_reduction auto: 28.38 s/step with the all-reduce after "
             "backward, 28.05 s during it; overlapping from here on` — the table rows' choice.")
    L.append("- **Rank 64 at 1 Gbit/s, fp32 wire**: 0.83 — the 681 MB all-reduce (5.6 s after backward) is hidden to "
             "~0.8 s, but the thread's codec + TCP work costs the compute ~5 s; the plain MPI wire "
             "(`wire_format = \"none\"`, no codec) overlapped reaches 0.90. The lossless codec saves only 21–24 % "
             "of the bytes on real gradients (ratio 1.27 at rank 16, 1.32 at rank 64 from step 2 on; 2.3 at step 1, "
             "when LoRA-B is zero). Ratios at steps 100 and 1000 of a run were not measured in this session.")
    L.append("- **What two 1-thread ranks on one 2-core machine can and cannot tell.** They do measure the "
             "all-reduce protocol, the overlap's hiding of wire time, shaped-link throughput and the CPU cost of "
             "communication on a rank with no spare core. They cannot show real-node behaviour: both ranks share one "
             "memory bus and L3 (np 2's per-rank compute is 2–9 % slower than np 1's even without communication), "
             "the \"links\" cost these same cores (veth, tbf, TCP on both ends), there is no switch latency "
             "(no sch_netem here) and no spare core for the communication thread. The cost model carries these "
             "separately (γ, L, K) so its cluster table can set them to a real node's values.")
    L.append(END)
    replace_section(RESULTS, BEGIN, END, L)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--from-raw", action="store_true")
    a = ap.parse_args()
    names = [n for n in a.runs.split(",") if n]
    for n in names:
        if n not in RUNS:
            raise SystemExit(f"--runs: unknown run {n!r}; the runs are {', '.join(RUNS)}")
    results = []
    if os.path.exists(RAW):
        with open(RAW) as f:
            results = [json.loads(line) for line in f if line.strip()]
    if not a.from_raw:
        if not os.path.exists(MODEL):
            raise SystemExit(f"{MODEL} is missing: bench/scaling/run.sh writes it")
        os.makedirs(WORK, exist_ok=True)
        for n in names:
            print(f"== {n} (load {loadavg()})", flush=True)
            r = run(n, a.steps)
            print("   " + json.dumps({k: r[k] for k in r if k in ("step_s", "comm_s", "exposed_s", "error", "wall_s")}), flush=True)
            results = [x for x in results if x["run"] != n] + [r]
            with open(RAW, "w") as f:
                for x in results:
                    f.write(json.dumps(x) + "\n")
    if "SCALING_RAW" not in os.environ:
        write_section(results)


if __name__ == "__main__":
    main()
