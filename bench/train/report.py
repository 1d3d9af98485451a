#!/usr/bin/env python3
"""The end-to-end training benchmark: writes the "LoRA training step" section of bench/RESULTS.md
(between <!-- train-bench:begin --> and <!-- train-bench:end -->).

    python3 bench/train/report.py [--phases step,scale] [--cases tiny512,sdxl512,sdxl512ckpt]
                                  [--runs np1t2,np1t1,np2,np2bf16,net1g,net1gbf16] [--model FILE] [--tiny FILE]
    python3 bench/train/report.py --phases step --cases sdxl512 --sides lora-dist,torch-fp32   # rerun some rows
    python3 bench/train/report.py --from-raw      # rewrite the section from bench/out/train_raw.jsonl

Phase "step": one LoRA training step (forward, MSE loss, backward to the LoRA weights, clip, AdamW), lora-dist
(bench/TrainBench) against PyTorch (bench/train/torch_train.py: diffusers + peft, fp32 and bf16 autocast), each
case and side in a fresh process, one at a time, the order of the sides alternating from case to case, under an
RSS watchdog (as bench/unet_report.py, whose helpers this reuses). Time = median of the timed steps after one
warm-up step; peak = the process's VmHWM.

Phase "scale": `lora-dist train` on the tiny preset (builtin:tiny, builtin:shapes) at np = 1 and 2 (Open MPI on
this machine, and across cluster/netns/harness.sh namespaces on 1 Gbit/s links), from the metrics JSONL each run
writes: median images/s, step seconds and communication seconds over the steps after the first few.

Raw JSON lines: bench/out/train_raw.jsonl (git-ignored); each run's stderr: bench/out/train_<case>_<side>.stderr.
"""
import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
from unet_report import loadavg, machine_line, mem_available_gb, replace_section, rss_kb, train_command  # noqa: E402  (shared bench helpers)

TRAIN_BENCH = os.path.join(ROOT, ".build", "release", "TrainBench")
UNET_BENCH = os.path.join(ROOT, ".build", "release", "lora-dist-unet-bench")
LORA_DIST = os.path.join(ROOT, ".build", "release", "lora-dist")
TORCH_TRAIN = os.path.join(HERE, "torch_train.py")
OUT_DIR = os.path.join(BENCH, "out")
RAW = os.path.join(OUT_DIR, "train_raw.jsonl")
WORK = os.path.join(OUT_DIR, "train_work")
RESULTS = os.path.join(BENCH, "RESULTS.md")
BEGIN, END = "<!-- train-bench:begin -->", "<!-- train-bench:end -->"

# name: (preset, latent, checkpointing, sides, warm-up steps, timed steps)
CASES = {
    "tiny512": ("tiny", 64, False, ["lora-dist", "torch-fp32", "torch-bf16"], 1, 5),
    "sdxl512": ("sdxl", 64, False, ["lora-dist", "torch-fp32", "torch-bf16"], 1, 3),
    "sdxl512ckpt": ("sdxl", 64, True, ["lora-dist", "torch-fp32"], 1, 2),
    # Reference, not a training step: the same UNet without LoRA, forward + backward to x and context
    # (bench/UNetBench), so the notes can say what the LoRA adds to lora-dist's step in this run.
    "sdxl512frozen": ("sdxl", 64, False, ["lora-dist-frozen"], 1, 2),
}
SIDE_LABEL = {"lora-dist": "lora-dist", "torch-fp32": "PyTorch fp32", "torch-bf16": "PyTorch bf16 autocast",
              "lora-dist-frozen": "lora-dist without LoRA (UNetBench)"}
# kohya's default UNet LoRA targets (every Linear in the transformer blocks) at rank 16, alpha 16.
RANK, ALPHA = 16, 16
TIME_TARGET, PEAK_TARGET_GB = 0.6, 12.0

# name: (ranks, threads per rank, wire format, link, resolution). 512²: the step-time rows' resolution; 128²:
# configs/demo.toml's, where a step is a few tens of ms and the all-reduce's latency weighs most.
RUNS = {
    "np1t2": (1, 2, "fp32", "local", 512),
    "np1t1": (1, 1, "fp32", "local", 512),
    "np2": (2, 1, "fp32", "local", 512),
    "np2bf16": (2, 1, "bf16", "local", 512),
    "net1g": (2, 1, "fp32", "1gbit", 512),
    "net1gbf16": (2, 1, "bf16", "1gbit", 512),
    "np1t2-128": (1, 2, "fp32", "local", 128),
    "np1t1-128": (1, 1, "fp32", "local", 128),
    "np2-128": (2, 1, "fp32", "local", 128),
    "net1g-128": (2, 1, "fp32", "1gbit", 128),
}
SCALE_STEPS, SCALE_SKIP = 40, 5   # steps per run; the first SCALE_SKIP (lazy allocation, caches) are not counted


