#!/usr/bin/env python3
"""Writes the golden fixtures for the tensor engine's operations, from PyTorch on CPU.

    pip install torch==2.13.0+cpu safetensors
    python3 Tests/Fixtures/make_op_fixtures.py        # rewrites Tests/Fixtures/ops/*.safetensors

Each case is one small safetensors file: `input.<k>` (random, never zeros), `index.<k>` (integer inputs),
`output` (or `output.<k>`), `grad_output` (random upstream gradient), `grad.<k>` (d(output·grad_output)/d input
via torch.autograd), and metadata `args` (JSON) and `code` (the PyTorch expression used). The cases live in
ops_*.py beside this file, one module per group of operations; each defines `cases(save)`.
"""
import glob
import importlib.util
import inspect
import json
import os
import sys

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "ops")


def save(name, fn, inputs, args=None, indices=None, grad_inputs=None, seed=0):
    """Runs `fn(**inputs, **indices)` (a tensor or dict of tensors), backpropagates a random
    grad_output, and writes the case. `grad_inputs` names the inputs whose gradient is recorded
    (default: all float inputs)."""
    torch.manual_seed(seed + 12345)
    inputs = {k: v.detach().clone().float().requires_grad_(grad_inputs is None or k in grad_inputs)
              for k, v in inputs.items()}
    indices = indices or {}
    out = fn(**inputs, **indices)
    outs = out if isinstance(out, dict) else {None: out}
    tensors, total = {}, 0
    for k, o in outs.items():
        g = torch.randn_like(o)
        suffix = "" if k is None else "." + k
        tensors["output" + suffix] = o.detach().contiguous()
        tensors["grad_output" + suffix] = g.contiguous()
        if o.requires_grad:
            total = total + (o * g).sum()
    for k, v in inputs.items():
        tensors["input." + k] = v.detach().contiguous()
    if torch.is_tensor(total):
        total.backward()
    for k, v in inputs.items():
        if v.requires_grad and v.grad is not None:
            tensors["grad." + k] = v.grad.contiguous()
    for k, v in indices.items():
        if torch.is_tensor(v):
            tensors["index." + k] = v.to(torch.int64).contiguous()
    code = inspect.getsource(fn).strip() if not isinstance(fn, str) else fn
    meta = {"args": json.dumps(args or {}), "code": code, "torch": torch.__version__}
    save_file(tensors, os.path.join(OUT, name + ".safetensors"), metadata=meta)
    print(f"{name}: " + ", ".join(f"{k}{list(v.shape)}" for k, v in tensors.items()))


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.set_num_threads(2)
    sys.path.insert(0, HERE)
    only = set(sys.argv[1:])
    for path in sorted(glob.glob(os.path.join(HERE, "ops_*.py"))):
        mod = os.path.splitext(os.path.basename(path))[0]
        if only and mod not in only:
            continue
        spec = importlib.util.spec_from_file_location(mod, path)
        m = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(m)
        m.cases(save)


if __name__ == "__main__":
    main()
