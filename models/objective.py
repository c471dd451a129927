"""The training objective: ε-prediction MSE (Ho et al. 2020, Eq. 14), as GLIDE/unCLIP and Composer.

``weighting="v"`` weights each row's ε-MSE by ``(SNR + 1) / SNR = 1 / ᾱ_t``, which is the
v-prediction objective's weighting of the x0 error (Salimans & Ho 2022, §4: x0 error weighted by
``SNR + 1`` instead of ε's ``SNR``), capped at ``max_weight`` because ᾱ_t goes to ~0 at the last
steps. Plain ε-MSE gives the x0 error at high noise almost no weight, which is where an image's
global content (its colours, what the palette and caption say) is decided; the model and
sampler stay ε-prediction.
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers import SchedulerMixin

from models.composer import ComposerModel
from models.conditioning import Conditions


def diffusion_loss(
    model: ComposerModel,
    scheduler: SchedulerMixin,
    x0: torch.Tensor,
    conditions: Conditions,
    presence: torch.Tensor,
    generator: torch.Generator | None = None,
    reduction: Literal["mean", "none"] = "mean",
    weighting: Literal["eps", "v"] = "eps",
    max_weight: float = 20.0,
) -> torch.Tensor:
    """Mean squared error of the predicted noise for x0 (B, C, S, S) at uniformly drawn timesteps.

    ``scheduler`` supplies the noise schedule (``add_noise``; the pipeline's DDIM scheduler).
    Randomness is drawn on the CPU from ``generator`` so a seeded run is reproducible anywhere.
    ``reduction="none"`` gives the (B,) per-row losses (training logs them per condition subset).
    ``weighting``: "eps" (plain) or "v" (rows weighted by ``min(1 / ᾱ_t, max_weight)``, module doc).
    """
    if weighting not in ("eps", "v"):
        raise ValueError(f"weighting must be 'eps' or 'v', got {weighting!r}")
    b = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    t = t.to(x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    eps = model(x_t, t, conditions=conditions, presence=presence)
    per_row = (eps.float() - noise.float()).pow(2).flatten(1).mean(1)
    if weighting == "v":
        alpha_bar = scheduler.alphas_cumprod.to(per_row.device)[t].float()
        per_row = per_row * (1.0 / alpha_bar.clamp(min=1e-12)).clamp(max=max_weight)
    return per_row.mean() if reduction == "mean" else per_row
