"""The training objective: the denoising MSE (Ho et al. 2020, Eq. 14), as GLIDE/unCLIP and Composer.

What the network predicts (``prediction``, saved as the pipeline scheduler's ``prediction_type``):

- ``"epsilon"``: the noise, as Composer. The x0 it implies at high noise divides the error by
  √ᾱ_t, so the colours decided in the first sampling steps come out shifted until long training.
- ``"v_prediction"``: v = √ᾱ_t ε − √(1−ᾱ_t) x0 (Salimans & Ho 2022, §4): a direct x0 estimate at
  high noise and an ε estimate at low noise, the better-conditioned target for short runs.

How rows are weighted (``weighting``), with SNR = ᾱ_t / (1 − ᾱ_t):

- ``"eps"``: none (the plain MSE of the chosen target).
- ``"v"``: ``min((SNR + 1) / SNR, max_weight)`` on the ε-MSE: the v objective's weighting of the x0
  error, for an ε model (more weight at high noise, where an image's colours and layout are set).
- ``"min_snr"``: Min-SNR-γ (Hang et al. 2023, arXiv 2303.09556): the x0-error weight clipped at
  γ = ``min_snr_gamma``, i.e. ``min(SNR, γ) / SNR`` for ε and ``min(SNR, γ) / (SNR + 1)`` for v;
  low-noise steps no longer dominate the gradient, which converges several times faster.

An upsampler (``upsample_factor`` > 1) learns from the same images: ``noise_low_res`` derives its
low-resolution input from x0 and applies Imagen's noise-conditioning augmentation (Saharia et al.
2022, §2.5): a random level of the same forward process, given to the network, so that at
sampling time it tolerates the base model's artefacts (a chosen level, ``low_res_level``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import SchedulerMixin

from models.composer import ComposerModel
from models.conditioning import Conditions

PREDICTIONS = ("epsilon", "v_prediction")
WEIGHTINGS = ("eps", "v", "min_snr")


def diffusion_loss(
    model: ComposerModel,
    scheduler: SchedulerMixin,
    x0: torch.Tensor,
    conditions: Conditions,
    presence: torch.Tensor,
    generator: torch.Generator | None = None,
    reduction: Literal["mean", "none"] = "mean",
    weighting: Literal["eps", "v", "min_snr"] = "eps",
    max_weight: float = 20.0,
    min_snr_gamma: float = 5.0,
    timesteps: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Mean squared error of the model's prediction for x0 (B, C, S, S) at uniformly drawn timesteps
    (from ``timesteps`` = [lo, hi) only when given: an expert denoiser of that noise range, eDiffi).

    ``scheduler`` supplies the noise schedule (``add_noise``) and the target (its
    ``prediction_type``, module doc); the pipeline saves the same scheduler. Randomness is drawn on
    the CPU from ``generator`` so a seeded run is reproducible anywhere. ``reduction="none"`` gives
    the (B,) per-row losses (training logs them per condition subset).
    """
    prediction = scheduler.config.prediction_type
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction_type must be one of {PREDICTIONS}, got {prediction!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    b = x0.shape[0]
    lo, hi = timesteps if timesteps is not None else (0, scheduler.config.num_train_timesteps)
    if not 0 <= lo < hi <= scheduler.config.num_train_timesteps:
        raise ValueError(f"timesteps [{lo}, {hi}) are not inside [0, {scheduler.config.num_train_timesteps})")
    t = torch.randint(lo, hi, (b,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    t = t.to(x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    out = model(x_t, t, conditions=conditions, presence=presence)
    target = noise if prediction == "epsilon" else scheduler.get_velocity(x0, noise, t)
    per_row = (out.float() - target.float()).pow(2).flatten(1).mean(1)
    if weighting != "eps":
        alpha_bar = scheduler.alphas_cumprod.to(per_row.device)[t].float().clamp(1e-12, 1 - 1e-7)
        snr = alpha_bar / (1 - alpha_bar)
        if weighting == "v":
            per_row = per_row * ((snr + 1) / snr).clamp(max=max_weight)
        else:
            clipped = snr.clamp(max=min_snr_gamma)
            per_row = per_row * (clipped / snr if prediction == "epsilon" else clipped / (snr + 1))
    return per_row.mean() if reduction == "mean" else per_row


def downsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, S, S) in [-1, 1] -> (B, C, S/f, S/f): antialiased bicubic, as an image resize."""
    side = images.shape[-1] // factor
    out = F.interpolate(
        images.float(), size=(side, side), mode="bicubic", align_corners=False, antialias=True
    )
    return out.clamp(-1, 1).to(images.dtype)


def noise_low_res(
    scheduler: SchedulerMixin,
    x0: torch.Tensor,
    factor: int,
    max_level: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An upsampler's training input: x0 downsampled by ``factor``, then noised to a level drawn
    uniformly from 0..``max_level`` (timesteps of ``scheduler``'s forward process; 0 leaves it
    clean, exactly). Returns ``(low_res, level)``, (B, C, S/f, S/f) and (B,) int64."""
    if not 0 <= max_level < scheduler.config.num_train_timesteps:
        raise ValueError(
            f"max_level must be in [0, {scheduler.config.num_train_timesteps - 1}], got {max_level}"
        )
    level = torch.randint(0, max_level + 1, (x0.shape[0],), generator=generator)
    return noise_to_level(scheduler, downsample(x0, factor), level, generator), level.to(x0.device)


def noise_to_level(
    scheduler: SchedulerMixin,
    low: torch.Tensor,
    level: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``low`` (B, C, h, w) through ``scheduler``'s forward process to timesteps ``level`` (B,);
    rows at level 0 are returned unchanged. Noise drawn on the CPU from ``generator``."""
    b = low.shape[0]
    noise = torch.randn(low.shape, generator=generator, dtype=torch.float32).to(low.device, low.dtype)
    level = level.to(low.device)
    noised = scheduler.add_noise(low, noise, level)
    return torch.where((level > 0).view(b, 1, 1, 1), noised, low)


def residual_target(model, x0: torch.Tensor) -> torch.Tensor:
    """A residual upsampler's x_0 (``upsample_residual``): the image minus the bicubic upsampling
    of its clean low-resolution version; x0 itself for any other model."""
    cfg = model.config
    if not getattr(cfg, "upsample_residual", False):
        return x0
    return x0 - model.residual_base(downsample(x0, cfg.upsample_factor))
