"""Golden values for Sources/Training/Step (noise schedule, noise sampling, loss + weighting).

Writes diffusion.safetensors next to this file. Every expected value comes from the reference code:
  * diffusers DDPMScheduler (scaled_linear, 0.00085..0.012, 1000 steps, clip_sample=False) for alphas_cumprod,
    add_noise and get_velocity;
  * kohya-ss/sd-scripts (commit 48d368fa) functions copied verbatim below: prepare_scheduler_for_custom_training,
    fix_noise_scheduler_betas_for_zero_terminal_snr, apply_snr_weight, scale_v_prediction_loss_like_noise_prediction,
    get_snr_scale, add_v_prediction_like_loss, apply_debiased_estimation, pyramid_noise_like, apply_noise_offset
    (library/custom_train_functions.py); get_timesteps, get_noise_noisy_latents_and_timesteps,
    get_huber_threshold_if_needed, conditional_loss (library/train_util.py); the loss tail of
    NetworkTrainer.process_batch and post_process_loss, and get_noise_scheduler (train_network.py).
The random draws kohya makes (torch.randn/randn_like/rand/randint, random.random) are recorded in call order
and saved, so the Swift side can replay exactly the same numbers through DiffusionNoise.apply(draws:).
Gradients are torch autograd of the kohya loss with respect to the prediction.

Run: python3 Tests/Fixtures/training/make_diffusion.py   (torch 2.13.0+cpu, diffusers 0.42.1)
"""
import argparse
import json
import math
import os
import random
from typing import Optional

import torch
from diffusers import DDPMScheduler
from safetensors.torch import save_file

logger_info = lambda *a, **k: None  # kohya logs here; silence


# ---------------- kohya library/custom_train_functions.py (verbatim) ----------------
def prepare_scheduler_for_custom_training(noise_scheduler, device):
    if hasattr(noise_scheduler, "all_snr"):
        return

    alphas_cumprod = noise_scheduler.alphas_cumprod
    sqrt_alphas_cumprod = torch.sqrt(alphas_cumprod)
    sqrt_one_minus_alphas_cumprod = torch.sqrt(1.0 - alphas_cumprod)
    alpha = sqrt_alphas_cumprod
    sigma = sqrt_one_minus_alphas_cumprod
    all_snr = (alpha / sigma) ** 2

    noise_scheduler.all_snr = all_snr.to(device)


def fix_noise_scheduler_betas_for_zero_terminal_snr(noise_scheduler):
    # fix beta: zero terminal SNR
    logger_info(f"fix noise scheduler betas: https://arxiv.org/abs/2305.08891")

    def enforce_zero_terminal_snr(betas):
        # Convert betas to alphas_bar_sqrt
        alphas = 1 - betas
        alphas_bar = alphas.cumprod(0)
        alphas_bar_sqrt = alphas_bar.sqrt()

        # Store old values.
        alphas_bar_sqrt_0 = alphas_bar_sqrt[0].clone()
        alphas_bar_sqrt_T = alphas_bar_sqrt[-1].clone()
        # Shift so last timestep is zero.
        alphas_bar_sqrt -= alphas_bar_sqrt_T
        # Scale so first timestep is back to old value.
        alphas_bar_sqrt *= alphas_bar_sqrt_0 / (alphas_bar_sqrt_0 - alphas_bar_sqrt_T)

        # Convert alphas_bar_sqrt to betas
        alphas_bar = alphas_bar_sqrt**2
        alphas = alphas_bar[1:] / alphas_bar[:-1]
        alphas = torch.cat([alphas_bar[0:1], alphas])
        betas = 1 - alphas
        return betas

    betas = noise_scheduler.betas
    betas = enforce_zero_terminal_snr(betas)
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)

    noise_scheduler.betas = betas
    noise_scheduler.alphas = alphas
    noise_scheduler.alphas_cumprod = alphas_cumprod


def apply_snr_weight(loss, timesteps, noise_scheduler, gamma, v_prediction=False):
    snr = torch.stack([noise_scheduler.all_snr[t] for t in timesteps])
    min_snr_gamma = torch.minimum(snr, torch.full_like(snr, gamma))
    if v_prediction:
        snr_weight = torch.div(min_snr_gamma, snr + 1).float().to(loss.device)
    else:
        snr_weight = torch.div(min_snr_gamma, snr).float().to(loss.device)
    loss = loss * snr_weight
    return loss


