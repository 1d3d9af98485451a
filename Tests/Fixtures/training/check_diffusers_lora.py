"""Checks a kohya-format SDXL LoRA against diffusers' own kohya loader, on the tiny SDXL UNet.
PyTorch 2.13 (CPU) + diffusers 0.42 + peft 0.21. From the repository root:

    python3 Tests/Fixtures/training/check_diffusers_lora.py --lora L.safetensors \\
        [--unet Tests/Fixtures/sdxl/unet_tiny.safetensors] [--inputs Tests/Fixtures/sdxl/unet_io.safetensors] \\
        [--out pred.safetensors] [--compare swift_out.safetensors [--atol 1e-4 --rtol 1e-4]]

    python3 Tests/Fixtures/training/check_diffusers_lora.py --make-fixture
        writes lora_eval.safetensors and lora_eval_io.safetensors (below) and checks them.

What it does, failing loudly (exit 1) at the first disagreement:
 1. Loads the LDM single-file UNet into diffusers' UNet2DConditionModel (Tests/Fixtures/sdxl/make_unet.py).
 2. Loads the LoRA with diffusers: `StableDiffusionXLPipeline(unet=…, others None).load_lora_weights(path)`
    — lora_state_dict (kohya → diffusers key conversion with the UNet's config) → load_lora_into_unet
    (peft injection). diffusers' and peft's warnings are captured; any (an unexpected/missing key) fails.
 3. Every kohya module must have landed where kohya means it: for each `lora_unet_<ldm path>`, the
    diffusers module found through make_unet.diffusers_to_ldm (kohya_lora.lora_targets) must be a peft
    LoRA layer whose lora_A/lora_B weights equal the file's lora_down/lora_up exactly and whose scaling is
    alpha/rank; and peft must have injected into no other module. So no key is unused and none missing.
 4. The prediction on the inputs (x, timesteps, context, y — what `lora-dist eval unet` takes) with
    diffusers' LoRA must equal the prediction with kohya_lora's LoRAModule wrappers (the network that
    make_train_step.py trains), and must differ from the UNet without LoRA (else the LoRA is a no-op).
 5. --out writes diffusers' prediction as "out" [B,4,h,w]; --compare reads "out" from the given file
    (e.g. `lora-dist eval unet --lora` output) and requires |swift − diffusers| ≤ atol + rtol·|diffusers|.

Fixture (--make-fixture), from train_step.safetensors (run make_train_step.py first):
  lora_eval.safetensors     the LoRA after make_train_step.py's 10 AdamW steps, in kohya's file format:
                            <lora>.lora_down.weight, <lora>.lora_up.weight, <lora>.alpha (F32) for the 198
                            modules of train_step's metadata "modules"; kohya metadata ss_network_module
                            = networks.lora, ss_network_dim 4, ss_network_alpha 2.0, ss_network_args
                            {"conv_dim": "2", "conv_alpha": "1.0"}, ss_base_model_version sdxl_base_v1-0.
  lora_eval_io.safetensors  x [2,4,16,16], timesteps [2], context [2,11,24], y [2,64] (from
                            Tests/Fixtures/sdxl/unet_io.safetensors); out [2,4,16,16]: diffusers'
                            prediction with the LoRA; out_base [2,4,16,16]: without it.
A Swift test runs `lora-dist eval unet --model unet_tiny --lora lora_eval.safetensors --inputs
lora_eval_io.safetensors` and compares its "out" with the committed one: no PyTorch needed.
"""

import argparse
import json
import logging
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kohya_lora  # noqa: E402

HERE = kohya_lora.HERE
ADAPTER = "kohya"
# Wrapper vs diffusers: same float32 math in another order (peft adds the LoRA branch the same way,
# dropout off) — only rounding may differ.
AGREE_ATOL = 1e-5


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def read_inputs(path):
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        need = ["x", "timesteps", "context", "y"]
        absent = [k for k in need if k not in keys]
        if absent:
            fail(f"{path} lacks {absent}: the inputs are x [B,4,h,w], timesteps [B], context [B,T,ctx], y [B,adm]")
        return {k: f.get_tensor(k).float() for k in need}


