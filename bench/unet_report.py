#!/usr/bin/env python3
"""The SDXL UNet benchmark: lora-dist-unet-bench and bench/unet_bench.py (diffusers) case by case, each
case in a fresh process, never two at once; writes the "SDXL UNet" section of bench/RESULTS.md.

    python3 bench/unet_report.py [--cases fwd512,bwd512,…] [--model bench/out/sdxl_unet_bf16.safetensors]
    python3 bench/unet_report.py --from-raw      # rewrite the section from bench/out/unet_raw.jsonl

Cases (latent = image / 8): forward and forward + input-gradient backward at 512² (latent 64) and
1024² (latent 128), with and without gradient checkpointing. Sides: lora-dist (the bf16 file's weights,
widened per op), PyTorch fp32, and PyTorch under bf16 autocast as an extra reference. The order of the
sides alternates from case to case. A watchdog stops a process whose RSS passes --mem-limit-gb (the
machine has 24 GB and other work on it): that case is reported as "stopped at N GB" instead of a time.
Raw JSON lines: bench/out/unet_raw.jsonl (git-ignored).
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SWIFT_BIN = os.path.join(ROOT, ".build", "release", "lora-dist-unet-bench")
LORA_DIST = os.path.join(ROOT, ".build", "release", "lora-dist")
TORCH_BENCH = os.path.join(HERE, "unet_bench.py")
OUT_DIR = os.path.join(HERE, "out")
RAW = os.path.join(OUT_DIR, "unet_raw.jsonl")
RESULTS = os.path.join(HERE, "RESULTS.md")
BEGIN, END = "<!-- unet-bench:begin -->", "<!-- unet-bench:end -->"

# name: (latent, mode, checkpointing, sides, warm-up steps, timed steps)
CASES = {
    "fwd512": (64, "forward", False, ["lora-dist", "torch-fp32", "torch-bf16"], 1, 2),
    "bwd512": (64, "backward", False, ["lora-dist", "torch-fp32", "torch-bf16"], 1, 2),
    "bwd512ckpt": (64, "backward", True, ["lora-dist", "torch-fp32"], 1, 2),
    "fwd1024": (128, "forward", False, ["lora-dist", "torch-fp32"], 1, 1),
    "bwd1024ckpt": (128, "backward", True, ["lora-dist", "torch-fp32", "torch-bf16"], 1, 1),
    "bwd1024": (128, "backward", False, ["lora-dist", "torch-fp32"], 1, 1),
}
SIDE_LABEL = {"lora-dist": "lora-dist (bf16 weights)", "torch-fp32": "PyTorch fp32", "torch-bf16": "PyTorch bf16 autocast"}


def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def mem_available_gb():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024 / 1024
    return 0.0


def replace_section(path, begin, end, lines):
    """Writes `lines` (which start with `begin` and end with `end`) over that marked section of `path`, or appends it."""
    section = "\n".join(lines) + "\n"
    text = open(path).read() if os.path.exists(path) else ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text)


def train_command(lora_dist, cfg, ranks, link):
    """`lora-dist train cfg` on `ranks` ranks: alone, under mpirun on this machine (link "local"/"loopback", unbound
    ranks), or one rank per network namespace of cluster/netns/harness.sh joined by links shaped to `link`."""
    if ranks == 1:
        return [lora_dist, "train", cfg]
    if link in ("local", "loopback"):
        return ["mpirun", "-np", str(ranks), "--bind-to", "none", lora_dist, "train", cfg]
    harness = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cluster", "netns", "harness.sh")
    inner = f'"$HARNESS" run "$HARNESS_ID" -np {ranks} --bind-to none -- "$0" train "$1"'
    return [harness, "with", str(ranks), "--rate", link, "--", "sh", "-c", inner, lora_dist, cfg]


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def command(side, case, a):
    latent, mode, ckpt, _, warm, steps = CASES[case]
    if side == "lora-dist":
        cmd = [SWIFT_BIN, "--model", a.model]
    else:
        cmd = [sys.executable, TORCH_BENCH, "--precision", "fp32" if side == "torch-fp32" else "bf16-autocast"]
    cmd += ["--latent", str(latent), "--mode", mode, "--warmup", str(warm), "--steps", str(steps),
            "--threads", str(a.threads)]
    return cmd + (["--checkpointing"] if ckpt else [])


def run_one(side, case, a, raw):
    """Runs one case on one side in a fresh process under the RSS watchdog; returns the result dict."""
    cmd = command(side, case, a)
    limit_kb = int(a.mem_limit_gb * 1024 * 1024)
    err_path = os.path.join(OUT_DIR, f"unet_{side}_{case}.stderr")
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
        obj["case_id"], obj["side_id"] = case, side
        raw.write(json.dumps(obj) + "\n")
        if "samples" in obj:
            result = obj
    res = {"case_id": case, "side_id": side, "wall_s": round(wall, 1), "load_before": load0, "load_after": loadavg(),
           "watch_max_mb": state["max_kb"] // 1024}
    if state["killed"]:
        res["stopped_mb"] = state["max_kb"] // 1024
        res["stopped_after_s"] = round(wall, 1)
    elif p.returncode != 0 or result is None:
        with open(err_path) as f:
            tail = (f.read().strip().splitlines() or ["(no output)"])[-1]
        res["error"] = f"exit {p.returncode}: {tail}"
    else:
        res.update(result)
    raw.write(json.dumps({"result": res}) + "\n")
    raw.flush()
    return res


def machine_line(infos):
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_gb = int(line.split()[1]) / 1024 / 1024
    sw = infos.get("lora-dist", {})
    tv = infos.get("torch", {})
    return (f"**Machine:** {model}, {os.cpu_count()} cores, {mem_gb:.0f} GB RAM · 2 threads per side · "
            f"lora-dist OpenBLAS kernel {sw.get('core', '?')} · PyTorch {tv.get('torch', '?')}, "
            f"diffusers {tv.get('diffusers', '?')} · {platform.node()}")


def fmt_s(r):
    if r is None:
        return "—"
    if "stopped_mb" in r:
        return f"stopped at {r['stopped_mb'] / 1024:.1f} GB"
    if "error" in r:
        return "failed"
    return f"{statistics.median(r['samples']):.1f}"


def split_s(r):
    if r is None or "samples" not in r or not any(r.get("backward_samples", [])):
        return ""
    return f"{statistics.median(r['forward_samples']):.1f} + {statistics.median(r['backward_samples']):.1f}"


def fmt_gb(r):
    if r is None:
        return "—"
    if "stopped_mb" in r:
        return f"> {r['stopped_mb'] / 1024:.1f}"
    if "error" in r:
        return "—"
    return f"{r['peak_mb'] / 1024:.1f}"


def write_section(results, infos, meta):
    by = {(r["case_id"], r["side_id"]): r for r in results}
    L = [BEGIN, "## SDXL UNet: forward and input-gradient backward, batch 1\n"]
    L.append("Generated by `bench/unet_run.sh` (bench/unet_report.py; lora-dist side bench/UNetBench, PyTorch side "
             "bench/unet_bench.py; what is measured: bench/README.md).\n")
    L.append(machine_line(infos) + "\n")
    L.append(f"Each case on each side in a fresh process, one at a time; the order of the sides alternates. "
             f"Seconds: median of the timed steps after one warm-up step (512²: 2 steps, 1024²: 1 step); "
             f"\"fwd + bwd\" splits the same step. Peak: the process's VmHWM (weights included: lora-dist maps the "
             f"bf16 file, 5.1 GB; PyTorch holds fp32 weights, 10.3 GB). Load average before / after the whole "
             f"run: {meta['load_before']} / {meta['load_after']} (2 cores; other work was running on the machine); "
             f"run started {meta['started']}, {meta['minutes']:.0f} min.\n")
    L.append("Model: the `sdxl` preset, random weights (lora-dist: `lora-dist make-model --preset sdxl --dtype bf16 "
             "--unet-only`; PyTorch: diffusers `UNet2DConditionModel` with the SDXL base config, fp32, random). "
             "Inputs x [1,4,L,L], context [1,77,2048], y [1,2816] (diffusers: text_embeds + time_ids), timestep 500. "
             "Backward: gradient w.r.t. x and context from a random upstream gradient, weights frozen.\n")
    L.append("| case | lora-dist s | (fwd + bwd) | PyTorch fp32 s | (fwd + bwd) | PyTorch bf16 autocast s | "
             "lora-dist / PyTorch fp32 | lora-dist peak GB | PyTorch fp32 peak GB | PyTorch bf16 peak GB | target | meets target |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    notes = []
    for case, (latent, mode, ckpt, sides, _, _) in CASES.items():
        ours, f32, b16 = by.get((case, "lora-dist")), by.get((case, "torch-fp32")), by.get((case, "torch-bf16"))
        if not (ours or f32 or b16):
            continue
        px = latent * 8
        label = f"{px}² {'forward' if mode == 'forward' else 'fwd + input-grad bwd'}{' (checkpointing)' if ckpt else ''}"
        ratio = "—"
        if ours and f32 and "samples" in ours and "samples" in f32:
            ratio = f"{statistics.median(ours['samples']) / statistics.median(f32['samples']):.2f}"
        target, meets = "—", "—"
        if case == "bwd512":
            target = "time ≤ PyTorch fp32; peak ≤ 12 GB"
            if ours and "samples" in ours and f32 and "samples" in f32:
                ok_t = statistics.median(ours["samples"]) <= statistics.median(f32["samples"])
                ok_m = ours["peak_mb"] <= 12 * 1024
                meets = "yes" if ok_t and ok_m else "**no**" + ("" if ok_t else " (time)") + ("" if ok_m else " (memory)")
        elif case == "bwd1024ckpt":
            target = "fits in 24 GB"
            if ours and "samples" in ours:
                meets = "yes" if ours["peak_mb"] <= 24 * 1024 else "**no**"
            elif ours and "stopped_mb" in ours:
                meets = "**no**"
        L.append(f"| {label} | {fmt_s(ours)} | {split_s(ours)} | {fmt_s(f32)} | {split_s(f32)} | {fmt_s(b16)} | {ratio} | "
                 f"{fmt_gb(ours)} | {fmt_gb(f32)} | {fmt_gb(b16)} | {target} | {meets} |")
        for r in (ours, f32, b16):
            if r and "stopped_mb" in r:
                notes.append(f"{label}, {SIDE_LABEL[r['side_id']]}: stopped by the watchdog at "
                             f"{r['stopped_mb'] / 1024:.1f} GB RSS after {r['stopped_after_s']:.0f} s (limit "
                             f"{meta['mem_limit_gb']:.1f} GB; the machine has 24 GB).")
            if r and "error" in r:
                notes.append(f"{label}, {SIDE_LABEL[r['side_id']]}: {r['error']}")
    slow, ref = by.get(("bwd1024", "lora-dist")), by.get(("bwd1024ckpt", "lora-dist"))
    if slow and ref and "samples" in slow and "samples" in ref:
        f_slow, f_ref = statistics.median(slow["forward_samples"]), statistics.median(ref["forward_samples"])
        if f_slow > 1.5 * f_ref:
            notes.append(f"lora-dist 1024² without checkpointing: its recorded forward took {f_slow:.0f} s against "
                         f"{f_ref:.0f} s for the checkpointed one, at {slow['peak_mb'] / 1024:.1f} GB of 24: every page of the "
                         f"~15 GB of saved activations is fresh (zeroed by the kernel on first touch), and so close to the "
                         f"machine's limit the kernel may also evict and re-read pages of the memory-mapped weights "
                         f"(not measured). Train at 1024² with checkpointing.")
    L.append("")
    if notes:
        L.append("Notes:\n")
        L += [f"- {n}" for n in notes]
        L.append("")
    if meta.get("profiles"):
        L.append("### Where lora-dist's time goes (bench/unet_profile.py)\n")
        L.append("Main-thread perf samples of one timed step (a separate run, not the one above), charged to the innermost "
                 "engine op on the stack and to what the CPU was doing; \"blocked\" time (no sample) is the main thread "
                 "descheduled: waiting for a worker or preempted by other work on the machine.\n")
        for text in meta["profiles"]:
            L.append(text.strip() + "\n")
    L.append("Raw lines: bench/out/unet_raw.jsonl (not committed).")
    L.append(END)
    replace_section(RESULTS, BEGIN, END, L)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--model", default=os.path.join(OUT_DIR, "sdxl_unet_bf16.safetensors"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-limit-gb", type=float, default=None,
                    help="stop a process past this RSS (default: MemAvailable at start − 1.5 GB, at most 21)")
    ap.add_argument("--profile", default=",".join(os.path.join(OUT_DIR, f) for f in ("unet_profile.md", "unet_profile_ckpt.md")),
                    help="bench/unet_profile.py tables to include in the section, those present")
    ap.add_argument("--from-raw", action="store_true")
    a = ap.parse_args()
    os.makedirs(OUT_DIR, exist_ok=True)
    if a.mem_limit_gb is None:
        a.mem_limit_gb = min(21.0, mem_available_gb() - 1.5)
    cases = [c for c in a.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            raise SystemExit(f"unknown case {c} (known: {', '.join(CASES)})")

    results, infos = [], {}
    meta = {"mem_limit_gb": a.mem_limit_gb}
    if a.from_raw:
        with open(RAW) as f:
            for line in f:
                obj = json.loads(line)
                if "result" in obj:
                    results.append(obj["result"])
                elif "info" in obj:
                    infos[obj["side"]] = obj["info"]
                elif "meta" in obj:
                    meta.update(obj["meta"])
    else:
        if not os.path.exists(SWIFT_BIN):
            raise SystemExit(f"{SWIFT_BIN} missing: swift build -c release --product lora-dist-unet-bench")
        if not os.path.exists(a.model):
            print(f"== writing {a.model} (random sdxl UNet, bf16)", flush=True)
            subprocess.run([LORA_DIST, "make-model", "--preset", "sdxl", "--dtype", "bf16", "--unet-only",
                            "--threads", str(a.threads), "--out", a.model], check=True)
        started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        meta.update({"started": started, "load_before": loadavg()})
        t_start = time.time()
        print(f"memory watchdog at {a.mem_limit_gb:.1f} GB", flush=True)
        with open(RAW, "w") as raw:
            for i, case in enumerate(cases):
                sides = CASES[case][3]
                order = sides if i % 2 == 0 else list(reversed(sides))
                for side in order:
                    r = run_one(side, case, a, raw)
                    results.append(r)
                    print(f"  {case:<12} {side:<11} {fmt_s(r):>22} s   peak {fmt_gb(r):>6} GB   "
                          f"(process {r['wall_s']:.0f} s, load {r['load_before']} → {r['load_after']})", flush=True)
            meta.update({"load_after": loadavg(), "minutes": (time.time() - t_start) / 60})
            raw.write(json.dumps({"meta": meta}) + "\n")
        with open(RAW) as f:
            for line in f:
                obj = json.loads(line)
                if "info" in obj:
                    infos[obj["side"]] = obj["info"]
    meta["profiles"] = [open(p).read() for p in a.profile.split(",") if p and os.path.exists(p)]
    write_section(results, infos, meta)
    print(f"wrote the SDXL UNet section of {RESULTS}", flush=True)


if __name__ == "__main__":
    main()