def scale_v_prediction_loss_like_noise_prediction(loss, timesteps, noise_scheduler):
    scale = get_snr_scale(timesteps, noise_scheduler)
    loss = loss * scale
    return loss


def get_snr_scale(timesteps, noise_scheduler):
    snr_t = torch.stack([noise_scheduler.all_snr[t] for t in timesteps])  # batch_size
    snr_t = torch.minimum(snr_t, torch.ones_like(snr_t) * 1000)  # if timestep is 0, snr_t is inf, so limit it to 1000
    scale = snr_t / (snr_t + 1)
    return scale


def add_v_prediction_like_loss(loss, timesteps, noise_scheduler, v_pred_like_loss):
    scale = get_snr_scale(timesteps, noise_scheduler)
    loss = loss + loss / scale * v_pred_like_loss
    return loss


def apply_debiased_estimation(loss, timesteps, noise_scheduler, v_prediction=False):
    snr_t = torch.stack([noise_scheduler.all_snr[t] for t in timesteps])  # batch_size
    snr_t = torch.minimum(snr_t, torch.ones_like(snr_t) * 1000)  # if timestep is 0, snr_t is inf, so limit it to 1000
    if v_prediction:
        weight = 1 / (snr_t + 1)
    else:
        weight = 1 / torch.sqrt(snr_t)
    loss = weight * loss
    return loss


def pyramid_noise_like(noise, device, iterations=6, discount=0.4) -> torch.FloatTensor:
    b, c, w, h = noise.shape  # EDIT: w and h get over-written, rename for a different variant!
    u = torch.nn.Upsample(size=(w, h), mode="bilinear").to(device)
    for i in range(iterations):
        r = random.random() * 2 + 2  # Rather than always going 2x,
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise += u(torch.randn(b, c, wn, hn).to(device)) * discount**i
        if wn == 1 or hn == 1:
            break  # Lowest resolution is 1x1
    return noise / noise.std()  # Scaled back to roughly unit variance


def apply_noise_offset(latents, noise, noise_offset, adaptive_noise_scale) -> torch.FloatTensor:
    if noise_offset is None:
        return noise
    if adaptive_noise_scale is not None:
        # latent shape: (batch_size, channels, height, width)
        # abs mean value for each channel
        latent_mean = torch.abs(latents.mean(dim=(2, 3), keepdim=True))

        # multiply adaptive noise scale to the mean value and add it to the noise offset
        noise_offset = noise_offset + adaptive_noise_scale * latent_mean
        noise_offset = torch.clamp(noise_offset, 0.0, None)  # in case of adaptive noise scale is negative

    noise = noise + noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), device=latents.device)
    return noise


class custom_train_functions:  # so the train_util code below reads as in kohya
    apply_noise_offset = staticmethod(apply_noise_offset)
    pyramid_noise_like = staticmethod(pyramid_noise_like)


# ---------------- kohya library/train_util.py (verbatim) ----------------
def get_timesteps(min_timestep: int, max_timestep: int, b_size: int, device: torch.device) -> torch.Tensor:
    if min_timestep < max_timestep:
        timesteps = torch.randint(min_timestep, max_timestep, (b_size,), device="cpu")
    else:
        timesteps = torch.full((b_size,), max_timestep, device="cpu")
    timesteps = timesteps.long().to(device)
    return timesteps


def get_noise_noisy_latents_and_timesteps(args, noise_scheduler, latents):
    # Sample noise that we'll add to the latents
    noise = torch.randn_like(latents, device=latents.device)
    if args.noise_offset:
        if args.noise_offset_random_strength:
            noise_offset = torch.rand(1, device=latents.device) * args.noise_offset
        else:
            noise_offset = args.noise_offset
        noise = custom_train_functions.apply_noise_offset(latents, noise, noise_offset, args.adaptive_noise_scale)
    if args.multires_noise_iterations:
        noise = custom_train_functions.pyramid_noise_like(
            noise, latents.device, args.multires_noise_iterations, args.multires_noise_discount
        )

    # Sample a random timestep for each image
    b_size = latents.shape[0]
    min_timestep = 0 if args.min_timestep is None else args.min_timestep
    max_timestep = noise_scheduler.config.num_train_timesteps if args.max_timestep is None else args.max_timestep
    timesteps = get_timesteps(min_timestep, max_timestep, b_size, latents.device)

    # Add noise to the latents according to the noise magnitude at each timestep
    # (this is the forward diffusion process)
    if args.ip_noise_gamma:
        if args.ip_noise_gamma_random_strength:
            strength = torch.rand(1, device=latents.device) * args.ip_noise_gamma
        else:
            strength = args.ip_noise_gamma
        noisy_latents = noise_scheduler.add_noise(latents, noise + strength * torch.randn_like(latents), timesteps)
    else:
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)

    # This moves the alphas_cumprod back to the CPU after it is moved in noise_scheduler.add_noise
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.cpu()

    return noise, noisy_latents, timesteps