def diffusers_lora_unet(unet_path, lora_path):
    """The UNet with the LoRA loaded by diffusers' SDXL pipeline loader; checks 2 and 3 above."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    model = kohya_lora.load_tiny_unet(unet_path)
    # Before injection: peft's layers are also named Linear/Conv2d and would be walked as targets.
    targets = {name: path for name, path, _, _ in kohya_lora.lora_targets(model, conv=True)}
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=model, scheduler=EulerDiscreteScheduler())
    capture = Capture()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft")]
    for lg in loggers:
        lg.addHandler(capture)
    try:
        pipe.load_lora_weights(lora_path, adapter_name=ADAPTER)
    finally:
        for lg in loggers:
            lg.removeHandler(capture)
    # Any warning fails ("…led to unexpected keys…", "…led to missing keys…"), except the one about the
    # absent text encoders: the pipeline has none, and a UNet LoRA has no keys for them.
    bad = [m for m in capture.messages if not m.startswith("No LoRA keys associated to NoneType")]
    if bad:
        fail(f"diffusers reported while loading {lora_path}: {bad}")

    sd = load_file(lora_path)
    names = sorted({k.split(".")[0] for k in sd})
    not_unet = [n for n in names if not n.startswith("lora_unet_")]
    if not_unet:
        fail(f"{lora_path}: modules outside the UNet {not_unet[:5]}; this check covers UNet LoRAs only")
    unknown = [n for n in names if n not in targets]
    if unknown:
        fail(f"{lora_path}: {len(unknown)} modules are not kohya LoRA targets of the tiny SDXL UNet: {unknown[:5]}")
    injected = {name for name, mod in model.named_modules() if isinstance(mod, LoraLayer)}
    wanted = {targets[n] for n in names}
    if injected != wanted:
        fail(f"peft injected into {sorted(injected - wanted)[:5]} (not in the file) and missed "
             f"{sorted(wanted - injected)[:5]}")
    modules = dict(model.named_modules())
    for n in names:
        mod = modules[targets[n]]
        down, up = sd[f"{n}.lora_down.weight"].float(), sd[f"{n}.lora_up.weight"].float()
        rank = down.shape[0]
        alpha = float(sd[f"{n}.alpha"]) if f"{n}.alpha" in sd else float(rank)  # kohya: no alpha → rank
        a, b = mod.lora_A[ADAPTER].weight, mod.lora_B[ADAPTER].weight
        if a.shape != down.shape or not torch.equal(a, down) or b.shape != up.shape or not torch.equal(b, up):
            fail(f"{n}: diffusers' lora_A/lora_B at {targets[n]} are not the file's lora_down/lora_up")
        if abs(mod.scaling[ADAPTER] - alpha / rank) > 1e-7:
            fail(f"{n}: diffusers' scaling {mod.scaling[ADAPTER]} ≠ alpha/rank {alpha}/{rank}")
    print(f"diffusers loaded {len(names)} LoRA modules ({len(sd)} tensors) into exactly those modules, "
          f"weights and alpha/rank equal")
    return model


def wrapper_unet(unet_path, lora_path):
    """The UNet with kohya_lora's LoRAModule wrappers (what make_train_step.py trains)."""
    model = kohya_lora.load_tiny_unet(unet_path)
    net = kohya_lora.network_from_kohya(model, load_file(lora_path), lora_path)
    net.apply_to()
    return model


@torch.no_grad()
def predict(model, inputs):
    return kohya_lora.unet_forward(model, inputs["x"], inputs["timesteps"], inputs["context"], inputs["y"])


def check(lora_path, unet_path, inputs_path):
    """Checks 1–4; returns (diffusers' prediction, base prediction, inputs)."""
    inputs = read_inputs(inputs_path)
    out = predict(diffusers_lora_unet(unet_path, lora_path), inputs)
    ours = predict(wrapper_unet(unet_path, lora_path), inputs)
    base = predict(kohya_lora.load_tiny_unet(unet_path), inputs)
    diff = (out - ours).abs().max().item()
    effect = (out - base).abs().max().item()
    print(f"diffusers vs kohya LoRAModule wrapper: max |Δ| {diff:.2e}; LoRA effect max |Δ| {effect:.3e} "
          f"(|out| max {out.abs().max():.3f})")
    if not diff <= AGREE_ATOL:
        fail(f"diffusers' prediction and the kohya LoRAModule wrapper's differ by {diff:.3e} > {AGREE_ATOL}")
    if not effect > 1e-3:
        fail(f"the LoRA changes the prediction by only {effect:.2e}: it cannot be told from no LoRA")
    return out, base, inputs


def compare(out, path, atol, rtol):
    with safe_open(path, "pt") as f:
        if "out" not in f.keys():
            fail(f"{path} has no tensor 'out' (lora-dist eval unet writes it)")
        theirs = f.get_tensor("out").float()
    if theirs.shape != out.shape:
        fail(f"{path}: 'out' is {list(theirs.shape)}, diffusers' prediction {list(out.shape)}")
    err = (theirs - out).abs()
    bound = atol + rtol * out.abs()
    worst = (err - bound).argmax()
    print(f"{path} vs diffusers: max |Δ| {err.max():.3e} (atol {atol}, rtol {rtol})")
    if not bool((err <= bound).all()):
        fail(f"{path}: 'out' differs from diffusers at flat index {worst.item()}: "
             f"{theirs.flatten()[worst]:.6f} vs {out.flatten()[worst]:.6f}")


