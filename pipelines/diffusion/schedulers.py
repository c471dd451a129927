"""The noise schedule models are trained with, and the samplers that run it backwards.

``default_scheduler`` is saved with every pipeline; ``sampler`` derives the scheduler one
generation runs with from it: DDIM (η = 0) or DPM-Solver++ (2M), with x_0 clipped, dynamically
thresholded (Imagen) or left alone.
"""

from __future__ import annotations

from typing import Any, Literal

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, SchedulerMixin

SchedulerName = Literal["ddim", "dpm++"]
Spacing = Literal["leading", "trailing"]
Threshold = Literal["none", "clip", "dynamic"]
SCHEDULERS = ("ddim", "dpm++")
THRESHOLDS = ("none", "clip", "dynamic")


def default_scheduler(prediction_type: str = "epsilon", spacing: Spacing = "leading") -> DDIMScheduler:
    """The noise schedule models are trained with and the default sampler (DDIM, η = 0);
    ``prediction_type``: what the model predicts, "epsilon" or "v_prediction" (models/objective.py).

    ``spacing``: which timesteps n sampling steps visit. "leading" (DDIM's): 1 + k·T/n, so the
    first step is at T − T/n + 1 (951 of 1000 at 20 steps) and a single step is at t = 1, from
    pure noise. "trailing": T − 1 − k·T/n, so the first step always starts from pure noise at
    t = T − 1 (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed",
    Table 2). An edit that inverts (``sampling.invert``) always runs the leading ones (``sampler``)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",  # the cosine schedule of improved DDPM, as GLIDE/unCLIP
        prediction_type=prediction_type,
        clip_sample=True,
        set_alpha_to_one=True,
        steps_offset=1,
        timestep_spacing=spacing,
    )


def sampler(
    config: Any, name: SchedulerName, threshold: Threshold, latent: bool, inverting: bool = False
) -> SchedulerMixin:
    """The scheduler ``name`` over the noise schedule ``config`` (a saved scheduler's config) with
    x_0 ``threshold``; ``latent``: the model samples a VAE's latents, which are never thresholded;
    ``inverting``: the generation first inverts its source with DDIM (bidirectional guidance)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
    if threshold not in THRESHOLDS:
        raise ValueError(f"unknown threshold {threshold!r}; known: {', '.join(THRESHOLDS)}")
    if threshold != "none" and latent:
        raise ValueError("x_0 clipping and dynamic thresholding apply to pixel-space models only")
    if inverting and config.get("timestep_spacing", "leading") != "leading":
        # DDIM inversion up to t = T - 1 (trailing spacing) cannot be undone: √ᾱ is ~0.0016 there
        # on the cosine schedule, so the first sampling step's x_0 estimate magnifies every error
        # ~600x. An edit that inverts runs DDIM's leading timesteps both ways.
        config = {**config, "timestep_spacing": "leading"}
    # Imagen's dynamic thresholding (Saharia et al. 2022, §2.3) at its 99.5th percentile,
    # with DeepFloyd IF's cap on the threshold; "clip" is the same with the cap at 1.
    options = {
        "none": dict(clip_sample=False, thresholding=False),
        "clip": dict(clip_sample=True, thresholding=False),
        "dynamic": dict(
            clip_sample=False, thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=1.5
        ),
    }[threshold]
    if name == "ddim":
        return DDIMScheduler.from_config(config, **options)
    if threshold == "clip":  # DPM-Solver has no clip_sample: thresholding capped at 1 is clipping
        options = dict(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
    options.pop("clip_sample", None)
    return DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2, **options
    )