def get_huber_threshold_if_needed(args, timesteps: torch.Tensor, noise_scheduler) -> Optional[torch.Tensor]:
    if not (args.loss_type == "huber" or args.loss_type == "smooth_l1"):
        return None

    b_size = timesteps.shape[0]
    if args.huber_schedule == "exponential":
        alpha = -math.log(args.huber_c) / noise_scheduler.config.num_train_timesteps
        result = torch.exp(-alpha * timesteps) * args.huber_scale
    elif args.huber_schedule == "snr":
        if not hasattr(noise_scheduler, "alphas_cumprod"):
            raise NotImplementedError("Huber schedule 'snr' is not supported with the current model.")
        alphas_cumprod = torch.index_select(noise_scheduler.alphas_cumprod, 0, timesteps.cpu())
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5
        result = (1 - args.huber_c) / (1 + sigmas) ** 2 + args.huber_c
        result = result.to(timesteps.device)
    elif args.huber_schedule == "constant":
        result = torch.full((b_size,), args.huber_c * args.huber_scale, device=timesteps.device)
    else:
        raise NotImplementedError(f"Unknown Huber loss schedule {args.huber_schedule}!")

    return result


def conditional_loss(model_pred, target, loss_type: str, reduction: str, huber_c: Optional[torch.Tensor] = None):
    if loss_type == "l2":
        loss = torch.nn.functional.mse_loss(model_pred, target, reduction=reduction)
    elif loss_type == "l1":
        loss = torch.nn.functional.l1_loss(model_pred, target, reduction=reduction)
    elif loss_type == "huber":
        if huber_c is None:
            raise NotImplementedError("huber_c not implemented correctly")
        # Reshape huber_c to broadcast with model_pred (supports 4D and 5D tensors)
        huber_c = huber_c.view(-1, *([1] * (model_pred.ndim - 1)))
        loss = 2 * huber_c * (torch.sqrt((model_pred - target) ** 2 + huber_c**2) - huber_c)
        if reduction == "mean":
            loss = torch.mean(loss)
        elif reduction == "sum":
            loss = torch.sum(loss)
    elif loss_type == "smooth_l1":
        if huber_c is None:
            raise NotImplementedError("huber_c not implemented correctly")
        # Reshape huber_c to broadcast with model_pred (supports 4D and 5D tensors)
        huber_c = huber_c.view(-1, *([1] * (model_pred.ndim - 1)))
        loss = 2 * (torch.sqrt((model_pred - target) ** 2 + huber_c**2) - huber_c)
        if reduction == "mean":
            loss = torch.mean(loss)
        elif reduction == "sum":
            loss = torch.sum(loss)
    else:
        raise NotImplementedError(f"Unsupported Loss Type: {loss_type}")
    return loss


# ---------------- kohya train_network.py (get_noise_scheduler, post_process_loss, process_batch tail) --------
def get_noise_scheduler(args):
    noise_scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False
    )
    prepare_scheduler_for_custom_training(noise_scheduler, "cpu")
    if args.zero_terminal_snr:
        fix_noise_scheduler_betas_for_zero_terminal_snr(noise_scheduler)
    return noise_scheduler


def post_process_loss(loss, args, timesteps, noise_scheduler):
    if args.min_snr_gamma:
        loss = apply_snr_weight(loss, timesteps, noise_scheduler, args.min_snr_gamma, args.v_parameterization)
    if args.scale_v_pred_loss_like_noise_pred:
        loss = scale_v_prediction_loss_like_noise_prediction(loss, timesteps, noise_scheduler)
    if args.v_pred_like_loss:
        loss = add_v_prediction_like_loss(loss, timesteps, noise_scheduler, args.v_pred_like_loss)
    if args.debiased_estimation_loss:
        loss = apply_debiased_estimation(loss, timesteps, noise_scheduler, args.v_parameterization)
    return loss