def make_fixture():
    step_path = os.path.join(HERE, "train_step.safetensors")
    if not os.path.exists(step_path):
        fail(f"{step_path} is missing: run Tests/Fixtures/training/make_train_step.py first")
    step = load_file(step_path)
    with safe_open(step_path, "pt") as f:
        meta = f.metadata()
    settings = json.loads(meta["settings"])
    modules = json.loads(meta["modules"])
    lora = {}
    for name, _, _, _ in modules:
        lora[f"{name}.lora_down.weight"] = step[f"adamw.final.{name}.lora_down.weight"]
        lora[f"{name}.lora_up.weight"] = step[f"adamw.final.{name}.lora_up.weight"]
        lora[f"{name}.alpha"] = step[f"{name}.alpha"]
    lora_meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(settings["network_dim"]),
        "ss_network_alpha": str(settings["network_alpha"]),
        "ss_network_args": json.dumps({"conv_dim": str(settings["conv_dim"]), "conv_alpha": str(settings["conv_alpha"])}),
        "ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False", "ss_output_name": "lora_eval",
        "ss_steps": str(settings["adamw"]["steps"]), "ss_learning_rate": str(settings["adamw"]["lr"]),
        "ss_min_snr_gamma": str(settings["eps"]["min_snr_gamma"]),
        "lora_dist.fixture": "Tests/Fixtures/training/check_diffusers_lora.py --make-fixture (adamw.final of "
                             "train_step.safetensors)",
    }
    lora_path = os.path.join(HERE, "lora_eval.safetensors")
    save_file({k: v.contiguous() for k, v in lora.items()}, lora_path, metadata=lora_meta)
    out, base, inputs = check(lora_path, kohya_lora.UNET_TINY, kohya_lora.UNET_IO)
    io = dict(inputs)
    io["out"], io["out_base"] = out, base
    io_path = os.path.join(HERE, "lora_eval_io.safetensors")
    save_file({k: v.contiguous() for k, v in io.items()}, io_path, metadata={
        "code": "out = diffusers UNet2DConditionModel with StableDiffusionXLPipeline.load_lora_weights("
                "lora_eval.safetensors) on (x, timesteps, context, y); out_base: without the LoRA",
        "lora_dist.fixture": "Tests/Fixtures/training/check_diffusers_lora.py --make-fixture"})
    # The committed out_base must be unet_io's output (the same UNet, no LoRA): ties this file to the
    # UNet conformance fixture.
    with safe_open(kohya_lora.UNET_IO, "pt") as f:
        ref = f.get_tensor("output")
    if not torch.allclose(base, ref, atol=1e-5, rtol=1e-5):
        fail(f"out_base differs from unet_io's output by {(base - ref).abs().max():.2e}")
    print(f"wrote {lora_path} ({os.path.getsize(lora_path)} bytes), {io_path} ({os.path.getsize(io_path)} bytes)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lora", help="kohya-format SDXL UNet LoRA (.safetensors)")
    ap.add_argument("--unet", default=kohya_lora.UNET_TINY, help="LDM single-file tiny UNet")
    ap.add_argument("--inputs", default=kohya_lora.UNET_IO, help="x, timesteps, context, y (.safetensors)")
    ap.add_argument("--out", help="write diffusers' prediction here as 'out'")
    ap.add_argument("--compare", help="a file whose 'out' must equal diffusers' prediction")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--rtol", type=float, default=1e-4)
    ap.add_argument("--make-fixture", action="store_true", help="write lora_eval*.safetensors from train_step")
    args = ap.parse_args()
    if args.make_fixture:
        make_fixture()
        return
    if not args.lora:
        ap.error("--lora is required (or --make-fixture)")
    for p in (args.lora, args.unet, args.inputs) + ((args.compare,) if args.compare else ()):
        if not os.path.exists(p):
            fail(f"{p}: no such file")
    out, _, _ = check(args.lora, args.unet, args.inputs)
    if args.out:
        save_file({"out": out.contiguous()}, args.out)
        print(f"wrote {args.out}")
    if args.compare:
        compare(out, args.compare, args.atol, args.rtol)
    print("OK")


if __name__ == "__main__":
    main()
