#!/usr/bin/env python3
"""Generation benchmark: `lora-dist generate` against diffusers' StableDiffusionXLPipeline on CPU, in one run, and the wall
time of a prompt list on 1 vs 2 ranks. Writes the "generate" section of bench/RESULTS.md.

    bench/generate/run.sh [--steps 2] [--size 1024] [--list-size 512] [--list-steps 4] [--skip-list]

Case 1 (one image): SDXL (random weights, bench/out/sdxl_bf16.safetensors), `--size`² , CFG 7 (the UNet at batch 2 per
step: negative + prompt), Euler a, one prompt; each side in a fresh process, one after another: lora-dist fp32, lora-dist
bf16 (oneDNN), diffusers fp32, diffusers bf16 autocast, 2 threads each. Every side times text encoding, each step and the
VAE decode separately (lora-dist: LORA_DIST_BENCH_TIMINGS=1; diffusers: bench/generate/diffusers_generate.py). The
whole 28-step image is text + 28 × the median step + decode: all steps of a sampler cost the same (same shapes), so
`--steps` measured steps give s/it, and the 28-step figure follows from it without 28 steps per side.
Case 2 (a prompt list): 8 prompts (`--list-size`², `--list-steps` steps, CFG 7, bf16) with `lora-dist generate --prompts`:
one rank with 2 threads vs `mpirun -np 2` (one thread per rank; image j on rank j mod 2); wall time of the whole command
(model load included).
"""
import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "bench"))
sys.path.insert(0, os.path.join(REPO, "bench/bf16"))
from unet_report import replace_section  # noqa: E402
from report import cpu_line  # noqa: E402  (bench/bf16/report.py)

MODEL = os.path.join(REPO, "bench/out/sdxl_bf16.safetensors")
LORA_DIST = os.path.join(REPO, ".build/release/lora-dist")
PROMPT = "1girl, solo, masterpiece, best quality, looking at viewer, upper body, city at night"
NEGATIVE = "lowres, bad anatomy, bad hands, worst quality, low quality"
BEGIN, END = "<!-- generate: bench/generate/report.py -->", "<!-- generate:end -->"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def run(cmd, env=None):
    """(stdout+stderr, wall seconds, peak RSS MB of the process tree's largest child) of a command."""
    start = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out = p.communicate()[0]
    wall = time.perf_counter() - start
    import resource
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return out, wall, peak


def lora_dist_image(a, precision):
    env = dict(os.environ, LORA_DIST_BENCH_TIMINGS="1")
    out_dir = tempfile.mkdtemp()
    out, wall, _ = run(["/usr/bin/env", "time", "-f", "peak_kb %M", LORA_DIST, "generate", "--model", MODEL, "--prompt", PROMPT,
                        "--negative-prompt", NEGATIVE, "--width", str(a.size), "--height", str(a.size), "--steps", str(a.steps),
                        "--cfg", "7", "--seed", "1", "--sampler", "euler_a", "--precision", precision, "--threads", "2",
                        "--out", out_dir], env)
    t = json.loads(re.search(r"^timings: (\{.*\})$", out, re.M).group(1))
    peak = int(re.search(r"peak_kb (\d+)", out).group(1)) / 1024
    return {"side": f"lora-dist {precision}", "steps": t["steps"], "text": t["text"], "decode": t["decode"], "total": t["total"],
            "wall": wall, "peak_mb": peak}


def diffusers_image(a, precision):
    out, wall, _ = run(["/usr/bin/env", "time", "-f", "peak_kb %M", sys.executable, os.path.join(HERE, "diffusers_generate.py"),
                        "--model", MODEL, "--size", str(a.size), "--steps", str(a.steps), "--precision", precision, "--threads", "2",
                        "--prompt", PROMPT, "--negative", NEGATIVE])
    r = json.loads([l for l in out.splitlines() if l.startswith('{"side"')][-1])
    r["side"] = f"diffusers {precision}"
    r["wall"] = wall
    r["peak_mb"] = int(re.search(r"peak_kb (\d+)", out).group(1)) / 1024
    return r


def prompt_list(a, ranks):
    folder = tempfile.mkdtemp()
    prompts = os.path.join(folder, "prompts.txt")
    subjects = ["a red fox", "a lighthouse", "a knight", "a cat", "a city street", "a forest", "a robot", "a bowl of ramen"]
    with open(prompts, "w") as f:
        for s in subjects:
            f.write(f"{s}, masterpiece --n lowres --w {a.list_size} --h {a.list_size} --s {a.list_steps} --l 7\n")
    cmd = [LORA_DIST, "generate", "--model", MODEL, "--prompts", prompts, "--seed", "1", "--precision", "bf16",
           "--out", os.path.join(folder, "out")]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    if ranks == 1:
        cmd += ["--threads", "2"]
    else:
        cmd = ["mpirun", "-np", str(ranks), "--oversubscribe", "--bind-to", "none"] + cmd + ["--threads", "1"]
    out, wall, _ = run(cmd, env)
    images = len([f for f in os.listdir(os.path.join(folder, "out")) if f.endswith(".png")])
    return {"ranks": ranks, "wall": wall, "images": images}


def per_step(r):
    """s/it: the median of the steps after the first (the first also pays first-touch costs), or of all when only one."""
    return statistics.median(r["steps"][1:] if len(r["steps"]) > 1 else r["steps"])


def image_estimate(r, steps=28):
    """text + the first step as measured + the other 27 at s/it + decode."""
    return r["text"] + r["steps"][0] + (steps - 1) * per_step(r) + r["decode"]


