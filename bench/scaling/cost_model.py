#!/usr/bin/env python3
"""The cost model of a data-parallel lora-dist step (issue 14): how step time and per-rank scaling efficiency depend on
the LoRA's size, the link, the node count and the step time per node — checked against the measured rows of
bench/out/scaling_raw.jsonl (bench/scaling/report.py), then tabulated for real clusters. Writes the "Cost model"
part of the scaling section of bench/RESULTS.md (between <!-- costmodel:begin --> and <!-- costmodel:end -->).

    python3 bench/scaling/cost_model.py

The model (one rank per node, ring all-reduce, fixed order; every quantity per step):
    B      LoRA gradient bytes (4 × parameters); r: lossless wire ratio (raw / sent bytes) on real gradients
    L      link throughput per direction, bytes/s (what TCP gets from the link); alpha: latency per message
    K      codec throughput of one rank's communication thread (byte grouping + zstd level 1, both ways), raw bytes/s
    Tc     compute time of a step on one node (forward, backward, optimizer) — the np = 1 step
    ring:  C(p) = 2(p−1)/p · B · (1/(r·L) + 1/K) + 2(p−1) · m · alpha,   m = ⌈B / (p · piece)⌉ messages per ring step
           (transfer and codec add: on these 2 cores the measured rows show no overlap between them; a node with a free
           core for the communication thread pipelines them, which the model does not credit)
    after backward:  T(p) = Tc + C(p)
    overlapped:      T(p) = Tc + θ·γ·2(p−1)/p·B + max(C(p) − W, C(p) · b_last / B),   W = f_b · Tc · (1 − 1/n_b)
           f_b: backward's share of the step (the window the buckets can hide in; the first bucket is ready after
           1/n_b of it), n_b buckets, b_last the last bucket's bytes; θ·γ: what the communication thread costs the
           compute per byte it reduces where it has no core of its own (θ = 1 on this 2-core machine, where it is
           fitted from the overlapped rows — more than its own CPU time: 4 threads on 2 cores also evict each other's
           caches; θ = 0 on a node with a core to spare, not measurable here)
    per-rank efficiency  E(p) = Tc / T(p)
"""
import json
import math
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
RAW = os.path.join(BENCH, "out", "scaling_raw.jsonl")
RESULTS = os.path.join(BENCH, "RESULTS.md")
BEGIN, END = "<!-- costmodel:begin -->", "<!-- costmodel:end -->"

PARAMS = {16: 42_557_440, 64: 170_229_760}     # SDXL UNet LoRA parameters at rank 16 / 64 (722 modules, the runs' logs)
PIECE = 4 << 20                                 # bytes per ring message (GradientAllReduce.pieceElements = 1 Mi floats)
ALPHA = 100e-6                                  # s per message on a TCP LAN (not measurable here: no netem)
F_BACKWARD = 0.65                               # backward share of a checkpointed SDXL step (bench/out/unet_profile)
BUCKET = 25e6                                   # bucket_mb default


def comm(p, B, r, L, K):
    m = math.ceil(B / (p * PIECE))
    return 2 * (p - 1) / p * B * (1 / (r * L) + 1 / K) + 2 * (p - 1) * m * ALPHA


def exposed(p, B, r, L, K, Tc):
    C = comm(p, B, r, L, K)
    nb = max(1, math.ceil(B / BUCKET))
    last = B - (nb - 1) * BUCKET
    W = F_BACKWARD * Tc * (1 - 1 / nb)
    return max(C - W, C * last / B)


def step(p, B, r, L, K, Tc, overlap, theta, gamma=0.0):
    if not overlap:
        return Tc + comm(p, B, r, L, K)
    return Tc + theta * gamma * 2 * (p - 1) / p * B + exposed(p, B, r, L, K, Tc)


def med(v):
    return statistics.median(v)