def process_batch_loss(args, noise_scheduler, noise_pred, target, timesteps, loss_weights):
    huber_c = get_huber_threshold_if_needed(args, timesteps, noise_scheduler)
    loss = conditional_loss(noise_pred.float(), target.float(), args.loss_type, "none", huber_c)
    loss = loss.mean(dim=list(range(1, loss.ndim)))  # mean over all dims except batch
    loss = loss * loss_weights
    loss = post_process_loss(loss, args, timesteps, noise_scheduler)
    return loss.mean(), loss


# ---------------- fixture ----------------
DEFAULTS = dict(
    noise_offset=None, noise_offset_random_strength=False, adaptive_noise_scale=None,
    multires_noise_iterations=None, multires_noise_discount=0.3, ip_noise_gamma=None,
    ip_noise_gamma_random_strength=False, min_timestep=None, max_timestep=None, zero_terminal_snr=False,
    loss_type="l2", huber_schedule="snr", huber_c=0.1, huber_scale=1.0, min_snr_gamma=None,
    v_parameterization=False, scale_v_pred_loss_like_noise_pred=False, v_pred_like_loss=None,
    debiased_estimation_loss=False,
)


def make_args(**kw):
    d = dict(DEFAULTS)
    d.update(kw)
    return argparse.Namespace(**d)


class Recorder:
    """Wraps the random functions kohya calls and records every draw in call order."""

    def __init__(self):
        self.draws = []

    def __enter__(self):
        self.saved = (torch.randn, torch.randn_like, torch.rand, torch.randint, random.random)
        o_randn, o_randn_like, o_rand, o_randint, o_random = self.saved

        def randn(*a, **k):
            x = o_randn(*a, **k); self.draws.append(("normal", x.clone())); return x

        def randn_like(*a, **k):
            x = o_randn_like(*a, **k); self.draws.append(("normal", x.clone())); return x

        def rand(*a, **k):
            x = o_rand(*a, **k); self.draws.append(("uniform", x.clone())); return x

        def randint(*a, **k):
            x = o_randint(*a, **k); self.draws.append(("timesteps", x.clone())); return x

        def rrandom():
            x = o_random(); self.draws.append(("uniform", torch.tensor([x], dtype=torch.float64))); return x

        torch.randn, torch.randn_like, torch.rand, torch.randint, random.random = randn, randn_like, rand, randint, rrandom
        return self

    def __exit__(self, *exc):
        torch.randn, torch.randn_like, torch.rand, torch.randint, random.random = self.saved