def log(msg):
    print(msg, flush=True)


# MARK: phase "step"

def step_command(side, case, a):
    preset, latent, ckpt, _, warm, steps = CASES[case]
    if side == "lora-dist":
        cmd = [TRAIN_BENCH, "--model", a.model if preset == "sdxl" else a.tiny]
    elif side == "lora-dist-frozen":
        return [UNET_BENCH, "--model", a.model, "--latent", str(latent), "--mode", "backward", "--warmup", str(warm),
                "--steps", str(steps), "--threads", str(a.threads)]
    else:
        cmd = [sys.executable, TORCH_TRAIN, "--preset", preset,
               "--precision", "fp32" if side == "torch-fp32" else "bf16-autocast",
               "--expect-modules", str(722 if preset == "sdxl" else 132)]
    cmd += ["--latent", str(latent), "--rank", str(RANK), "--alpha", str(ALPHA), "--warmup", str(warm),
            "--steps", str(steps), "--threads", str(a.threads)]
    return cmd + (["--checkpointing"] if ckpt else [])


def run_step(side, case, a, raw):
    """One case on one side in a fresh process under the RSS watchdog; returns the result dict."""
    cmd = step_command(side, case, a)
    limit_kb = int(min(a.mem_limit_gb, mem_available_gb() - 1.5) * 1024 * 1024)
    err_path = os.path.join(OUT_DIR, f"train_{case}_{side}.stderr")
    load0, t0 = loadavg(), time.time()
    with open(err_path, "w") as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        state = {"max_kb": 0, "killed": False}

        def watch():
            while p.poll() is None:
                kb = rss_kb(p.pid)
                state["max_kb"] = max(state["max_kb"], kb)
                if kb > limit_kb:
                    state["killed"] = True
                    p.kill()
                    return
                time.sleep(0.05)

        w = threading.Thread(target=watch, daemon=True)
        w.start()
        out, _ = p.communicate()
        w.join()
    wall = time.time() - t0
    result = None
    for line in out.splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "samples" in obj:
            result = obj
        elif "info" in obj:
            raw.write(json.dumps({"info": obj}) + "\n")
    res = {"phase": "step", "case_id": case, "side_id": side, "wall_s": round(wall, 1), "load_before": load0,
           "load_after": loadavg(), "limit_mb": limit_kb // 1024}
    if state["killed"]:
        res["stopped_mb"] = state["max_kb"] // 1024
    elif p.returncode != 0 or result is None:
        with open(err_path) as f:
            tail = (f.read().strip().splitlines() or ["(no output)"])[-1]
        res["error"] = f"exit {p.returncode}: {tail}"
    else:
        res.update(result)
    raw.write(json.dumps({"result": res}) + "\n")
    raw.flush()
    return res


# MARK: phase "scale"

def scale_config(name, threads, wire, reso):
    """A flat kohya TOML for the tiny preset: configs/demo.toml's data with buckets around `reso` (as the demo's around
    128), kohya's default UNet targets at rank 16, batch 2 per rank, a shared latent cache (encoded before any step)."""
    out = os.path.join(WORK, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    text = f"""pretrained_model_name_or_path = "builtin:tiny"
train_data_dir = "builtin:shapes"
caption_extension = ".txt"
resolution = {reso}
enable_bucket = true
min_bucket_reso = {reso // 2}
max_bucket_reso = {reso * 2}
bucket_reso_steps = 32
cache_latents = true
network_module = "networks.lora"
network_dim = {RANK}
network_alpha = {ALPHA}
network_train_unet_only = true
optimizer_type = "AdamW"
learning_rate = 1e-4
lr_scheduler = "constant"
max_grad_norm = 1.0
train_batch_size = 2
max_train_steps = {SCALE_STEPS}
seed = 42
output_dir = "{out}"
output_name = "bench"
save_model_as = "safetensors"

[lora_dist]
cache_dir = "{os.path.join(WORK, 'cache')}"
threads_per_rank = {threads}
wire_format = "{wire}"
log_every = 10
"""
    path = os.path.join(WORK, f"{name}.toml")
    with open(path, "w") as f:
        f.write(text)
    return path, os.path.join(out, "bench-metrics.jsonl")


def run_scale(name, raw):
    ranks, threads, wire, link, reso = RUNS[name]
    cfg, metrics_path = scale_config(name, threads, wire, reso)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    # Unbound ranks locally: the same scheduling freedom as the np = 1 run's two threads.
    cmd = train_command(LORA_DIST, cfg, ranks, link)
    err_path = os.path.join(OUT_DIR, f"train_scale_{name}.log")
    load0, t0 = loadavg(), time.time()
    with open(err_path, "w") as log_file:
        rc = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, timeout=1200).returncode
    res = {"phase": "scale", "run_id": name, "ranks": ranks, "threads": threads, "wire": wire, "link": link, "resolution": reso,
           "wall_s": round(time.time() - t0, 1), "load_before": load0, "load_after": loadavg()}
    steps = []
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            steps = [json.loads(line) for line in f if line.strip()]
    if rc != 0 or len(steps) != SCALE_STEPS:
        with open(err_path) as f:
            tail = (f.read().strip().splitlines() or ["(no output)"])[-1]
        res["error"] = f"exit {rc}, {len(steps)} metric lines: {tail}"
    else:
        timed = steps[SCALE_SKIP:]
        res.update({
            "steps": len(timed),
            "images_per_step": round(timed[0]["images_per_second"] * timed[0]["step_seconds"]),
            "images_per_s": statistics.median(s["images_per_second"] for s in timed),
            "step_s": statistics.median(s["step_seconds"] for s in timed),
            "comm_s": statistics.median(s["communication_seconds"] for s in timed),
            "comm_share": statistics.median(s["communication_seconds"] / s["step_seconds"] for s in timed),
            "compression": statistics.median(s["compression_ratio"] for s in timed
                                             if s.get("compression_ratio") is not None) if ranks > 1 else None,
            "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"]})
    raw.write(json.dumps({"result": res}) + "\n")
    raw.flush()
    return res