def main():
    rows = {}
    if os.path.exists(RAW):
        with open(RAW) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    if "error" not in r:
                        rows[r["run"]] = r
    L_ = [BEGIN, "### Cost model (bench/scaling/cost_model.py)", ""]
    L_.append("Step time T(p) and per-rank efficiency E(p) = Tc / T(p) for p nodes, one rank each (the model and its "
              "terms are in the script's docstring): ring all-reduce C(p) = 2(p−1)/p · B · (1/(r·L) + 1/K) + "
              "2(p−1)·m·α; after backward T = Tc + C; overlapped T = Tc + θ·(codec CPU) + max(C − W, last bucket's "
              "share of C), with W = 0.65·Tc·(1 − 1/n_buckets) the part of backward the buckets can hide in.")
    L_.append("")
    # Calibration from this machine's runs: K from the loopback rows (transfer ≈ free), L from the shaped rows.
    cal = {}
    for rank in (16, 64):
        B = 4 * PARAMS[rank]
        loop = rows.get(f"r{rank}-np2-loopback-after")   # fp32 wire
        if loop:
            # loopback's shared memory moves ~1.5 GB/s here (bench all-reduce section, MPI_Allreduce row): a small term
            c = med(loop["comm_s"]) - B / 1.5e9
            cal.setdefault("K", []).append(B / c)
        for link, rate in (("1gbit", 125e6), ("10gbit", 1250e6)):
            after = rows.get(f"r{rank}-np2-{link}-after")
            if after and "K" in cal:
                r = med(after["ratio"][1:])
                t = med(after["comm_s"]) - B / cal["K"][0]
                if t > 0:
                    cal.setdefault(link, []).append(B / (r * t))
    if "K" not in cal:
        L_.append("Not calibrated: the loopback rows are missing from bench/out/scaling_raw.jsonl.")
        L_.append(END)
        return write(L_)
    K = med(cal["K"])
    links = {k: med(v) for k, v in cal.items() if k != "K"}
    L_.append(f"Calibrated on this machine: codec K = {K / 1e6:.0f} MB/s per rank (loopback rows: their all-reduce time "
              "less ~B/1.5 GB/s of shared-memory transfer); effective link L = "
              + ", ".join(f"{k} {v / 1e6:.0f} MB/s ({100 * v / (125e6 if k == '1gbit' else 1250e6):.0f} % of the line rate)"
                          for k, v in links.items())
              + " (the shaped rows' all-reduce time less the codec). θ = 1 (two 1-thread ranks and their "
              "communication threads on 2 cores).")
    L_.append("")
    # γ: fitted, one constant for every overlapped row (median of what each lost beyond its modelled exposed time).
    losses = []
    for r in rows.values():
        one = rows.get(f"r{r['lora_rank']}-np1")
        if r["ranks"] != 2 or not r["overlap"] or not one:
            continue
        B = 4 * PARAMS[r["lora_rank"]]
        plain = r.get("wire", "fp32") == "none"
        Lk = links.get(r["link"], 1.5e9 if r["link"] == "loopback" else None)
        if Lk is None:
            continue
        ratio = 1.0 if plain else med(r["ratio"][1:])
        Tc = med(one["step_s"])
        lost = med(r["step_s"]) - Tc - exposed(2, B, ratio, Lk, float("inf") if plain else K, Tc)
        losses.append(lost / B)
    gamma = med(losses) if losses else 0.0
    L_.append(f"Fitted: γ = {gamma * 1e9:.1f} s per GB reduced — what an overlapped step loses to its communication "
              "thread on these 2 cores (its own CPU plus the two ranks' compute threads being preempted and evicted "
              "from cache), median over the overlapped rows; the after-backward rows have no fitted constant.")
    L_.append("")
    L_.append("Check against the measured np = 2 rows (Tc = that rank's np = 1 step):")
    L_.append("")
    L_.append("| run | measured step s | model step s | error | measured E | model E |")
    L_.append("|---|---:|---:|---:|---:|---:|")
    errs = []
    worst = None
    for name, r in rows.items():
        if r["ranks"] != 2:
            continue
        one = rows.get(f"r{r['lora_rank']}-np1")
        if not one:
            continue
        Tc = med(one["step_s"])
        B = 4 * PARAMS[r["lora_rank"]]
        link = r["link"]
        L = links.get(link, 1.5e9 if link == "loopback" else None)
        if L is None:
            continue
        plain = r.get("wire", "fp32") == "none"
        ratio = 1.0 if plain else med(r["ratio"][1:]) if len(r["ratio"]) > 1 else 1.0
        model = step(2, B, ratio, L, float("inf") if plain else K, Tc, r["overlap"], 1.0, gamma)
        meas = med(r["step_s"])
        err = (model - meas) / meas
        errs.append(abs(err))
        worst = worst if worst and abs(worst[1]) >= abs(err) else (name, err, (max(r["step_s"]) - min(r["step_s"])) / meas)
        L_.append(f"| {name} | {meas:.2f} | {model:.2f} | {100 * err:+.1f} % | {Tc / meas:.2f} | {Tc / model:.2f} |")
    L_.append("")
    spread = []
    for r in rows.values():
        s = r["step_s"]
        if len(s) > 1:
            spread.append((max(s) - min(s)) / med(s))
    noise = med(spread) if spread else float("nan")
    L_.append(f"Noise: the median spread (max − min) / median of a run's own steps is {100 * noise:.1f} %; the model's "
              f"largest error above is {100 * max(errs):.1f} % ({worst[0]}, whose own steps spread {100 * worst[2]:.1f} %; "
              f"median error {100 * med(errs):.1f} %)." if errs else "")
    L_.append("")
    # Reading off a real cluster: one rank per node with a core to spare for the communication thread (θ = 0), the
    # measured single-core codec rate, the lossless ratio measured on real gradients, TCP at 90 % of the line rate.
    ratio = med([med(r["ratio"][1:]) for r in rows.values()
                 if r.get("wire", "fp32") == "fp32" and len(r.get("ratio", [])) > 1]) if rows else 1.25
    L_.append(f"Reading it off for a cluster (θ = 0: a node has a core for the communication thread; K = {K / 1e6:.0f} "
              f"MB/s, one core's codec; r = {ratio:.2f}, the lossless ratio measured above; TCP at 90 % of the line "
              "rate; overlapped; `wire_format = \"none\"` (no codec, r = 1) where it is faster, marked *). Per-rank "
              "efficiency E(p):")
    L_.append("")
    L_.append("| LoRA | link | step per node | p = 2 | 4 | 8 | 16 | 32 | 64 |")
    L_.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for rank in (16, 64):
        B = 4 * PARAMS[rank]
        for gbit in (1, 10, 25, 100):
            L = 0.9 * gbit * 125e6
            for Tc in (5.0, 10.0, 30.0):
                cells = []
                for p in (2, 4, 8, 16, 32, 64):
                    zc = step(p, B, ratio, L, K, Tc, True, 0.0)
                    plain = step(p, B, 1.0, L, float("inf"), Tc, True, 0.0)
                    best = min(zc, plain)
                    cells.append(f"{Tc / best:.2f}" + ("*" if plain < zc else ""))
                L_.append(f"| rank {rank} ({B / 1e6:.0f} MB) | {gbit} Gbit/s | {Tc:.0f} s | " + " | ".join(cells) + " |")
    L_.append("")
    L_.append("How to read it: find your LoRA size and link, and your node's step time (the np = 1 step of your config "
              "on one node); nodes pay off while E stays high (E·p is the speed-up). The ring's 2(p−1)/p makes the "
              "communication per node almost independent of p, so E falls little with p once the per-node step is "
              "longer than the all-reduce; what ends the scaling is the all-reduce outgrowing the backward window "
              "(slow links, large LoRAs, short steps). The codec (one core, K above) limits fast links: there the "
              "plain MPI all-reduce (`wire_format = \"none\"`) wins.")
    L_.append(END)
    write(L_)


def write(lines):
    text = open(RESULTS).read()
    section = "\n".join(lines) + "\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):].lstrip("\n")
    elif "<!-- scaling:end -->" in text:
        i = text.index("<!-- scaling:end -->") + len("<!-- scaling:end -->")
        text = text[:i] + "\n\n" + section + text[i:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(RESULTS, "w") as f:
        f.write(text)
    print(section)


if __name__ == "__main__":
    main()
