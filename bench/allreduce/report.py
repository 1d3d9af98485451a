#!/usr/bin/env python3
"""Writes the "Gradient all-reduce" section of bench/RESULTS.md from bench/out/allreduce.jsonl
(MPIHarness bench rows, tagged with their link by bench/allreduce/run.sh). The section sits between
<!-- allreduce-bench:begin --> and <!-- allreduce-bench:end --> at the end of the file; bench/report.py
(engine tables) keeps it when it rewrites the rest. For a (link, np, floats) measured more than once the
newest run counts."""
import json
import os
import sys

BEGIN, END = "<!-- allreduce-bench:begin -->", "<!-- allreduce-bench:end -->"
LINK_ORDER = {"loopback": 0, "10gbit": 1, "1gbit": 2}


REAL_BEGIN, REAL_END = "<!-- allreduce-real:begin -->", "<!-- allreduce-real:end -->"


def tables(runs, L):
    for key in sorted(runs, key=lambda k: (k[3], LINK_ORDER.get(k[0], 9), k[2], k[1])):
        link, np_, floats, data = key
        rows = runs[key]
        base = rows.get(("none", "MPI_Allreduce"))
        any_row = next(iter(rows.values()))
        L.append(f"### {link}, np = {np_}, {floats / 1e6:.1f} M floats ({4 * floats / 1e6:.0f} MB)"
                 + (f", {data}" if data != "synthetic" else "") + f", {any_row['reps']} reps")
        L.append("")
        L.append("| format | algorithm | median s (min) | ratio | MB sent / rank | algbw GB/s | vs MPI_Allreduce |")
        L.append("|---|---|---|---|---|---|---|")
        order = [("none", "MPI_Allreduce"), ("fp32", "ring"), ("fp32", "allGather"), ("bf16", "ring"), ("bf16", "allGather")]
        for k in order + [k for k in rows if k not in order]:
            if k not in rows:
                continue
            r = rows[k]
            vs = f"{base['median_s'] / r['median_s']:.2f}×" if base else "—"
            L.append(f"| {r['format']} | {r['algorithm']} | {r['median_s']:.3f} ({r['min_s']:.3f}) | {r['ratio']:.2f} | "
                     f"{r['bytes_sent'] / 1e6:.1f} | {r['algbw_GBps']:.3f} | {vs} |")
        L.append("")


def write(dst, begin, end, L, after=None):
    text = open(dst).read() if os.path.exists(dst) else ""
    if begin in text and end in text:
        text = text[:text.index(begin)] + "\n".join(L) + text[text.index(end) + len(end):]
    elif after and after in text:
        i = text.index(after) + len(after)
        text = text[:i] + "\n\n" + "\n".join(L) + text[i:]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(L) + "\n"
    open(dst, "w").write(text)


def main(src, dst):
    runs, real = {}, {}
    for line in open(src):
        line = line.strip()
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        data = row.get("data", "synthetic")
        key = (row["link"], row["np"], row["floats"], data)
        (runs if data == "synthetic" else real).setdefault(key, {})[(row["format"], row["algorithm"])] = row  # newest wins
    if real:
        R = [REAL_BEGIN, "### On real LoRA gradients", ""]
        R.append("The same benchmark on gradients dumped from `lora-dist train` (SDXL, the bench/scaling config: rank "
                 "16, bf16 compute, 512², batch 1 per rank, two ranks; `LORA_DIST_BENCH_DUMP_GRADIENTS`): each rank "
                 "reduces its own rank's local gradient sums of that optimizer step (`bench/allreduce/run.sh "
                 "--gradients DIR --steps \"1 5\"`). Step 1: LoRA-B is still zero, so half the gradient (B's "
                 "inputs' side) is exact zeros; later steps are what a run sends.")
        R.append("")
        notes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notes_real.md")
        if os.path.exists(notes):  # hand-written reading of the real-gradient rows
            R += [open(notes).read().strip(), ""]
        tables(real, R)
        R.append(REAL_END)
        write(dst, REAL_BEGIN, REAL_END, R, after=END)
    if not runs:
        return
    L = [BEGIN, "## Gradient all-reduce", ""]
    L.append("`bench/allreduce/run.sh` (MPIHarness `bench` mode): `GradientAllReduce.average` on one flat fp32 buffer, "
             "every case in the same mpirun, interleaved rep by rep, plain `MPI_Allreduce` (`none`) as the baseline. "
             "Time per rep = the slowest rank's, from a barrier to its result (weighting, compression, transfer, "
             "decompression, division); table: median over reps (min in brackets). algbw = 4·N bytes / median "
             "(as nccl-tests). Ratio = fp32 bytes those messages would be / bytes this rank sent (9-byte frame "
             "headers included). zstd level 1.")
    L.append("")
    L.append("**Data: synthetic, not real LoRA gradients** (measured before training existed; the same benchmark on real SDXL gradients follows this section): gaussian, mean 0, with a "
             "standard deviation drawn per block of 65 536 floats log-uniformly from 1e-5 to 1e-2 (different "
             "tensors' gradients differ by orders of magnitude), a different seed per rank. Gaussian mantissas "
             "are incompressible, so lossless fp32 only wins the exponent byte; real gradients (many exact zeros "
             "in LoRA B at init, correlated neighbours) should compress better.")
    L.append("")
    L.append("Machine: 2 cores, Open MPI 4.1; np = 3 is oversubscribed (3 processes on 2 cores), so compression "
             "competes with the other ranks for a core. loopback = one host (Open MPI's shared-memory transport); "
             "10gbit / 1gbit = `cluster/netns/harness.sh` namespaces with tbf-shaped veth links, TCP only, "
             "no added delay (no sch_netem in this kernel).")
    L.append("")
    notes = os.path.join(os.path.dirname(os.path.abspath(__file__)), "notes.md")
    if os.path.exists(notes):  # hand-written reading of the numbers (the `.auto` rule, netns caveats)
        L += [open(notes).read().strip(), ""]
    tables(runs, L)
    L.append(END)
    write(dst, BEGIN, END, L)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: report.py bench/out/allreduce.jsonl bench/RESULTS.md")
    main(sys.argv[1], sys.argv[2])