# MARK: the section

def fmt(v, f="{:.2f}"):
    return "—" if v is None else f.format(v)


def step_cell(r):
    if r is None:
        return "—"
    if "stopped_mb" in r:
        return f"stopped at {r['stopped_mb'] / 1024:.1f} GB"
    if "error" in r:
        return "failed"
    return f"{statistics.median(r['samples']):.2f}"


def peak_gb(r):
    if r is None or "peak_mb" not in r:
        return None
    return r["peak_mb"] / 1024


def write_section(results, infos, meta):
    step = {(r["case_id"], r["side_id"]): r for r in results if r.get("phase") == "step"}
    scale = aggregate_scale([r for r in results if r.get("phase") == "scale"])
    L = [BEGIN, "## LoRA training step, end to end (bench/train/)", ""]
    L.append("Generated by `bench/train/run.sh` (bench/train/report.py; lora-dist side bench/TrainBench and "
             "`lora-dist train`, PyTorch side bench/train/torch_train.py).")
    L.append("")
    L.append(machine_line(infos) + (f" · peft {infos['torch'].get('peft', '?')}" if "torch" in infos else ""))
    L.append("")
    def what(m):
        """The parts of a run's label that mattered: cases/sides only with the step phase, runs only with scale."""
        parts = m.get("what", "everything").split("; ")
        phases = parts[0] if parts[0].startswith("phases") else ""
        keep = [p for p in parts if not ((p.startswith("cases") or p.startswith("sides")) and "step" not in phases)
                and not (p.startswith("runs") and "scale" not in phases)]
        return "; ".join(keep)
    runs = "; ".join(f"{m.get('started', '?')} ({what(m)}, {m.get('minutes', 0):.0f} min, load "
                     f"{m.get('load_before', '?')} → {m.get('load_after', '?')})" for m in meta)
    L.append(f"Runs (start, what, length, 1-min load average before → after): {runs}. The 2 cores are shared with "
             "other agents' builds and tests, so every row also gives the load around its own process; a row "
             "measured in several runs shows the newest (step rows) or the median over repeats (images/s rows).")
    L.append("")
    L.append("### One training step, batch 1, 512² (latent 64×64)")
    L.append("")
    L.append("A step = zero the LoRA gradients, UNet forward with the LoRA, MSE loss against the noise, backward to the "
             "LoRA weights (UNet frozen), clip to norm 1, AdamW (lr 1e-4). LoRA: kohya's default UNet targets, every "
             "Linear in the transformer blocks (to_q/k/v, to_out.0, proj_in/out, ff.net.0.proj, ff.net.2: 722 "
             "modules, 42.6 M parameters on SDXL; 132 on tiny), rank 16, alpha 16; PyTorch: peft `LoraConfig` with "
             "those target_modules via diffusers' `unet.add_adapter` (the module count is checked equal). Random "
             "weights: lora-dist maps the bf16 file of `lora-dist make-model --preset sdxl --dtype bf16 --unet-only` "
             "(weights widened per op; the LoRA, gradients and optimizer in fp32); PyTorch holds fp32 weights (bf16 "
             "autocast: forward and loss under `torch.autocast(\"cpu\", bfloat16)`). Inputs random: x0, ε "
             "[1,4,64,64], context [1,77,2048], y [1,2816] (diffusers: text_embeds + time_ids), timestep 500. "
             "2 threads per side (`Threads.set(2)` / `torch.set_num_threads(2)`); each case and side a fresh "
             "process, one at a time, sides alternating. s/step = median of the timed steps after 1 warm-up "
             "(tiny: 5, SDXL: 3, SDXL checkpointed: 2); peak = the process's VmHWM (weights included). \"lora-dist / fp32\" "
             "and \"/ bf16\" compare within a row (the checkpointed row: both sides checkpointed). "
             "Gradient checkpointing is off unless the row says so. Not in a step: data loading, VAE, text "
             "encoders (cached or precomputed in `lora-dist train`).")
    L.append("")
    L.append("| model | lora-dist s/step | PyTorch fp32 s/step | PyTorch bf16 s/step | lora-dist / fp32 | "
             "lora-dist / bf16 | lora-dist peak GB | PyTorch fp32 peak GB | PyTorch bf16 peak GB | load (1 min) | "
             "target | met |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|")
    notes = []
    frozen = step.get(("sdxl512frozen", "lora-dist-frozen"))
    for case in CASES:
        if case == "sdxl512frozen":
            continue
        rows = {s: step.get((case, s)) for s in CASES[case][3]}
        if not any(rows.values()):
            continue
        ours, f32, b16 = rows.get("lora-dist"), rows.get("torch-fp32"), rows.get("torch-bf16")

        def med(r):
            return statistics.median(r["samples"]) if r and "samples" in r else None
        o, t32, t16 = med(ours), med(f32), med(b16)
        r32 = o / t32 if o and t32 else None
        r16 = o / t16 if o and t16 else None
        preset, _, ckpt, *_ = CASES[case]
        label = f"{preset}{' (checkpointing)' if ckpt else ''}"
        loads = " · ".join(f"{SIDE_LABEL[s].split()[0] if s == 'lora-dist' else s.replace('torch-', '')} "
                           f"{r['load_before']}→{r['load_after']}" for s, r in rows.items() if r)
        target, met = "—", "—"
        if preset == "sdxl":
            # The reference is PyTorch fp32 without checkpointing; the checkpointed row is held to it too.
            base = t32 if not ckpt else med(step.get(("sdxl512", "torch-fp32")))
            r_target = o / base if o and base else None
            target = (f"≤ {TIME_TARGET} × PyTorch fp32{' (no checkpointing)' if ckpt else ''}; "
                      f"peak ≤ {PEAK_TARGET_GB:.0f} GB")
            pk = peak_gb(ours)
            misses = []
            if r_target is None or pk is None:
                met = "not measured"
            else:
                if r_target > TIME_TARGET:
                    misses.append(f"time {r_target:.2f}×")
                if pk > PEAK_TARGET_GB:
                    misses.append(f"peak {pk:.1f} GB")
                met = "yes" if not misses else "**no**: " + ", ".join(misses)
                if misses and not ckpt and frozen and "samples" in frozen and o:
                    fz = statistics.median(frozen["samples"])
                    notes.append(
                        f"Why {label} misses: the same lora-dist UNet without LoRA (bench/UNetBench, forward + "
                        f"backward to x and context, load {frozen['load_before']}→{frozen['load_after']}) took "
                        f"{fz:.2f} s and {frozen['peak_mb'] / 1024:.1f} GB peak here: "
                        f"{fz / t32:.2f}× PyTorch's whole fp32 LoRA step already, so the time target needs the UNet "
                        f"itself faster, not only the LoRA path. The LoRA step adds {o - fz:.1f} s and "
                        f"{(ours['peak_mb'] - frozen['peak_mb']) / 1024:.1f} GB to it (PyTorch's LoRA step costs little "
                        "over its frozen-UNet backward: compare the SDXL UNet section). Not profiled here; where it "
                        "likely goes: the LoRA downs' weight gradients need every adapted Linear's input kept until "
                        "backward (fp32, ~3.9 GB at 512² by count of those inputs; a frozen Linear's input gradient "
                        "needs only W), and each adapted Linear makes new full-size tensors every step (up output, its "
                        "scaled copy, the sum; in backward the LoRA input gradient and its sum into dx), fresh pages "
                        "the kernel zeroes. With checkpointing the peak is met and the step is no slower (next row).")
        L.append(f"| {label} | {step_cell(ours)} | {step_cell(f32)} | {step_cell(b16)} | {fmt(r32)} | {fmt(r16)} | "
                 f"{fmt(peak_gb(ours), '{:.1f}')} | {fmt(peak_gb(f32), '{:.1f}')} | {fmt(peak_gb(b16), '{:.1f}')} | "
                 f"{loads} | {target} | {met} |")
        counts = {(r["modules"], r["lora_params"]) for r in rows.values() if r and "lora_params" in r}
        if len(counts) > 1:
            notes.append(f"{label}: **the sides' LoRAs differ** (modules, parameters): {sorted(counts)}.")
        for s, r in rows.items():
            if r is None:
                continue
            if "samples" in r and "optimizer_samples" in r:
                opt = statistics.median(r["optimizer_samples"])
                notes.append(f"{label}, {SIDE_LABEL[s]}: steps {', '.join(f'{v:.2f}' for v in r['samples'])} s "
                             f"(clip + AdamW {opt:.3f} s of it), loss {r['losses'][0]:.4f} → {r['losses'][-1]:.4f}, "
                             f"{r['modules']} LoRA modules / {r['lora_params'] / 1e6:.2f} M parameters, "
                             f"RSS after building the model and LoRA {r['rss_loaded_mb'] / 1024:.1f} GB (in {r['load_s']:.1f} s).")
            elif "stopped_mb" in r:
                notes.append(f"{label}, {SIDE_LABEL[s]}: stopped by the watchdog at {r['stopped_mb'] / 1024:.1f} GB "
                             f"(limit {r['limit_mb'] / 1024:.1f} GB: the machine has 24 GB, shared).")
            else:
                notes.append(f"{label}, {SIDE_LABEL[s]}: {r['error']}")
    L.append("")
    L += [f"- {n}" for n in notes]
    L.append("")

    if scale:
        L.append("### Images/s at np = 1 and 2 (`lora-dist train`, tiny preset)")
        L.append("")
        L.append(f"`lora-dist train` on a generated config: builtin:tiny (the `tiny` preset, SDXL's topology at toy "
                 f"widths), builtin:shapes (24 drawn images with captions; buckets from resolution / 2 to 2 × "
                 f"resolution, as configs/demo.toml at 128), LoRA rank {RANK} / alpha {ALPHA} on the same targets, "
                 f"AdamW, max_grad_norm 1, batch 2 per rank (so the global batch is 2 × ranks), {SCALE_STEPS} optimizer "
                 f"steps; figures are medians over steps {SCALE_SKIP + 1}–{SCALE_STEPS} of rank 0's metrics JSONL. "
                 "step s = wall time of an optimizer step (micro-step, all-reduce, clip, optimizer, metrics); comm s = "
                 "`communication_seconds`, rank 0's time inside `GradientAllReduce.average`, which includes waiting "
                 "for the slower rank, so it is communication plus imbalance; comm share = median of comm s / step s. "
                 "np 2 local: `mpirun -np 2 --bind-to none` on this machine (shared-memory transport); 1gbit: "
                 "`cluster/netns/harness.sh with 2 --rate 1gbit` (two network namespaces joined by tbf-shaped veth "
                 "links at 1 Gbit/s, TCP only, on the same 2 cores). Latents are cached before the first step.")
        L.append("")
        L.append("Each run was repeated (column n): the figures are the medians over the repeats of each run's "
                 "medians; images/s of every repeat in brackets. The loss column is the last repeat's first and last "
                 "step (40 steps at lr 1e-4 on random weights: a check that it trains, not a convergence figure).")
        L.append("")
        L.append("| run | resolution | ranks × threads | wire | link | images/step | images/s (each repeat) | n | "
                 "step s | comm s | comm share | wire ratio | loss first → last | load (1 min) |")
        L.append("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
        for name in RUNS:
            r = scale.get(name)
            if r is None:
                continue
            reso = RUNS[name][4]
            if "error" in r:
                L.append(f"| {name} | {reso}² | {r['ranks']} × {r['threads']} | {r['wire']} | {r['link']} | "
                         f"failed: {r['error']} | | | | | | | | |")
                continue
            L.append(f"| {name} | {reso}² | {r['ranks']} × {r['threads']} | {r['wire'] if r['ranks'] > 1 else '—'} | "
                     f"{r['link'] if r['ranks'] > 1 else '—'} | {r['images_per_step']} | {r['images_per_s']:.2f} "
                     f"({', '.join(f'{v:.1f}' for v in r['images_per_s_all'])}) | {r['repeats']} | "
                     f"{r['step_s']:.3f} | {r['comm_s']:.4f} | {100 * r['comm_share']:.1f} % | "
                     f"{fmt(r['compression'])} | {r['first_loss']:.4f} → {r['last_loss']:.4f} | "
                     f"{r['load_before']}→{r['load_after']} |")
        L.append("")
        ok = {k: v for k, v in scale.items() if "error" not in v}
        eff = []
        for name, (ranks, _, wire, link, reso) in RUNS.items():
            if ranks < 2 or name not in ok:
                continue
            suffix = "" if reso == 512 else f"-{reso}"
            one2, one1 = ok.get("np1t2" + suffix), ok.get("np1t1" + suffix)
            ips = ok[name]["images_per_s"]
            parts = []
            if one2:
                parts.append(f"same cores {ips / one2['images_per_s']:.2f}")
            if one1:
                parts.append(f"per rank {ips / (2 * one1['images_per_s']):.2f}")
            if parts:
                eff.append(f"- {name} ({reso}², {wire} wire, {link}): " + ", ".join(parts) + ".")
        if eff:
            L.append("Scaling efficiency, two definitions: *same cores* = images/s(np 2, 1 thread each) / "
                     "images/s(np 1, 2 threads), what splitting this machine's 2 cores into 2 ranks gains or "
                     "loses against one rank using both (1.0 = no loss); *per rank* = images/s(np 2) / "
                     "(2 × images/s(np 1, 1 thread)), the classic weak-scaling efficiency with each rank's core "
                     "fixed (1.0 = perfect). Both ranks share one machine's 2 cores and memory bandwidth, so "
                     "neither is a multi-node figure.")
            L.append("")
            L += eff
            L.append("")
        L.append("The tiny model's LoRA is small (rank 16 on 132 modules, 167 k parameters, 0.67 MB in fp32) and its "
                 "step is short, so the all-reduce is mostly latency and waiting for the other rank on the shared "
                 "cores, relatively large against the tiny step (most at 128²); the share does not say what a "
                 "full-size step sees. For SDXL (42.6 M LoRA parameters, 170 MB in fp32) the all-reduce section above "
                 "measured the same `GradientAllReduce.average` at np 2 over 1 Gbit/s at ~2.6 s (fp32 ring) / "
                 "~2.4 s (bf16 ring) per step; SDXL at np 2 was not run end to end here (that needs the full "
                 "checkpoint with VAE and text encoders, and two 1-thread ranks at tens of seconds per step).")
        sd = step.get(("sdxl512", "lora-dist"))
        if sd and "samples" in sd:
            per_rank = 2 * statistics.median(sd["samples"])
            L.append("")
            L.append(f"Rough SDXL estimate, not a measurement: if a 1-thread rank takes twice the 2-thread step above "
                     f"(~{per_rank:.0f} s), a ~2.6 s all-reduce at 1 Gbit/s is ~{100 * 2.6 / (per_rank + 2.6):.0f} % "
                     "of an np = 2 step.")
        L.append("")
    L.append("Observations (what the misses come from, build provenance, the bf16-under-load anomaly): "
             "bench/train/README.md. Raw lines: bench/out/train_raw.jsonl (not committed).")
    L.append(END)
    replace_section(RESULTS, BEGIN, END, L)


def aggregate_scale(rows):
    """run id → one row: the median over the repeats that succeeded of each figure (a failure shows only when
    every repeat failed); `repeats` = how many. A run's loads: the first repeat's before, the last's after."""
    by_run = {}
    for r in rows:
        by_run.setdefault(r["run_id"], []).append(r)
    out = {}
    for name, rs in by_run.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            out[name] = rs[-1]
            continue
        row = dict(ok[-1])
        for k in ["images_per_s", "step_s", "comm_s", "comm_share"]:
            row[k] = statistics.median(r[k] for r in ok)
        row["images_per_s_all"] = [r["images_per_s"] for r in ok]
        row["repeats"] = len(ok)
        row["load_before"], row["load_after"] = ok[0]["load_before"], ok[-1]["load_after"]
        out[name] = row
    return out


def read_raw():
    """Every result and info line of the raw file; for a step case measured more than once the newest counts;
    scale runs are all kept (aggregate_scale takes the median over repeats)."""
    results, infos, meta = {}, {}, []
    if not os.path.exists(RAW):
        return [], infos, meta
    with open(RAW) as f:
        for line in f:
            obj = json.loads(line)
            if "info" in obj:
                infos[obj["info"]["side"]] = obj["info"]["info"]
            elif "meta" in obj:
                meta.append(obj["meta"])
            elif "result" in obj:
                r = obj["result"]
                key = (r["phase"], r.get("case_id"), r.get("side_id"), r.get("run_id"))
                if r["phase"] == "scale":
                    key += (len(results),)
                results[key] = r
    return list(results.values()), infos, meta


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--phases", default="step,scale")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--model", default=os.path.join(OUT_DIR, "sdxl_unet_bf16.safetensors"))
    ap.add_argument("--tiny", default=os.path.join(OUT_DIR, "tiny_f32.safetensors"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-limit-gb", type=float, default=21.0)
    ap.add_argument("--sides", default=",".join(SIDE_LABEL), help="rerun only these sides (the newest row per case and side counts)")
    ap.add_argument("--from-raw", action="store_true")
    a = ap.parse_args()
    for c in a.cases.split(","):
        if c and c not in CASES:
            raise SystemExit(f"--cases: unknown case {c!r}; the cases are {', '.join(CASES)}")
    for r in a.runs.split(","):
        if r and r not in RUNS:
            raise SystemExit(f"--runs: unknown run {r!r}; the runs are {', '.join(RUNS)}")
    os.makedirs(OUT_DIR, exist_ok=True)
    if not a.from_raw:
        started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        t_start = time.time()
        meta = {"started": started, "load_before": loadavg(),
                "what": f"phases {a.phases}; cases {a.cases}; sides {a.sides}; runs {a.runs}"}
        with open(RAW, "a") as raw:
            phases = a.phases.split(",")
            if "step" in phases:
                for i, case in enumerate(c for c in a.cases.split(",") if c):
                    sides = [s for s in CASES[case][3] if s in a.sides.split(",")]
                    order = sides if i % 2 == 0 else list(reversed(sides))
                    for side in order:
                        log(f"== {case} {side} (load {loadavg()})")
                        r = run_step(side, case, a, raw)
                        log(f"   {step_cell(r)} s/step, peak {fmt(peak_gb(r), '{:.1f}')} GB, {r.get('error', '')}")
            if "scale" in phases:
                os.makedirs(WORK, exist_ok=True)
                for name in (r for r in a.runs.split(",") if r):
                    log(f"== scale {name} (load {loadavg()})")
                    r = run_scale(name, raw)
                    if "error" in r:
                        log(f"   {r['error']}")
                    else:
                        log(f"   {r['images_per_s']:.2f} images/s, comm share {100 * r['comm_share']:.1f} %")
            meta.update({"load_after": loadavg(), "minutes": (time.time() - t_start) / 60})
            raw.write(json.dumps({"meta": meta}) + "\n")
    results, infos, meta = read_raw()
    write_section(results, infos, meta)
    log(f"wrote the training section of {RESULTS}")


if __name__ == "__main__":
    main()