def main():
    out = {}
    meta = {"noise_cases": [], "loss_cases": []}
    torch.manual_seed(1234)
    random.seed(1234)

    # Schedules: alphas_cumprod as the scheduler holds it, and kohya's all_snr (computed before the zero terminal
    # SNR fix in get_noise_scheduler, so it is the same table for both).
    for zts in (False, True):
        s = get_noise_scheduler(make_args(zero_terminal_snr=zts))
        tag = "zts" if zts else "base"
        out[f"schedule.{tag}.alphas_cumprod"] = s.alphas_cumprod.float().contiguous()
        out[f"schedule.{tag}.all_snr"] = s.all_snr.float().contiguous()

    # Noise sampling: kohya's get_noise_noisy_latents_and_timesteps with recorded draws.
    # [2, 3, 10, 8]: non-square so that a height/width swap in the pyramid would show.
    latents = (torch.randn(2, 3, 10, 8) * 0.8 + torch.tensor([0.3, -0.6, 0.1]).view(1, 3, 1, 1)).contiguous()
    out["noise.latents"] = latents
    noise_cases = [
        dict(name="plain"),
        dict(name="offset", noise_offset=0.1),
        dict(name="offset_random_adaptive", noise_offset=0.05, noise_offset_random_strength=True, adaptive_noise_scale=0.02),
        dict(name="offset_adaptive_negative", noise_offset=0.01, adaptive_noise_scale=-0.5),
        dict(name="multires", multires_noise_iterations=6, multires_noise_discount=0.3),
        dict(name="multires_offset", noise_offset=0.1, multires_noise_iterations=3, multires_noise_discount=0.5),
        dict(name="ip", ip_noise_gamma=0.1),
        dict(name="ip_random_zts_range", ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True, zero_terminal_snr=True,
             min_timestep=200, max_timestep=800),
        dict(name="fixed_timestep", min_timestep=500, max_timestep=500, zero_terminal_snr=True),
    ]
    for case in noise_cases:
        name = case.pop("name")
        args = make_args(**case)
        s = get_noise_scheduler(args)
        with Recorder() as rec:
            noise, noisy, timesteps = get_noise_noisy_latents_and_timesteps(args, s, latents.clone())
        velocity = s.get_velocity(latents, noise, timesteps)
        # Normal draws are stored as tensors; uniform draws (fp32 from torch.rand, fp64 from random.random) and
        # timesteps go into the metadata JSON, where Python's float repr round-trips exactly.
        draws = []
        for k, (kind, x) in enumerate(rec.draws):
            if kind == "normal":
                out[f"noise.{name}.draw{k}"] = x.float().contiguous()
                draws.append({"kind": kind, "tensor": f"noise.{name}.draw{k}"})
            elif kind == "uniform":
                draws.append({"kind": kind, "value": float(x.item())})
            else:
                draws.append({"kind": kind, "values": [int(v) for v in x.tolist()]})
        out[f"noise.{name}.noise"] = noise.contiguous()
        out[f"noise.{name}.noisy"] = noisy.contiguous()
        out[f"noise.{name}.velocity"] = velocity.contiguous()
        cfg_timesteps = [int(v) for v in timesteps.tolist()]
        cfg = {k: v for k, v in case.items()}
        cfg["expected_timesteps"] = cfg_timesteps
        meta["noise_cases"].append({"name": name, "args": cfg, "draws": draws})

    # Loss: kohya's process_batch tail with torch autograd for dLoss/dPrediction.
    pred = torch.randn(3, 2, 4, 4)
    target = pred + torch.randn(3, 2, 4, 4) * torch.tensor([0.05, 0.5, 2.0]).view(3, 1, 1, 1)  # small to large errors
    target[0, 0, 0, 0] = pred[0, 0, 0, 0]  # an exact zero difference (l1's gradient there is 0)
    out["loss.prediction"] = pred.contiguous()
    out["loss.target"] = target.contiguous()
    timesteps = torch.tensor([0, 517, 999])
    loss_weights = torch.tensor([1.0, 0.5, 1.0])
    meta["loss_timesteps"] = [int(v) for v in timesteps.tolist()]
    out["loss.sample_weights"] = loss_weights

    loss_cases = []
    for loss_type in ("l2", "l1", "huber", "smooth_l1"):
        for v in (False, True):
            for gamma in (None, 1.5, 5.0):
                for debiased in (False, True):
                    loss_cases.append(dict(loss_type=loss_type, v_parameterization=v, min_snr_gamma=gamma,
                                           debiased_estimation_loss=debiased))
    for loss_type in ("huber", "smooth_l1"):
        for schedule in ("constant", "exponential"):
            loss_cases.append(dict(loss_type=loss_type, huber_schedule=schedule, huber_c=0.2, huber_scale=1.5))
        loss_cases.append(dict(loss_type=loss_type, huber_schedule="snr", huber_c=0.3, huber_scale=1.5,
                               zero_terminal_snr=True, min_snr_gamma=5.0))
    loss_cases.append(dict(v_parameterization=True, scale_v_pred_loss_like_noise_pred=True))
    loss_cases.append(dict(v_parameterization=True, scale_v_pred_loss_like_noise_pred=True, min_snr_gamma=5.0))
    loss_cases.append(dict(v_pred_like_loss=0.3))
    loss_cases.append(dict(v_pred_like_loss=0.3, min_snr_gamma=1.5, debiased_estimation_loss=True))
    loss_cases.append(dict(zero_terminal_snr=True, v_parameterization=True, min_snr_gamma=5.0, debiased_estimation_loss=True))

    for i, case in enumerate(loss_cases):
        args = make_args(**case)
        s = get_noise_scheduler(args)
        p = pred.clone().requires_grad_(True)
        loss, per_sample = process_batch_loss(args, s, p, target, timesteps, loss_weights)
        loss.backward()
        out[f"loss.{i}.loss"] = loss.detach().reshape(1)
        out[f"loss.{i}.per_sample"] = per_sample.detach().contiguous()
        out[f"loss.{i}.gradient"] = p.grad.contiguous()
        meta["loss_cases"].append(case)

    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "diffusion.safetensors")
    save_file(out, path, metadata={"cases": json.dumps(meta)})
    print(f"wrote {path}: {len(out)} tensors, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
