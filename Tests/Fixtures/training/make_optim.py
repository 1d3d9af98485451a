#!/usr/bin/env python3
"""Golden values for Sources/Training/Optimizer (OptimizerTests, LRScheduleTests).

Writes Tests/Fixtures/training/optim.json. References (what kohya sd-scripts get_optimizer /
get_scheduler_fix use):
  AdamW      torch.optim.AdamW                         (torch 2.13.0+cpu)
  AdamW8bit  bitsandbytes.optim.AdamW8bit, CPU backend  (bitsandbytes 0.50.2)
  Lion       lion_pytorch.Lion                          (lion-pytorch 0.2.5)
  Prodigy    prodigyopt.Prodigy                         (prodigyopt 1.1.2)
  Adafactor  transformers.optimization.Adafactor        (transformers 5.23)
  schedules  transformers.optimization.TYPE_TO_SCHEDULER_FUNCTION (what kohya imports; same
             formulas as diffusers.optimization.get_scheduler)
  clipping   torch.nn.utils.clip_grad_norm_
Install the extras with `pip install --no-deps bitsandbytes==0.50.2 lion-pytorch==0.2.5 prodigyopt==1.1.2`.

Inputs (initial parameters, per-step gradients) come from a 64-bit LCG that yields float32 values
exactly (24-bit integers scaled by powers of two), so the Swift test regenerates them bit for bit
instead of reading them from the fixture (OptimizerTests.swift `FixtureRandom`).
"""
import json
import math
import os

import torch

MASK64 = (1 << 64) - 1


class FixtureRandom:
    """state = state * 6364136223846793005 + 1442695040888963407 (mod 2^64);
    value = ((state >> 40) / 2^24) * 2 - 1, exact in float32, in [-1, 1)."""

    def __init__(self, seed):
        self.state = seed & MASK64

    def next_signed(self):
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) & MASK64
        return ((self.state >> 40) / float(1 << 24)) * 2.0 - 1.0

    def values(self, count, scale):
        # scale is a power of two so the product stays exact in float32
        return [self.next_signed() * scale for _ in range(count)]


# The small layout every optimizer runs on: two groups (0 = unet, 1 = text encoder), a linear
# LoRA pair, a zero-initialised up weight (as kohya initialises lora_up) and conv-shaped entries.
LAYOUT = [
    # name, shape, group, init scale (0 = zeros), gradient scale
    ("lora_unet_a.lora_down.weight", [4, 24], 0, 0.125, 0.25),
    ("lora_unet_a.lora_up.weight", [20, 4], 0, 0.0, 0.5),
    ("lora_te1_b.lora_down.weight", [4, 6, 3, 3], 1, 0.0625, 0.125),
    ("lora_te1_b.lora_up.weight", [8, 4, 1, 1], 1, 0.25, 1.0),
]
STEPS = 8
GROUP_LRS = [1e-3, 5e-4]  # base lrs per group
# per-step lr multiplier so the optimizers see a changing lr like under a scheduler
LR_FACTORS = [0.5, 1.0, 1.0, 0.75, 1.0, 0.5, 0.25, 1.0]


def make_params(layout, seed):
    rng = FixtureRandom(seed)
    params = []
    for name, shape, group, init_scale, _ in layout:
        n = math.prod(shape)
        vals = rng.values(n, init_scale if init_scale > 0 else 1.0)
        if init_scale == 0:
            vals = [0.0] * n
        params.append(torch.nn.Parameter(torch.tensor(vals, dtype=torch.float32).reshape(shape)))
    return params


def make_grads(layout, seed, step):
    """(direction + noise / 2) * grad_scale: a fixed direction shared by all steps (so Prodigy's
    d estimate actually grows) plus fresh noise each step; every operation is exact or a single
    float32 rounding, reproduced in Swift."""
    direction_rng = FixtureRandom(seed * 1000 + 999)
    noise_rng = FixtureRandom(seed * 1000 + step + 1)
    grads = []
    for name, shape, group, _, grad_scale in layout:
        n = math.prod(shape)
        direction = torch.tensor(direction_rng.values(n, 1.0), dtype=torch.float32)
        noise = torch.tensor(noise_rng.values(n, 0.5), dtype=torch.float32)
        grads.append(((direction + noise) * grad_scale).reshape(shape))
    return grads


