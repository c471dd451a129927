"""The sampling loops: plain functions over a ComposerModel, a diffusers scheduler and a Guidance.

    denoise(model, scheduler, x_T, encoded, guidance, steps, ...) -> x_0
    invert(model, scheduler, x_0, encoded, guidance, steps, ...)  -> x_T

``encoded`` holds every guidance branch's conditions (``len(guidance.branch_sets())`` × B rows),
so each step is one batched UNet forward whatever the number of condition sets (Composer Eq. 2);
with a guidance schedule a step takes only the branches its targets need then (``Guidance.at``).
``model`` is a ``ComposerModel`` or an ``ExpertEnsemble`` (the expert of each step's timestep).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, SchedulerMixin

from models import ComposerModel, EncodedConditions
from pipelines.diffusion.guidance import Guidance

Progress = Callable[[Iterable], Iterable]


def guided_noise(
    model: ComposerModel,
    x: torch.Tensor,
    t: torch.Tensor,
    encoded: EncodedConditions,
    guidance: Guidance,
    step: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """ε̂(x_t) of Composer Eq. 2 for x (B, C, S, S) at ``step`` = (i, n) of the sampling order:
    the branches that step needs in one forward pass."""
    now, branches = guidance.at(*step)
    if branches is not None:
        b = x.shape[0]
        rows = torch.cat([torch.arange(j * b, (j + 1) * b) for j in branches]).to(x.device)
        encoded = encoded.select(rows)
    k = len(now.sets())
    eps = model(x.repeat(k, 1, 1, 1), t, encoded=encoded)
    return now.combine(eps)


def denoise(
    model: ComposerModel,
    scheduler: SchedulerMixin,
    x: torch.Tensor,
    encoded: EncodedConditions,
    guidance: Guidance,
    num_inference_steps: int,
    known: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    progress: Progress = iter,
) -> torch.Tensor:
    """x_T -> x_0 with ``scheduler`` (DDIM, DPM-Solver++, ...; its state is reset here).

    ``known`` = (x_0 of the source, mask (B, 1, S, S) with 1 = regenerate, noise): outside the
    mask x_t is replaced after every step by the source noised to the next step's level, so the
    generated region is denoised in the context of the kept one (RePaint-style blending). The
    exact copy of the kept pixels happens after decoding, in the pipeline.
    """
    scheduler.set_timesteps(num_inference_steps, device=x.device)
    timesteps = scheduler.timesteps
    n = len(timesteps)
    for i, t in enumerate(progress(timesteps)):
        eps = guided_noise(model, scheduler.scale_model_input(x, t), t, encoded, guidance, (i, n))
        x = scheduler.step(eps, t, x, return_dict=False)[0]
        if known is not None:
            source, mask, noise = known
            if i + 1 < len(timesteps):
                source = scheduler.add_noise(source, noise, timesteps[i + 1 : i + 2])
            x = mask * x + (1 - mask) * source
    return x


def invert(
    model: ComposerModel,
    scheduler: DDIMScheduler,
    x: torch.Tensor,
    encoded: EncodedConditions,
    guidance: Guidance,
    num_inference_steps: int,
    progress: Progress = iter,
) -> torch.Tensor:
    """x_0 -> x_T by DDIM inversion (Song et al. 2021, Eq. 13 run backwards) under ``encoded``.

    The first half of Composer's bidirectional guidance (§3.2): invert the source under c1, then
    ``denoise`` under c2. No x_0 clipping here, so the inversion is as reversible as DDIM allows.
    """
    if not isinstance(scheduler, DDIMScheduler):
        raise ValueError(f"DDIM inversion needs a DDIMScheduler, got {type(scheduler).__name__}")
    known = inspect.signature(DDIMInverseScheduler.__init__).parameters
    config = {
        k: v for k, v in scheduler.config.items() if k in known
    }  # DDIM's thresholding etc. do not apply
    inverse = DDIMInverseScheduler.from_config({**config, "clip_sample": False})
    inverse.set_timesteps(num_inference_steps, device=x.device)
    n = len(inverse.timesteps)
    for j, t in enumerate(progress(inverse.timesteps)):  # a schedule's windows in sampling order
        eps = guided_noise(model, x, t, encoded, guidance, (n - 1 - j, n))
        x = inverse.step(eps, t, x, return_dict=False)[0]
    return x
