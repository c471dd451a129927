"""``ComposerPipeline``: generation and editing from any set of conditions (Composer §3.2).

A diffusers ``DiffusionPipeline`` with three components — ``unet`` (a ``ComposerModel``),
``scheduler`` and an optional ``vae`` for latent-space models — plus the decomposition settings
the model was trained with (``decompose``: extractor sections of the decomposition config), so a
condition "from an image" is extracted exactly as in the training shards. Weights are saved and
loaded as safetensors only; nothing is ever unpickled.

Conditions are given for one image, as the decomposition job stores them (no batch axis), e.g.
``{"text": "a red circle", "palette": (156,) float, "sketch": (R, R) uint8}``; see
``pipelines/model_inputs.py`` for every key. They are shared by the ``num_images`` samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from models import ComposerModel
from pipelines.guidance import Guidance
from pipelines.model_inputs import image_to_tensor, tensor_to_image, to_conditions
from pipelines.sampling import denoise, invert

SchedulerName = Literal["ddim", "dpm++"]
Threshold = Literal["none", "clip", "dynamic"]
SCHEDULERS = ("ddim", "dpm++")
THRESHOLDS = ("none", "clip", "dynamic")

# Which input keys make a condition "given" (model_inputs.py documents the keys).
_KEYS = {
    "caption": ("text", "caption.clip_sentence", "caption.t5_sentence"),
    "semantics": ("semantics", "semantics.image"),
    "palette": ("palette",),
    "sketch": ("sketch",),
    "instances": ("instances",),
    "depth": ("depth",),
    "intensity": ("intensity",),
    "mask": ("mask",),
}


def default_scheduler() -> DDIMScheduler:
    """The noise schedule models are trained with and the default sampler (DDIM, η = 0)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",  # the cosine schedule of improved DDPM, as GLIDE/unCLIP
        prediction_type="epsilon",
        clip_sample=True,
        set_alpha_to_one=True,
        steps_offset=1,
        timestep_spacing="leading",  # pairs exactly with DDIMInverseScheduler for inversion
    )


