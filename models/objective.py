"""The training objective: ε-prediction MSE (Ho et al. 2020, Eq. 14), as GLIDE/unCLIP and Composer."""

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
) -> torch.Tensor:
    """Mean squared error of the predicted noise for x0 (B, C, S, S) at uniformly drawn timesteps.

    ``scheduler`` supplies the noise schedule (``add_noise``; the pipeline's DDIM scheduler).
    Randomness is drawn on the CPU from ``generator`` so a seeded run is reproducible anywhere.
    ``reduction="none"`` gives the (B,) per-row losses (training logs them per condition subset).
    """
    b = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    t = t.to(x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    eps = model(x_t, t, conditions=conditions, presence=presence)
    per_row = (eps.float() - noise.float()).pow(2).flatten(1).mean(1)
    return per_row.mean() if reduction == "mean" else per_row