def write(a, images, lists, started, wall, load):
    lines = [BEGIN, "## Generation: `lora-dist generate` vs diffusers' StableDiffusionXLPipeline (CPU)", ""]
    lines.append(f"Machine: {cpu_line()}; 2 threads per process. Load average before / after: {load[0]:.2f} / {load[1]:.2f}. "
                 f"Run started {started}, {wall / 60:.0f} min. PyTorch {images[-1].get('torch', '?')}, diffusers "
                 f"{images[-1].get('diffusers', '?')}. Generated by bench/generate/run.sh + report.py (its docstring says "
                 "exactly what is timed).")
    lines.append("")
    lines.append(f"**One {a.size}² image, CFG 7, Euler a** (random-weight SDXL; each step runs the UNet at batch 2). "
                 "s/it: median of the measured steps after the first (all steps are the same work; the first also pays "
                 "first-touch costs); whole 28-step image = text + first step + 27 × s/it + VAE decode (estimated from the "
                 "measured parts, not run for 28 steps). Ratio: lora-dist ÷ diffusers in the same precision (< 1: lora-dist "
                 "faster). Each side's row is its newest measurement in bench/out/generate_raw.jsonl (the run it came from is "
                 "in the last column).")
    lines.append("")
    lines.append("| side | s/it (median; best) | first step s | text encode s | VAE decode s | whole 28-step image | ratio vs diffusers, same precision | peak RSS GB | measured |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    by = {r["side"]: r for r in images}
    for r in images:
        prec = r["side"].split(" ", 1)[1]
        ref = by.get("diffusers " + ("bf16-autocast" if prec == "bf16" else prec)) if r["side"].startswith("lora-dist") else None
        ratio = f"{image_estimate(r) / image_estimate(ref):.2f}" if ref else "—"
        est = image_estimate(r)
        lines.append(f"| {r['side']} | {per_step(r):.2f}; {min(r['steps']):.2f} | {r['steps'][0]:.2f} | {r['text']:.2f} | {r['decode']:.2f} | "
                     f"{est:.0f} s ({est / 60:.1f} min) | {ratio} | {r['peak_mb'] / 1024:.1f} | {r.get('started', '?')}, {len(r['steps'])} steps |")
    if lists:
        lines.append("")
        lines.append(f"**8 prompts** ({a.list_size}², {a.list_steps} steps, CFG 7, bf16), `lora-dist generate --prompts` wall time "
                     "(process start and model load included):")
        lines.append("")
        lines.append("| ranks | threads per rank | wall s | images |")
        lines.append("|---|---|---|---|")
        for l in lists:
            lines.append(f"| {l['ranks']} | {2 if l['ranks'] == 1 else 1} | {l['wall']:.1f} | {l['images']} |")
        if len(lists) == 2:
            lines.append("")
            lines.append(f"2 ranks ÷ 1 rank: {lists[1]['wall'] / lists[0]['wall']:.2f}. On this 2-core machine both rows use the same "
                         "two cores (two 1-thread ranks vs one 2-thread rank), so this shows the split costs nothing (no "
                         "communication, whole images per rank), not a speed-up: on N nodes the list takes the time of its "
                         "longest rank's share, ⌈8/N⌉ images.")
    lines.append(END)
    replace_section(os.path.join(REPO, "bench/RESULTS.md"), BEGIN, END, lines)
    log("\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--list-size", type=int, default=512)
    ap.add_argument("--list-steps", type=int, default=4)
    ap.add_argument("--skip-list", action="store_true")
    ap.add_argument("--sides", default="lora-dist-bf16,lora-dist-fp32,diffusers-bf16-autocast,diffusers-fp32")
    a = ap.parse_args()
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    t0 = time.time()
    load0 = loadavg()
    images = []
    raw_path = os.path.join(REPO, "bench/out/generate_raw.jsonl")
    raw = open(raw_path, "a")
    for side in a.sides.split(","):
        log(f"== {side} {a.size}², {a.steps} steps")
        if side.startswith("lora-dist"):
            r = lora_dist_image(a, side.split("-")[-1])
        else:
            r = diffusers_image(a, side[len("diffusers-"):])
        log(json.dumps(r))
        raw.write(json.dumps(dict(r, case="image", size=a.size, started=started)) + "\n")
        raw.flush()
    lists = []
    if not a.skip_list:
        for ranks in (1, 2):
            log(f"== 8 prompts on {ranks} rank(s)")
            l = prompt_list(a, ranks)
            log(json.dumps(l))
            raw.write(json.dumps(dict(l, case="list", started=started, list_size=a.list_size, list_steps=a.list_steps)) + "\n")
            raw.flush()
    raw.close()
    # The table: each side's newest image record at this size, the newest list pair (partial reruns merge).
    newest = {}
    for line in open(raw_path):
        r = json.loads(line)
        if r.get("case") == "image" and r.get("size") == a.size:
            newest[r["side"]] = r
        elif r.get("case") == "list":
            newest[("list", r["ranks"])] = r
    order = ["lora-dist bf16", "lora-dist fp32", "diffusers bf16-autocast", "diffusers fp32"]
    images = [newest[s] for s in order if s in newest]
    lists = [newest[k] for k in [("list", 1), ("list", 2)] if k in newest]
    if lists:
        a.list_size, a.list_steps = lists[0].get("list_size", a.list_size), lists[0].get("list_steps", a.list_steps)
    write(a, images, lists, started, time.time() - t0, (load0, loadavg()))


if __name__ == "__main__":
    main()