def given_conditions(conditions: Mapping[str, Any]) -> frozenset[str]:
    """The condition names that ``conditions`` (model-input keys) provides."""
    return frozenset(name for name, keys in _KEYS.items() if any(k in conditions for k in keys))


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """``module`` in eval mode for the block, then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@dataclass
class ComposerOutput(BaseOutput):
    images: np.ndarray | list  # (N, R, R, 3) uint8, or a list of PIL images
    guidance: dict  # Guidance.describe(): c1, targets, branches
    threshold: str  # the x_0 thresholding used (the default resolved)
    invert_guidance: dict | None = None  # bidirectional: the inversion's Guidance.describe()


class ComposerPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        unet: ComposerModel,
        scheduler: DDIMScheduler,
        vae: AutoencoderKL | None = None,
        decompose: dict | None = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self.register_to_config(decompose=dict(decompose or {}))
        if vae is not None and unet.config.image_channels != vae.config.latent_channels:
            raise ValueError(
                f"the model takes {unet.config.image_channels} channels, the VAE makes {vae.config.latent_channels}"
            )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs: Any) -> ComposerPipeline:
        """Loads a saved pipeline; safetensors only (``use_safetensors=False`` is refused)."""
        if kwargs.setdefault("use_safetensors", True) is not True:
            raise ValueError(
                "ComposerPipeline loads safetensors weights only; pickled weights are never loaded"
            )
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        if kwargs.setdefault("safe_serialization", True) is not True:
            raise ValueError("ComposerPipeline saves safetensors weights only")
        super().save_pretrained(save_directory, **kwargs)

    # -- pixels <-> model space ---------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.unet.image_size

    def _encode_images(self, images: np.ndarray) -> torch.Tensor:
        """(B, R, R, 3) uint8 -> x_0 in model space (pixels in [-1, 1], or scaled latents)."""
        x = image_to_tensor(images).to(self.unet.device, self.unet.dtype)
        if self.vae is None:
            return x
        x = x.to(self.vae.dtype)
        latents = self.vae.encode(x).latent_dist.mode()
        return (latents * self.vae.config.scaling_factor).to(self.unet.dtype)

    def _decode(self, x: torch.Tensor) -> np.ndarray:
        if self.vae is not None:
            x = self.vae.decode(x.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return tensor_to_image(x)

    def _scheduler(self, name: SchedulerName, threshold: Threshold):
        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(SCHEDULERS)}")
        if threshold not in THRESHOLDS:
            raise ValueError(f"unknown threshold {threshold!r}; known: {', '.join(THRESHOLDS)}")
        if threshold != "none" and self.vae is not None:
            raise ValueError("x_0 clipping and dynamic thresholding apply to pixel-space models only")
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
            return DDIMScheduler.from_config(self.scheduler.config, **options)
        if threshold == "clip":  # DPM-Solver has no clip_sample: thresholding capped at 1 is clipping
            options = dict(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
        options.pop("clip_sample", None)
        return DPMSolverMultistepScheduler.from_config(
            self.scheduler.config, algorithm_type="dpmsolver++", solver_order=2, **options
        )

    # -- conditions ---------------------------------------------------------------------------
    def _rows(self, conditions: Mapping[str, Any], n: int) -> dict[str, Any]:
        """One image's conditions -> the same for ``n`` rows (a leading batch axis)."""
        unknown = (
            set(conditions)
            - {k for keys in _KEYS.values() for k in keys}
            - {
                "mask.image",
                "caption.clip_tokens",
                "caption.t5_tokens",
            }
        )
        if unknown:
            raise ValueError(f"unknown condition inputs {sorted(unknown)}; see pipelines/model_inputs.py")
        rows: dict[str, Any] = {}
        for key, value in conditions.items():
            if key == "text":
                rows[key] = [str(value)] * n
            else:
                a = np.asarray(value)
                rows[key] = np.repeat(a[None], n, axis=0)
        return rows

    def _check_maps(self, conditions: Mapping[str, Any]) -> None:
        r = self.image_size
        for key in ("sketch", "instances", "depth", "intensity", "mask", "mask.image", "semantics.image"):
            if key in conditions and np.asarray(conditions[key]).shape[:2] != (r, r):
                raise ValueError(
                    f"{key} is {np.asarray(conditions[key]).shape}, the model takes {r}×{r} maps"
                )

    def encode_conditions(self, conditions: Mapping[str, Any], guidance: Guidance, n: int):
        """Every guidance branch's conditions for ``n`` samples, encoded once for all steps."""
        self._check_maps(conditions)
        rows = self._rows(conditions, n)
        k = len(guidance.sets())
        conds = to_conditions(self.unet, rows).repeat(k)
        return self.unet.encode(conds, guidance.presence(n, self.unet.device))

    def _guidance(self, guidance: Guidance | float | str, given: frozenset[str]) -> Guidance:
        if isinstance(guidance, Guidance):
            used = guidance.base.union(*(s for s, _ in guidance.terms))
            if not used <= given:
                raise ValueError(f"guidance uses {sorted(used - given)}, which the conditions do not give")
            return guidance
        return Guidance.parse(guidance, given)

    # -- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        conditions: Mapping[str, Any] | None = None,
        guidance: Guidance | float | str = 3.0,
        num_inference_steps: int = 50,
        num_images: int = 1,
        seed: int | None = 0,
        generator: torch.Generator | None = None,
        source: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        invert_conditions: Mapping[str, Any] | None = None,
        invert_guidance: Guidance | float | str = 1.0,
        scheduler: SchedulerName = "ddim",
        threshold: Threshold | None = None,
        output_type: Literal["np", "pil"] = "np",
    ) -> ComposerOutput:
        """Samples ``num_images`` images of R×R pixels.

        - ``conditions``: one image's conditions (module docstring); any subset.
        - ``guidance``: a ``Guidance``, or its text form / a number (``pipelines/guidance.py``).
        - ``source`` (R, R, 3) uint8 with ``mask`` (R, R) {0, 1}, 1 = regenerate: region-restricted
          editing — pixels where mask = 0 are the source's, bit for bit; the masked source is
          also given to the model as the ``mask`` condition.
        - ``source`` with ``invert_conditions``: bidirectional guidance (Composer §3.2) — DDIM
          inversion of the source under ``invert_conditions`` (c1) with ``invert_guidance``,
          then sampling under ``conditions`` (c2) from the inverted noise.
        - ``threshold``: x_0 "clip" | "dynamic" (Imagen) | "none"; default "clip" in pixel space
          and "none" for latent models and for inversion, which clipping would make irreversible.
        - ``seed`` (or ``generator``): same seed, same images.
        """
        conditions = dict(conditions or {})
        with eval_mode(self.unet):  # sampling is in eval mode whatever the caller's model mode
            if num_images < 1 or num_inference_steps < 1:
                raise ValueError("num_images and num_inference_steps must be >= 1")
            if mask is not None:
                if source is None:
                    raise ValueError("a mask needs the source image it applies to")
                mask = (np.asarray(mask) > 0).astype(np.uint8)
                conditions["mask"], conditions["mask.image"] = mask, np.asarray(source, np.uint8)
            if invert_conditions is not None and source is None:
                raise ValueError(
                    "bidirectional guidance (invert_conditions) needs the source image to invert"
                )
            if source is not None and np.asarray(source).shape != (self.image_size, self.image_size, 3):
                raise ValueError(
                    f"source is {np.asarray(source).shape}, expected ({self.image_size}, {self.image_size}, 3)"
                )
            given = given_conditions(conditions)
            guide = self._guidance(guidance, given)
            if threshold is None:
                threshold = "none" if (self.vae is not None or invert_conditions is not None) else "clip"
            sched = self._scheduler(scheduler, threshold)
            if generator is None:
                generator = torch.Generator("cpu").manual_seed(0 if seed is None else seed)
            device, dtype = self.unet.device, self.unet.dtype
            c, s = self.unet.config.image_channels, self.unet.config.sample_size
            noise = randn_tensor(
                (num_images, c, s, s), generator=generator, device=torch.device("cpu"), dtype=torch.float32
            )
            x = noise.to(device, dtype)
            encoded = self.encode_conditions(conditions, guide, num_images)
            known, inv_guide = None, None
            if source is not None:
                # Encoded (through the VAE, if any) once, then shared by the samples.
                x0 = self._encode_images(np.asarray(source, np.uint8)[None]).repeat(num_images, 1, 1, 1)
            if invert_conditions is not None:
                if scheduler != "ddim":
                    raise ValueError("bidirectional guidance inverts with DDIM; use scheduler='ddim'")
                inv_guide = self._guidance(invert_guidance, given_conditions(invert_conditions))
                inv_encoded = self.encode_conditions(invert_conditions, inv_guide, num_images)
                x = invert(
                    self.unet, sched, x0, inv_encoded, inv_guide, num_inference_steps, self.progress_bar
                )
            if mask is not None:
                m = torch.from_numpy(mask).float()[None, None].to(device, dtype).repeat(num_images, 1, 1, 1)
                f = self.unet.config.local_downsample
                m = (
                    torch.nn.functional.max_pool2d(m, f) if f > 1 else m
                )  # a latent is regenerated if any of its pixels is
                known_noise = randn_tensor(
                    x0.shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32
                )
                known = (x0, m, known_noise.to(device, dtype))
            x = denoise(self.unet, sched, x, encoded, guide, num_inference_steps, known, self.progress_bar)
            images = self._decode(x)
            if mask is not None:
                # Region-restricted editing: outside the mask the output *is* the source.
                images = np.where(
                    mask[None, :, :, None].astype(bool), images, np.asarray(source, np.uint8)[None]
                )
            if output_type == "pil":
                from PIL import Image

                images = [Image.fromarray(im) for im in images]
            return ComposerOutput(
                images=images,
                guidance=guide.describe(),
                threshold=threshold,
                invert_guidance=None if inv_guide is None else inv_guide.describe(),
            )


__all__ = ["ComposerOutput", "ComposerPipeline", "default_scheduler", "given_conditions"]