def f32(v):
    # 9 significant digits round-trip a float32; keeps the file small
    return float("%.9g" % v)


def flat(params):
    return [f32(v) for p in params for v in p.detach().reshape(-1).tolist()]


def run(layout, make_opt, seed, steps, group_lrs, lr_factors, snapshot_steps):
    params = make_params(layout, seed)
    groups = []
    for g in range(len(group_lrs)):
        groups.append({"params": [p for p, e in zip(params, layout) if e[2] == g], "lr": group_lrs[g]})
    opt = make_opt(groups)
    snapshots = {}
    for step in range(steps):
        for g, group in enumerate(opt.param_groups):
            if "lr" in group and group["lr"] is not None:
                group["lr"] = group_lrs[g] * lr_factors[step]
        for p, grad in zip(params, make_grads(layout, seed, step)):
            p.grad = grad.clone()
        opt.step()
        if step + 1 in snapshot_steps:
            snapshots[str(step + 1)] = flat(params)
    extra = {}
    return snapshots, opt, extra


def optimizer_cases():
    import bitsandbytes as bnb
    import lion_pytorch
    import prodigyopt
    import transformers

    cases = []
    # kohya: optimizer_class(trainable_params, lr=args.learning_rate, **optimizer_kwargs); the
    # "args" entries are what --optimizer_args would carry.
    cases.append(("AdamW", [], lambda g: torch.optim.AdamW(g, lr=1e-3)))
    cases.append(("AdamW", ["weight_decay=0.1", "betas=(0.8,0.95)", "eps=1e-6"],
                  lambda g: torch.optim.AdamW(g, lr=1e-3, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6)))
    cases.append(("AdamW", ["amsgrad=True"], lambda g: torch.optim.AdamW(g, lr=1e-3, amsgrad=True)))
    cases.append(("Lion", [], lambda g: lion_pytorch.Lion(g, lr=1e-3)))
    cases.append(("Lion", ["weight_decay=0.5", "betas=0.95,0.98"],
                  lambda g: lion_pytorch.Lion(g, lr=1e-3, weight_decay=0.5, betas=(0.95, 0.98))))
    # Prodigy: kohya recommends lr=1.0; different non-zero group lrs are refused by prodigyopt, so
    # these cases run both groups at the same lr (GROUP_LRS overridden below).
    cases.append(("Prodigy", [], lambda g: prodigyopt.Prodigy(g, lr=1.0)))
    cases.append(("Prodigy", ["d_coef=2.0", "use_bias_correction=True", "safeguard_warmup=True",
                              "weight_decay=0.01", "decouple=True"],
                  lambda g: prodigyopt.Prodigy(g, lr=1.0, d_coef=2.0, use_bias_correction=True,
                                               safeguard_warmup=True, weight_decay=0.01, decouple=True)))
    cases.append(("Prodigy", ["weight_decay=0.1", "decouple=False", "betas=(0.9,0.99)", "slice_p=3",
                              "growth_rate=1.5"],
                  lambda g: prodigyopt.Prodigy(g, lr=1.0, weight_decay=0.1, decouple=False, betas=(0.9, 0.99),
                                               slice_p=3, growth_rate=1.5)))
    # Adafactor as kohya builds it: relative_step defaults to True and then lr=None and the group
    # lrs are dropped.
    def adafactor_relative(g, **kw):
        for group in g:
            group.pop("lr", None)
        return transformers.optimization.Adafactor(g, lr=None, relative_step=True, **kw)

    cases.append(("Adafactor", [], lambda g: adafactor_relative(g)))
    cases.append(("Adafactor", ["warmup_init=True", "scale_parameter=False"],
                  lambda g: adafactor_relative(g, warmup_init=True, scale_parameter=False)))
    cases.append(("Adafactor", ["relative_step=False", "scale_parameter=False", "warmup_init=False"],
                  lambda g: transformers.optimization.Adafactor(g, lr=1e-3, relative_step=False,
                                                                scale_parameter=False, warmup_init=False)))
    cases.append(("Adafactor", ["relative_step=False", "beta1=0.9", "weight_decay=0.01", "clip_threshold=0.5"],
                  lambda g: transformers.optimization.Adafactor(g, lr=1e-3, relative_step=False, beta1=0.9,
                                                                weight_decay=0.01, clip_threshold=0.5)))
    # AdamW8bit on the small layout: every entry is below min_8bit_size (4096), so bnb keeps fp32
    # state and runs its 32-bit CPU update.
    cases.append(("AdamW8bit", [], lambda g: bnb.optim.AdamW8bit(g, lr=1e-3)))
    return cases


