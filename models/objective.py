"""The training objective: ε-prediction MSE (Ho et al. 2020, Eq. 14), as GLIDE/unCLIP and Composer."""

from __future__ import annotations

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
) -> torch.Tensor:
    """Mean squared error of the predicted noise for x0 (B, C, S, S) at uniformly drawn timesteps.

    ``scheduler`` supplies the noise schedule (``add_noise``; the pipeline's DDIM scheduler).
    Randomness is drawn on the CPU from ``generator`` so a seeded run is reproducible anywhere.
    """
    b = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    t = t.to(x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    eps = model(x_t, t, conditions=conditions, presence=presence)
    return torch.nn.functional.mse_loss(eps.float(), noise.float())
