#!/usr/bin/env python3
"""The bf16 kernel family against fp32 and PyTorch's bf16, in one run; writes the "bf16" section of bench/RESULTS.md
(between <!-- bf16-bench:begin --> and <!-- bf16-bench:end -->, replaced in place). Run by bench/bf16/run.sh.

    python3 bench/bf16/report.py [--phases peak,kernels,step] [--rounds 3] [--cases sdxl512,...] [--threads 2]

peak     bench/bf16/peak.c: the fp32 FMA and bf16 dot-product (vdpbf16ps) peaks of this machine, 2 threads.
kernels  lora-dist-bench and bench/torch_bench.py in one-shot --rows mode, the sides alternating round by round:
         GEMM y = x·Wᵀ (lora-dist `Linear.forward` fp32 on OpenBLAS, the same on the bf16 family with W in bf16, raw
         OpenBLAS sgemm, PyTorch F.linear fp32 and under autocast with W in bf16) and 3×3 convolutions (forward and
         input gradient, frozen kernel; the same sides). Medians of all samples; best samples beside them.
step     one SDXL LoRA training step (bench/TrainBench; bench/train/torch_train.py), each case and side a fresh
         process, one at a time, sides alternating: lora-dist fp32 / bf16, PyTorch bf16 autocast (weights fp32) and
         kohya's bf16 (frozen UNet cast to bf16, autocast). Peak RSS = VmHWM; a watchdog stops a process above 21 GB.
vae      SDXL VAE encode of one 1024² image (bench/DataBench with the sdxl VAE config, random fp32 weights; bench/data/
         torch_vae.py, diffusers AutoencoderKL): lora-dist fp32 / bf16, PyTorch fp32 / autocast bf16 / VAE cast to bf16
         (kohya's latent caching under mixed_precision bf16). Medians of --reps encodes, each side a fresh process.
Raw JSON lines: bench/out/bf16_raw.jsonl.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "bench", "out")
RESULTS = os.path.join(ROOT, "bench", "RESULTS.md")
ENGINE = os.path.join(ROOT, ".build", "release", "lora-dist-bench")
TRAIN = os.path.join(ROOT, ".build", "release", "TrainBench")
TORCH_BENCH = os.path.join(ROOT, "bench", "torch_bench.py")
TORCH_TRAIN = os.path.join(ROOT, "bench", "train", "torch_train.py")
DATA = os.path.join(ROOT, ".build", "release", "DataBench")
TORCH_VAE = os.path.join(ROOT, "bench", "data", "torch_vae.py")
VAE_SIDES = [("lora-dist", "fp32"), ("lora-dist", "bf16"), ("torch", "fp32"), ("torch", "bf16-autocast"),
             ("torch", "bf16")]
VAE_LABEL = {("lora-dist", "fp32"): "lora-dist fp32", ("lora-dist", "bf16"): "lora-dist bf16 (oneDNN)",
             ("torch", "fp32"): "PyTorch fp32", ("torch", "bf16-autocast"): "PyTorch bf16 autocast (weights fp32)",
             ("torch", "bf16"): "PyTorch, VAE cast to bf16 (kohya's caching)"}
SDXL = os.path.join(OUT, "sdxl_unet_bf16.safetensors")
BEGIN, END = "<!-- bf16-bench:begin -->", "<!-- bf16-bench:end -->"

GEMMS = [
    (2048, 2048, 2048, "2048³"),
    (4096, 640, 640, "[4096,640]·[640,640]ᵀ (attn proj)"),
    (4096, 640, 5120, "[4096,640]→5120 (GEGLU proj)"),
    (4096, 2560, 640, "[4096,2560]→640 (FF out)"),
    (1024, 1280, 1280, "[1024,1280]→1280"),
    (1024, 1280, 10240, "[1024,1280]→10240 (GEGLU proj)"),
    (77, 2048, 640, "[77,2048]→640 (text k/v)"),
]
CONVS = [
    (1, 320, 64, 64, 320, 1, 1),
    (1, 640, 32, 32, 640, 1, 1),
    (1, 1280, 16, 16, 1280, 1, 1),
    (1, 320, 64, 64, 320, 2, 1),
    (1, 640, 32, 32, 640, 2, 1),
]
# case: (latent, checkpointing, sides)
CASES = {
    "sdxl512": (64, False, ["lora-dist-fp32", "lora-dist-bf16", "torch-bf16-autocast", "torch-bf16-kohya"]),
    "sdxl1024ckpt": (128, True, ["lora-dist-bf16", "torch-bf16-autocast", "torch-bf16-kohya"]),
    "sdxl1024": (128, False, ["lora-dist-bf16"]),
}
SIDE_LABEL = {"lora-dist-fp32": "lora-dist fp32", "lora-dist-bf16": "lora-dist bf16",
              "torch-bf16-autocast": "PyTorch bf16 autocast (weights fp32)",
              "torch-bf16-kohya": "PyTorch bf16, kohya's setup (frozen UNet in bf16 + autocast)",
              "torch-fp32": "PyTorch fp32"}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def cpu_line():
    model, fam, mod = "?", "?", "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            k, _, v = line.partition(":")
            k, v = k.strip(), v.strip()
            if k == "model name" and model == "?":
                model = v
            elif k == "cpu family" and fam == "?":
                fam = v
            elif k == "model" and mod == "?":
                mod = v
    gen = {"25": "Zen 4 (AVX-512 at half rate)", "26": "Zen 5"}.get(fam, "")
    return f"{model} (family {fam}, model {mod}{', ' + gen if gen else ''}), {os.cpu_count()} cores"


def json_lines(text):
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def run_rows(side, rows, a):
    cmd = ([ENGINE] if side == "lora-dist" else [sys.executable, TORCH_BENCH])
    cmd += ["--rows", ";".join(rows), "--reps", str(a.reps), "--min-time", str(a.min_time), "--threads", str(a.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:2])} failed:\n{p.stderr[-2000:]}")
    return {o["row"]: o["samples"] for o in json_lines(p.stdout) if "row" in o}


def spec(kind, *v):
    return f"{kind}:" + ",".join(str(int(t)) for t in v)


def kernels(a, raw):
    ours, theirs = [], []
    for m, k, n, _ in GEMMS:
        ours += [spec("linear", m, k, n), "bf16." + spec("linear", m, k, n), spec("sgemm", m, n, k, 0, 1)]
        theirs += [spec("linear", m, k, n), "bf16." + spec("linear", m, k, n)]
    for c in CONVS:
        for kind in ("conv_fwd", "conv_dx"):
            ours += [spec(kind, *c), "bf16." + spec(kind, *c)]
            theirs += [spec(kind, *c), "bf16." + spec(kind, *c)]
    samples = {("lora-dist", r): [] for r in ours}
    samples.update({("torch", r): [] for r in theirs})
    for rnd in range(a.rounds):
        order = [("lora-dist", ours), ("torch", theirs)]
        if rnd % 2:
            order.reverse()
        for side, rows in order:
            log(f"== kernels round {rnd + 1}/{a.rounds}: {side} (load {loadavg():.2f})")
            for row, s in run_rows(side, rows, a).items():
                samples[(side, row)] += s
                raw.write(json.dumps({"phase": "kernels", "round": rnd, "side": side, "row": row, "samples": s}) + "\n")
    return samples


class Watchdog(threading.Thread):
    """Kills the process when its RSS passes `limit_gb`; records the peak it saw."""

    def __init__(self, proc, limit_gb):
        super().__init__(daemon=True)
        self.proc, self.limit, self.killed_at = proc, limit_gb * 1024 * 1024, None

    def run(self):
        while self.proc.poll() is None:
            try:
                with open(f"/proc/{self.proc.pid}/status") as f:
                    rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
                if rss > self.limit:
                    self.killed_at = rss / 1024 / 1024
                    self.proc.kill()
                    return
            except (OSError, StopIteration):
                pass
            time.sleep(0.2)


def step(a, case, side, raw):
    latent, ckpt, _ = CASES[case]
    if side.startswith("lora-dist"):
        cmd = [TRAIN, "--model", SDXL, "--latent", str(latent), "--steps", str(a.steps), "--warmup", "1",
               "--threads", str(a.threads)] + (["--bf16"] if side.endswith("bf16") else [])
    else:
        cmd = [sys.executable, TORCH_TRAIN, "--preset", "sdxl", "--latent", str(latent), "--steps", str(a.steps),
               "--warmup", "1", "--threads", str(a.threads), "--expect-modules", "722",
               # FLOPs counted on one side per case (an extra untimed step): autocast's at 512², kohya's where
               # autocast's fp32 weights plus their bf16 copies do not fit
               *(["--count-flops"] if side == ("torch-bf16-autocast" if case == "sdxl512" else "torch-bf16-kohya") else []),
               "--precision", {"torch-bf16-autocast": "bf16-autocast", "torch-bf16-kohya": "bf16-kohya",
                               "torch-fp32": "fp32"}[side]]
    if ckpt:
        cmd.append("--checkpointing")
    load0 = loadavg()
    t0 = time.time()
    err = open(os.path.join(OUT, f"bf16_{case}_{side}.stderr"), "w")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    w = Watchdog(p, 21)
    w.start()
    out, _ = p.communicate()
    w.join()
    res = {"phase": "step", "case": case, "side": side, "load_before": load0, "load_after": loadavg(),
           "wall_s": round(time.time() - t0, 1), "rc": p.returncode}
    if w.killed_at:
        res["stopped_gb"] = round(w.killed_at, 1)
    for o in json_lines(out):
        if "samples" in o:
            res.update({k: o[k] for k in ("samples", "optimizer_samples", "peak_mb", "losses", "modules", "lora_params",
                                          "bf16_copies_mb", "conv_weights_mb", "flops", "dnnl") if k in o})
    raw.write(json.dumps(res) + "\n")
    raw.flush()
    return res


def vae(a, raw):
    """One 1024² PNG (bench/data/make_images.py's generator), encoded by each side in a fresh process."""
    folder = os.path.join(OUT, "vae1024")
    if not os.path.isdir(folder):
        subprocess.run([sys.executable, os.path.join(ROOT, "bench", "data", "make_images.py"), os.path.join(OUT, "vae_img")],
                       check=True)
        os.makedirs(folder)
        os.rename(os.path.join(OUT, "vae_img", "img1024", "00.png"), os.path.join(folder, "00.png"))
    out = []
    for impl, prec in VAE_SIDES:
        if impl == "lora-dist":
            cmd = [DATA, folder, "1024", "sdxl", str(a.reps), str(a.threads), prec]
        else:
            cmd = [sys.executable, TORCH_VAE, folder, "1024", str(a.reps), prec]
        log(f"== vae {impl} {prec} (load {loadavg():.2f})")
        load0 = loadavg()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        w = Watchdog(p, 21)
        w.start()
        o, e = p.communicate()
        w.join()
        res = {"phase": "vae", "impl": impl, "precision": prec, "rc": p.returncode, "load_before": load0,
               "load_after": loadavg()}
        for j in json_lines(o):
            res.update({k: j[k] for k in ("encode_s",) if k in j})
        if p.returncode != 0:
            log(e[-1500:])
        raw.write(json.dumps(res) + "\n")
        raw.flush()
        log(f"   encode {res.get('encode_s')} s rc {p.returncode}")
        out.append(res)
    return out


def med(xs):
    return statistics.median(xs) if xs else None


def fmt(v, f="{:.2f}"):
    return "—" if v is None else f.format(v)


def blocks(text):
    """{name: text} of the <!-- bf16:name --> … <!-- bf16:end --> blocks in `text`."""
    out, i = {}, 0
    while True:
        b = text.find("<!-- bf16:", i)
        if b < 0:
            return out
        name = text[b + 10:text.index(" -->", b)]
        e = text.find("<!-- bf16:end -->", b)
        if name == "end" or e < 0:
            i = b + 1
            continue
        out[name] = text[text.index("-->", b) + 3:e].strip("\n")
        i = e + 1


def write(a, peaks, ks, steps, vaes, started, wall, load):
    run = (f"Run {started:%Y-%m-%d %H:%M} UTC on **{cpu_line()}**, {a.threads} threads per side, 1-min load "
           f"{load[0]:.2f} before → {load[1]:.2f} after, wall {wall / 60:.1f} min.")
    L = []
    if peaks:
        f32, b16 = peaks.get("fp32_fma"), peaks.get("bf16_dot")
        L += ["<!-- bf16:header -->", "## bf16 kernel family (oneDNN): kernels and the SDXL LoRA step", "",
              "Generated by `bench/bf16/run.sh` (bench/bf16/report.py; what each row measures: its docstring). The "
              "machines differ from day to day: compare only within one block (each says its run and CPU).", "",
              f"{run} Peaks (bench/bf16/peak.c, {a.threads} threads, best of 3): fp32 FMA **{fmt(f32, '{:.0f}')} "
              f"GFLOP/s**, bf16 `vdpbf16ps` **{fmt(b16, '{:.0f}')} GFLOP/s** (ratio "
              f"{fmt(b16 / f32 if f32 and b16 else None)}).", "<!-- bf16:end -->"]
    if ks:
        L += ["<!-- bf16:kernels -->", "### GEMM y = x·Wᵀ, GFLOP/s — higher is better", "", run, "",
              "lora-dist bf16 = `Linear.forward` on the bf16 family (x fp32, rounded per call; W stored bf16, as a bf16 "
              "checkpoint is used); PyTorch bf16 = `F.linear` under autocast with W in bf16 (kohya's frozen-weight "
              "dtype). Ratio = lora-dist bf16 time / PyTorch bf16 time (≤ 1: lora-dist faster).", "",
              "| shape | lora-dist fp32 | lora-dist bf16 | OpenBLAS sgemm | PyTorch fp32 | PyTorch bf16 | bf16 / sgemm speed-up | lora-dist bf16 / PyTorch bf16 | ratio of best samples | bf16 % of bf16 peak |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m, k, n, label in GEMMS:
            fl = 2.0 * m * n * k
            ours32, ours16 = ks[("lora-dist", spec("linear", m, k, n))], ks[("lora-dist", "bf16." + spec("linear", m, k, n))]
            sg = ks[("lora-dist", spec("sgemm", m, n, k, 0, 1))]
            t32, t16 = ks[("torch", spec("linear", m, k, n))], ks[("torch", "bf16." + spec("linear", m, k, n))]
            gf = lambda s: fl / med(s) / 1e9
            peak = (peaks or a.saved_peaks).get("bf16_dot")
            L.append(f"| {label} | {gf(ours32):.0f} | {gf(ours16):.0f} | {gf(sg):.0f} | {gf(t32):.0f} | {gf(t16):.0f} | "
                     f"{med(sg) / med(ours16):.2f} | {med(ours16) / med(t16):.2f} | {min(ours16) / min(t16):.2f} | "
                     f"{fmt(100 * gf(ours16) / peak if peak else None, '{:.0f}')} % |")
        L += ["", "### conv2d 3×3, milliseconds — lower is better", "",
              "Frozen kernel (LoRA training): the input gradient only. lora-dist bf16: oneDNN's bf16 convolution with the "
              "kernel reordered once, fp32 NCHW activations reordered in and out per call; PyTorch bf16: `F.conv2d` "
              "under autocast with the kernel in bf16.", "",
              "| shape | pass | lora-dist fp32 | lora-dist bf16 | PyTorch fp32 | PyTorch bf16 | bf16 speed-up over fp32 | lora-dist bf16 / PyTorch bf16 | ratio of best samples |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for c in CONVS:
            n, cin, h, w, cout, s, p = c
            label = f"[{n},{cin},{h},{w}]→{cout}{' s2' if s == 2 else ''} p{p}"
            for kind, name in (("conv_fwd", "forward"), ("conv_dx", "input grad")):
                o32, o16 = ks[("lora-dist", spec(kind, *c))], ks[("lora-dist", "bf16." + spec(kind, *c))]
                p32, p16 = ks[("torch", spec(kind, *c))], ks[("torch", "bf16." + spec(kind, *c))]
                L.append(f"| {label} | {name} | {1e3 * med(o32):.1f} | {1e3 * med(o16):.1f} | {1e3 * med(p32):.1f} | "
                         f"{1e3 * med(p16):.1f} | {med(o32) / med(o16):.2f} | {med(o16) / med(p16):.2f} | "
                         f"{min(o16) / min(p16):.2f} |")
        L.append("<!-- bf16:end -->")
    if steps:
        L += ["<!-- bf16:step -->", "### SDXL LoRA training step (rank 16, batch 1), s/step — lower is better", "",
              "bench/TrainBench (`--bf16`: `Kernels.use(.bf16)` before the model binds) on the random bf16 SDXL UNet of "
              "bench/train/run.sh; bench/train/torch_train.py (diffusers + peft, 722 modules on both sides). Median of "
              "the timed steps after one warm-up (samples in brackets); peak = VmHWM (weights included: the mapped "
              "5.1 GB file's pages count once touched). One table per case; each says its run.", "<!-- bf16:end -->"]
        for case in CASES:
            rows = [r for r in steps if r["case"] == case]
            if not rows:
                continue
            ref, ref_side = None, None
            for want in ("torch-bf16-autocast", "torch-bf16-kohya"):   # autocast, or kohya's where autocast ran out
                ref = next((med(r["samples"]) for r in rows if r["side"] == want and r.get("samples")), None)
                if ref:
                    ref_side = want
                    break
            L += [f"<!-- bf16:step-{case} -->", f"**{case}** — {run}", "",
                  "| side | s/step | samples | peak GB | loss (first → last) | vs " +
                  ("PyTorch bf16 autocast" if ref_side != "torch-bf16-kohya" else "PyTorch bf16 (kohya's setup)") +
                  " | % of bf16 peak | load before → after |",
                  "|---|---:|---|---:|---|---:|---:|---|"]
            flops = next((r["flops"] for r in rows if r.get("flops")), None)
            peak16 = (peaks or a.saved_peaks).get("bf16_dot")
            for r in rows:
                s = r.get("samples")
                m = med(s) if s else None
                peak = f"{float(r['peak_mb']) / 1024:.1f}" if "peak_mb" in r else (
                    f"stopped at {r['stopped_gb']}" if "stopped_gb" in r else "—")
                losses = r.get("losses") or []
                loss = f"{losses[0]:.4f} → {losses[-1]:.4f}" if losses else "—"
                status = "" if r.get("rc") == 0 else f" (exit {r.get('rc')})"
                L.append(f"| {SIDE_LABEL[r['side']]}{status} | {fmt(m)} | "
                         f"{', '.join(f'{x:.2f}' for x in s) if s else '—'} | {peak} | {loss} | "
                         f"{fmt(m / ref if m and ref else None)} | "
                         f"{fmt(100 * flops / m / 1e9 / peak16 if flops and m and peak16 else None, '{:.0f}')} % | "
                         f"{r['load_before']:.2f} → {r['load_after']:.2f} |")
            ours = next((r for r in rows if r["side"] == "lora-dist-bf16"), None)
            verdicts = []
            m = med(ours["samples"]) if ours and ours.get("samples") else None
            if case in ("sdxl512", "sdxl1024ckpt") and ref:
                verdicts.append(f"time ≤ 0.75× PyTorch bf16: {'met' if m and m / ref <= 0.75 else 'missed'} "
                                f"({fmt(m / ref if m else None)}×)")
            if case == "sdxl512" and ours:
                gb = float(ours["peak_mb"]) / 1024 if "peak_mb" in ours else None
                verdicts.append(f"peak RSS ≤ 10 GB: {'met' if gb and gb <= 10 else 'missed'} ({fmt(gb, '{:.1f}')} GB)")
            if case == "sdxl1024" and ours:
                verdicts.append("fits in 24 GB without checkpointing: " + ("yes" if ours.get("samples") else "no"))
            if verdicts:
                L.append("")
                L.append("Targets of issue 12 — " + "; ".join(verdicts) + ". Why, and the next steps: the notes and the "
                         "profile at the end of this section.")
            if flops:
                L.append("")
                L.append(f"{flops / 1e12:.2f} TFLOP per step (PyTorch's FlopCounterMode on its bf16 step: "
                         f"matrix products, convolutions and attention, forward (again where checkpointing recomputes "
                         f"it) + the backward that runs); "
                         f"% of bf16 peak = that / s/step / the vdpbf16ps peak of the header.")
            for r in rows:
                if r["side"] == "lora-dist-bf16" and "conv_weights_mb" in r:
                    L.append("")
                    L.append(f"lora-dist bf16 memory: frozen conv kernels reordered for oneDNN "
                             f"{r['conv_weights_mb']} MB; bf16 copies of fp32/fp16 weights {r.get('bf16_copies_mb', '0')} MB "
                             f"(0 for a bf16 file: its matrices are used as mapped).")
                if r["side"] == "lora-dist-bf16" and r.get("dnnl") and r.get("samples"):
                    last = r["samples"][-1]
                    parts = [f"{c['kind']} {c['seconds']:.2f} s" + (f" ({c['flops'] / c['seconds'] / 1e9:.0f} GFLOP/s)"
                                                                    if c["flops"] and c["seconds"] else "")
                             for c in r["dnnl"] if c["calls"]]
                    inside = sum(c["seconds"] for c in r["dnnl"])
                    L.append("")
                    L.append(f"lora-dist bf16, where its last timed step ({last:.2f} s) went, by the shim's clocks: "
                             + "; ".join(parts) + f"; everything outside oneDNN {last - inside:.2f} s.")
            L.append("<!-- bf16:end -->")
    if vaes:
        ref = next((r.get("encode_s") for r in vaes if (r["impl"], r["precision"]) == ("torch", "bf16-autocast")), None)
        L += ["<!-- bf16:vae -->", "### SDXL VAE encode, one 1024² image, seconds — lower is better", "", run, "",
              "bench/DataBench (`VAE.encode`, sdxl VAE config, random weights; bf16: the family chosen before the "
              "weights bind) and bench/data/torch_vae.py (diffusers AutoencoderKL, SDXL VAE config, random init); median "
              f"of {a.reps} encodes after a 64² warm-up, each side a fresh process.", "",
              "| side | encode s | vs PyTorch bf16 autocast | load before → after |", "|---|---:|---:|---|"]
        for r in vaes:
            e = r.get("encode_s")
            status = "" if r.get("rc") == 0 else f" (exit {r.get('rc')})"
            L.append(f"| {VAE_LABEL[(r['impl'], r['precision'])]}{status} | {fmt(e)} | "
                     f"{fmt(e / ref if e and ref else None)} | {r['load_before']:.2f} → {r['load_after']:.2f} |")
        L.append("<!-- bf16:end -->")
    if a.profile and os.path.exists(a.profile):
        L += ["<!-- bf16:profile -->", "### Where the bf16 step's time goes (bench/unet_profile.py --bf16)", "",
              open(a.profile).read().strip(), "<!-- bf16:end -->"]
    if a.notes and os.path.exists(a.notes):
        L += ["<!-- bf16:notes -->", open(a.notes).read().strip(), "<!-- bf16:end -->"]
    new_blocks = blocks("\n".join(L))
    old = open(RESULTS).read() if os.path.exists(RESULTS) else ""
    section = old[old.index(BEGIN) + len(BEGIN):old.index(END)] if BEGIN in old and END in old else ""
    merged = blocks(section)
    merged.update(new_blocks)   # the blocks of the phases run now replace their old text; the others stay
    order = ["header", "kernels", "step"] + [f"step-{c}" for c in CASES] + ["vae", "profile", "notes"]
    body = "\n\n".join(f"<!-- bf16:{k} -->\n{merged[k]}\n<!-- bf16:end -->" for k in order if k in merged)
    text = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    with open(RESULTS, "w") as f:
        f.write(new)
    log(f"wrote the bf16 section of {RESULTS}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--phases", default="peak,kernels,step,vae")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", default=os.path.join(OUT, "unet_profile_bf16.md"),
                    help="the table of `bench/unet_profile.py --bf16 --out ...`, included when present")
    ap.add_argument("--notes", default=os.path.join(HERE, "notes.md"), help="appended under the tables")
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    phases = a.phases.split(",")
    started, t0, load0 = datetime.datetime.utcnow(), time.time(), loadavg()
    raw = open(os.path.join(OUT, "bf16_raw.jsonl"), "a")
    peaks = {}
    a.saved_peaks = {}
    for line in open(os.path.join(OUT, "bf16_raw.jsonl")):   # the newest measured peaks, for the % of peak column
        o = json.loads(line)
        if o.get("phase") == "peak":
            a.saved_peaks = o
    if "peak" in phases:
        p = subprocess.run([os.path.join(OUT, "peak"), str(a.threads)], capture_output=True, text=True, check=True)
        peaks = {o["peak"]: o["gflops"] for o in json_lines(p.stdout)}
        raw.write(json.dumps({"phase": "peak", **peaks}) + "\n")
        log(f"peaks: {peaks}")
    ks = kernels(a, raw) if "kernels" in phases else None
    steps = []
    if "step" in phases:
        for i, case in enumerate(c for c in a.cases.split(",") if c):
            sides = CASES[case][2] if i % 2 == 0 else list(reversed(CASES[case][2]))
            for side in sides:
                log(f"== {case} {side} (load {loadavg():.2f})")
                r = step(a, case, side, raw)
                log(f"   {r.get('samples')} peak {r.get('peak_mb')} MB rc {r['rc']}")
                steps.append(r)
    vaes = vae(a, raw) if "vae" in phases else None
    write(a, peaks, ks, steps, vaes, started, time.time() - t0, (load0, loadavg()))


if __name__ == "__main__":
    main()