# Layout with a >= 4096-element entry so AdamW8bit uses block-wise 8-bit state (256-element
# blocks, last one partial: 4480 = 17.5 * 256) next to a small fp32-state entry.
LAYOUT_8BIT = [
    ("lora_unet_big.lora_down.weight", [64, 70], 0, 0.125, 0.25),
    ("lora_te1_small.lora_up.weight", [16, 4, 1, 1], 1, 0.25, 0.5),
]
STEPS_8BIT = 5


def main():
    import bitsandbytes as bnb
    import bitsandbytes.functional as BF

    out = {
        "generator": "Tests/Fixtures/training/make_optim.py",
        "versions": {"torch": torch.__version__, "bitsandbytes": bnb.__version__},
        "layout": [{"name": n, "shape": s, "group": g, "init_scale": i, "grad_scale": gs}
                   for n, s, g, i, gs in LAYOUT],
        "seed": 7,
        "steps": STEPS,
        "group_lrs": GROUP_LRS,
        "lr_factors": LR_FACTORS,
        "cases": [],
    }
    for type_name, args, make_opt in optimizer_cases():
        group_lrs = [1.0, 1.0] if type_name == "Prodigy" else GROUP_LRS
        # the step-1 snapshot only for the first case (localises a failure to the first update)
        snaps, opt, _ = run(LAYOUT, make_opt, 7, STEPS, group_lrs, LR_FACTORS,
                            {1, STEPS} if not out["cases"] else {STEPS})
        case = {"type": type_name, "args": args, "group_lrs": group_lrs, "params_after": snaps}
        if type_name == "Prodigy":
            case["d"] = opt.param_groups[0]["d"]
        if type_name == "Adafactor":
            # what transformers.AdafactorSchedule logs: _get_lr of each group's first parameter
            case["effective_lrs"] = [float(opt._get_lr(g, opt.state[g["params"][0]])) for g in opt.param_groups]
        out["cases"].append(case)

    # --- AdamW8bit with real 8-bit state
    snaps, opt, _ = run(LAYOUT_8BIT, lambda g: bnb.optim.AdamW8bit(g, lr=1e-3), 11, STEPS_8BIT,
                        GROUP_LRS, LR_FACTORS, {STEPS_8BIT})
    big = opt.param_groups[0]["params"][0]
    st = opt.state[big]
    assert st["state1"].dtype == torch.uint8
    out["adamw8bit"] = {
        "layout": [{"name": n, "shape": s, "group": g, "init_scale": i, "grad_scale": gs}
                   for n, s, g, i, gs in LAYOUT_8BIT],
        "seed": 11, "steps": STEPS_8BIT, "group_lrs": GROUP_LRS,
        "params_after": snaps,
        "state1_codes": st["state1"].reshape(-1).tolist(),
        "state2_codes": st["state2"].reshape(-1).tolist(),
        "absmax1": [f32(v) for v in st["absmax1"].tolist()],
        "absmax2": [f32(v) for v in st["absmax2"].tolist()],
    }
    # bnb's quantisation maps and a quantize/dequantize round trip of values spanning 5 decades
    signed_map = BF.create_dynamic_map(signed=True)
    unsigned_map = BF.create_dynamic_map(signed=False)
    rng = FixtureRandom(99)
    values = []
    for i in range(700):
        v = rng.next_signed()
        values.append(v * (2.0 ** -(i % 17)))
    x = torch.tensor(values, dtype=torch.float32)
    codes, absmax = torch.ops.bitsandbytes.quantize_blockwise(x, signed_map, 256)
    deq = torch.ops.bitsandbytes.dequantize_blockwise(codes, absmax, signed_map, 256, torch.float32)
    xu = x.abs()
    codes_u, absmax_u = torch.ops.bitsandbytes.quantize_blockwise(xu, unsigned_map, 256)
    out["quantization"] = {
        "signed_map": [f32(v) for v in signed_map.tolist()],
        "unsigned_map": [f32(v) for v in unsigned_map.tolist()],
        "values": [f32(v) for v in values],
        "signed_codes": codes.tolist(), "signed_absmax": [f32(v) for v in absmax.tolist()],
        "signed_dequantized": [f32(v) for v in deq.tolist()],
        "unsigned_codes": codes_u.tolist(), "unsigned_absmax": [f32(v) for v in absmax_u.tolist()],
    }

    # --- LR schedules (kohya get_scheduler_fix -> transformers TYPE_TO_SCHEDULER_FUNCTION)
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    sched_cases = []
    base_lr = 2e-4
    for name, warmup, total, cycles, power in [
        ("constant", 0, 50, 1, 1.0), ("constant_with_warmup", 7, 50, 1, 1.0), ("linear", 0, 50, 1, 1.0),
        ("linear", 10, 50, 1, 1.0), ("cosine", 5, 60, 1, 1.0), ("cosine_with_restarts", 5, 60, 3, 1.0),
        ("cosine_with_restarts", 0, 40, 1, 1.0), ("polynomial", 4, 40, 1, 1.0), ("polynomial", 0, 40, 1, 2.0),
    ]:
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=base_lr)
        st = SchedulerType(name)
        fn = TYPE_TO_SCHEDULER_FUNCTION[st]
        # the keyword set kohya passes per scheduler
        if st == SchedulerType.CONSTANT:
            sch = fn(opt)
        elif st == SchedulerType.CONSTANT_WITH_WARMUP:
            sch = fn(opt, num_warmup_steps=warmup)
        elif st == SchedulerType.COSINE_WITH_RESTARTS:
            sch = fn(opt, num_warmup_steps=warmup, num_training_steps=total, num_cycles=cycles)
        elif st == SchedulerType.POLYNOMIAL:
            sch = fn(opt, num_warmup_steps=warmup, num_training_steps=total, power=power)
        else:
            sch = fn(opt, num_warmup_steps=warmup, num_training_steps=total)
        lrs = []
        for _ in range(total + 3):  # a few past the end as well
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sch.step()
        sched_cases.append({"name": name, "warmup": warmup, "total": total, "num_cycles": cycles,
                            "power": power, "base_lr": base_lr, "lrs": lrs})
    out["schedules"] = sched_cases

    # kohya under accelerate on N processes: get_scheduler_fix uses num_training_steps = max_train_steps * N
    # (a float --lr_warmup_steps is a ratio of that; an int is used as is), and accelerate's
    # AcceleratedScheduler steps the LambdaLR N times per optimizer step (split_batches=False).
    kohya_cases = []
    for name, warmup_arg, max_steps, processes in [("cosine", 10, 40, 2), ("linear", 0.25, 30, 3),
                                                   ("constant_with_warmup", 6, 20, 2)]:
        total = max_steps * processes
        warmup = int(warmup_arg * total) if isinstance(warmup_arg, float) else warmup_arg
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=base_lr)
        st = SchedulerType(name)
        fn = TYPE_TO_SCHEDULER_FUNCTION[st]
        if st == SchedulerType.CONSTANT_WITH_WARMUP:
            sch = fn(opt, num_warmup_steps=warmup)
        else:
            sch = fn(opt, num_warmup_steps=warmup, num_training_steps=total)
        lrs = []
        for _ in range(max_steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            for _ in range(processes):
                sch.step()
        kohya_cases.append({"name": name, "lr_warmup_steps": warmup_arg, "max_train_steps": max_steps,
                            "processes": processes, "base_lr": base_lr, "lrs": lrs})
    out["kohya_schedules"] = kohya_cases

    # --- gradient clipping over the small layout's tensors
    clip_cases = []
    for max_norm, scale in [(1.0, 1.0), (0.05, 1.0), (100.0, 1.0), (1.0, 2.0 ** -20)]:
        grads = [g * scale for g in make_grads(LAYOUT, 5, 0)]
        ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        norm = torch.nn.utils.clip_grad_norm_(ps, max_norm)
        clip_cases.append({"max_norm": max_norm, "scale": scale, "seed": 5, "norm": float(norm),
                           "clipped": flat([p.grad for p in ps])})
    out["clipping"] = clip_cases

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "optim.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
    print(path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
