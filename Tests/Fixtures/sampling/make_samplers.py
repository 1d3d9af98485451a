"""Golden schedules and sampling loops from diffusers' schedulers (Tests/TrainingTests/SamplerTests.swift).

Run from the repository root (PyTorch + diffusers 0.42, CPU):

    python3 Tests/Fixtures/sampling/make_samplers.py

Every case builds the diffusers scheduler from SDXL base's scheduler_config.json (written out below: the
stabilityai/stable-diffusion-xl-base-1.0 file, EulerDiscreteScheduler with timestep_spacing "leading", steps_offset 1)
with `Class.from_config(config, **overrides)` as StableDiffusionXLPipeline users swap schedulers, then records:

  timesteps, sigmas (absent for DDIM), init_noise_sigma  after set_timesteps(steps)
  final        the latents after the whole loop of the pipeline (latents = noise · init_noise_sigma; per step:
               scale_model_input, model, step), with a synthetic model standing in for the UNet:
               model(x, t)[j] = 0.5 · x[j] + sin(j) · t / 1000  (x: the scaled input, j: the flat index)
               from the fixed initial noise `noise` (shape [1, 4, 4, 4]); Euler a's per-step noise is taken from
               `step_noise` (one [1, 4, 4, 4] draw per step, in order) by replacing the scheduler module's randn_tensor.

Writes samplers.json next to this script.
"""

import json
import os

import torch
import diffusers
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module

HERE = os.path.dirname(os.path.abspath(__file__))

# stabilityai/stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}

CLASSES = {"euler_a": EulerAncestralDiscreteScheduler, "euler": EulerDiscreteScheduler,
           "dpm++_2m": DPMSolverMultistepScheduler, "ddim": DDIMScheduler}

SHAPE = (1, 4, 4, 4)


def model(x, t):
    j = torch.arange(x.numel(), dtype=torch.float32).reshape(x.shape)
    return 0.5 * x + torch.sin(j) * (float(t) / 1000.0)


def run(sampler, steps, karras=False, prediction="epsilon", zero_snr=False, spacing="leading"):
    overrides = {"prediction_type": prediction, "timestep_spacing": spacing}
    if karras:
        overrides["use_karras_sigmas"] = True
    if zero_snr:
        overrides["rescale_betas_zero_snr"] = True
    sched = CLASSES[sampler].from_config(SDXL_SCHEDULER, **overrides)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(1000 + steps)
    noise = torch.randn(SHAPE, generator=gen)
    step_noise = [torch.randn(SHAPE, generator=gen) for _ in range(steps)] if sampler == "euler_a" else []
    pending = list(step_noise)
    original = euler_a_module.randn_tensor
    euler_a_module.randn_tensor = lambda shape, **kw: pending.pop(0)
    try:
        latents = noise * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(latents, t)
            latents = sched.step(model(inp, t), t, latents).prev_sample
    finally:
        euler_a_module.randn_tensor = original
    assert not pending
    case = {"sampler": sampler, "steps": steps, "karras": karras, "prediction": prediction, "zero_snr": zero_snr,
            "spacing": spacing, "timesteps": [float(t) for t in sched.timesteps],
            "init_noise_sigma": float(sched.init_noise_sigma),
            "noise": noise.flatten().tolist(), "step_noise": [n.flatten().tolist() for n in step_noise],
            "final": latents.flatten().tolist()}
    if sampler != "ddim":
        case["sigmas"] = [float(s) for s in sched.sigmas]
    return case


def main():
    cases = []
    for sampler in CLASSES:
        for steps in (1, 2, 7, 20, 28):
            cases.append(run(sampler, steps))
    for steps in (7, 28):
        cases.append(run("euler", steps, karras=True))
        cases.append(run("dpm++_2m", steps, karras=True))
    for sampler in CLASSES:
        cases.append(run(sampler, 12, prediction="v_prediction", zero_snr=True))
        cases.append(run(sampler, 12, prediction="v_prediction", zero_snr=True, spacing="trailing"))
    cases.append(run("dpm++_2m", 16, prediction="v_prediction"))
    out = {"produced_by": f"Tests/Fixtures/sampling/make_samplers.py (torch {torch.__version__}, diffusers {diffusers.__version__})",
           "cases": cases}
    path = os.path.join(HERE, "samplers.json")
    with open(path, "w") as f:
        json.dump(out, f, separators=(",", ":"))
    print(f"wrote {path}: {len(cases)} cases, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
