"""``ComposerPipeline``: generation and editing from any set of conditions (Composer §3.2).

A diffusers ``DiffusionPipeline`` with three components — ``unet`` (a ``ComposerModel``),
``scheduler`` and an optional ``vae`` for latent-space models — plus the decomposition settings
the model was trained with (``decompose``: extractor sections of the decomposition config), so a
condition "from an image" is extracted exactly as in the training shards. Weights are saved and
loaded as safetensors only; nothing is ever unpickled.

Conditions are given for one image, as the decomposition job stores them (no batch axis), e.g.
``{"text": "a red circle", "palette": (156,) float, "sketch": (R, R) uint8}``; see
``pipelines/diffusion/inputs.py`` for every key. They are shared by the ``num_images`` samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from models import ComposerModel
from pipelines.conditions.backbone import encode_text
from pipelines.diffusion.guidance import Guidance
from pipelines.diffusion.inputs import image_to_tensor, tensor_to_image, to_conditions
from pipelines.diffusion.paint import PaintedDenoiser, PaintError, PhraseTokens, painted, painting
from pipelines.diffusion.requests import Batch, PreparedRequest, SampleRequest
from pipelines.diffusion.sampling import denoise, invert
from pipelines.diffusion.schedulers import (
    SchedulerName,
    Threshold,
    sampler,
)

# Which input keys make a condition "given" (model_inputs.py documents the keys).
_KEYS = {
    "caption": ("text", "caption.clip_sentence", "caption.t5_sentence", "caption.base_sentence"),
    "semantics": ("semantics", "semantics.image"),
    "palette": ("palette",),
    "sketch": ("sketch",),
    "instances": ("instances",),
    "depth": ("depth",),
    "intensity": ("intensity",),
    "mask": ("mask",),
}


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
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]

    def __init__(
        self,
        unet: ComposerModel,
        scheduler: DDIMScheduler,
        vae: AutoencoderKL | None = None,
        decompose: dict | None = None,
        text_encoder: Any = None,
        tokenizer: Any = None,
    ):
        super().__init__()
        self.register_modules(
            unet=unet, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer
        )
        self.register_to_config(decompose=dict(decompose or {}))
        # eDiffi's experts (pipelines/diffusion/ensemble.py): set by load_pipeline for an ensemble
        # directory, None for one model (an ensemble of one)
        self.ensemble: Any = None
        if vae is not None and unet.config.image_channels != vae.config.latent_channels:
            raise ValueError(
                f"the model takes {unet.config.image_channels} channels, the VAE makes {vae.config.latent_channels}"
            )
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("a text encoder comes with its tokenizer: give both or neither")
        if text_encoder is not None and unet.config.caption_encoder != "base":
            raise ValueError(
                f"a text encoder is for models on a pretrained base; this model's captions are "
                f"{unet.config.caption_encoder}"
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
        if self.ensemble is not None:
            raise ValueError(
                "this pipeline is an ensemble of experts; copy its directory, or assemble one "
                "with `recompose ensemble`"
            )
        if kwargs.setdefault("safe_serialization", True) is not True:
            raise ValueError("ComposerPipeline saves safetensors weights only")
        super().save_pretrained(save_directory, **kwargs)

    def phrase_tokens(self, caption: str, phrase: str) -> list[int]:
        """Where ``phrase`` is among the cross-attention tokens of ``caption`` (paint-with-words);
        ``PaintError`` when it is not there."""
        if getattr(self, "_phrases", None) is None:
            self._phrases = PhraseTokens(self)
        positions = self._phrases(caption, phrase)
        length = self.unet.conditioner.null_caption.shape[0]
        if max(positions) >= length:
            raise PaintError(f"paint phrase {phrase!r} lies past the {length} caption tokens the model reads")
        return positions

    @property
    def denoiser(self) -> Any:
        """What each sampling step calls: the expert ensemble, or the one UNet."""
        return self.unet if self.ensemble is None else self.ensemble

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

    def _encode_text(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Captions -> the base text encoder's ``caption.base_*`` inputs (as the decomposition
        stores them: float16), for models on a pretrained base."""
        if self.text_encoder is None:
            raise ValueError(
                "this model takes the base text encoder's caption embeddings and the pipeline has no "
                "text encoder; give caption.base_sentence and caption.base_tokens"
            )
        unique = list(dict.fromkeys(texts))
        states, pooled = encode_text(self.tokenizer, self.text_encoder, unique)
        index = [unique.index(t) for t in texts]
        # float16 as stored in the shards, so a caption given as text and the same caption's
        # stored embeddings give the same samples
        tokens = states.float().cpu().numpy().astype(np.float16)[index]
        sentence = pooled.float().cpu().numpy().astype(np.float16)[index]
        return {"caption.base_tokens": tokens, "caption.base_sentence": sentence}

    def _scheduler(
        self, name: SchedulerName, threshold: Threshold, inverting: bool = False
    ) -> SchedulerMixin:
        return sampler(
            self.scheduler.config, name, threshold, latent=self.vae is not None, inverting=inverting
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
                "caption.base_tokens",
                "low_res",
                "low_res.level",
            }
        )
        if unknown:
            raise ValueError(f"unknown condition inputs {sorted(unknown)}; see pipelines/diffusion/inputs.py")
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
        f = self.unet.config.upsample_factor
        if f == 1:
            if "low_res" in conditions or "low_res.level" in conditions:
                raise ValueError("low_res is an upsampler's input; this model is not an upsampler")
            return
        if "low_res" not in conditions:
            raise ValueError(
                f"this model upsamples ×{f}: give the image to upsample as low_res ({r // f}×{r // f})"
            )
        if np.asarray(conditions["low_res"]).shape != (r // f, r // f, 3):
            raise ValueError(
                f"low_res is {np.asarray(conditions['low_res']).shape}, this upsampler takes ({r // f}, {r // f}, 3)"
            )
        level = int(conditions.get("low_res.level", 0))
        if not 0 <= level < self.scheduler.config.num_train_timesteps:
            raise ValueError(
                f"low_res.level must be in [0, {self.scheduler.config.num_train_timesteps - 1}], got {level}"
            )

    def encode_conditions(self, conditions: Mapping[str, Any], guidance: Guidance, n: int):
        """Every guidance branch's conditions for ``n`` samples, encoded once for all steps."""
        self._check_maps(conditions)
        return self._encode_rows([conditions], [n], guidance)

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
        paint: Mapping[str, np.ndarray] | None = None,
        paint_weight: float = 1.0,
    ) -> ComposerOutput:
        """Samples ``num_images`` images of R×R pixels.

        - ``conditions``: one image's conditions (module docstring); any subset.
        - ``guidance``: a ``Guidance``, or its text form / a number (``pipelines/diffusion/guidance.py``).
        - ``source`` (R, R, 3) uint8 with ``mask`` (R, R) {0, 1}, 1 = regenerate: region-restricted
          editing — pixels where mask = 0 are the source's, bit for bit; the masked source is
          also given to the model as the ``mask`` condition.
        - ``source`` with ``invert_conditions``: bidirectional guidance (Composer §3.2) — DDIM
          inversion of the source under ``invert_conditions`` (c1) with ``invert_guidance``,
          then sampling under ``conditions`` (c2) from the inverted noise.
        - ``threshold``: x_0 "clip" | "dynamic" (Imagen) | "none"; default "clip" in pixel space
          and "none" for latent models and for inversion, which clipping would make irreversible.
        - ``seed`` (or ``generator``): same seed, same images.
        - ``paint``: paint-with-words (eDiffi), {phrase of the caption: (R, R) region}; the phrase's
          tokens attend more strongly inside its region, by ``paint_weight``
          (``pipelines/diffusion/paint.py``).
        """
        request = SampleRequest(
            conditions=dict(conditions or {}),
            guidance=guidance,
            num_images=num_images,
            seed=seed,
            generator=generator,
            source=source,
            mask=mask,
            invert_conditions=invert_conditions,
            invert_guidance=invert_guidance,
            paint=paint,
            paint_weight=paint_weight,
        )
        out = self.sample_batch([request], num_inference_steps, scheduler, threshold)[0]
        if output_type == "pil":
            from PIL import Image

            out.images = [Image.fromarray(im) for im in out.images]
        return out

    def prepare(self, request: SampleRequest) -> PreparedRequest:
        """Checks one request and resolves its guidance; no model call (cheap, for grouping)."""
        conditions = dict(request.conditions)
        source, mask = request.source, request.mask
        if request.num_images < 1:
            raise ValueError("num_images and num_inference_steps must be >= 1")
        if mask is not None:
            if source is None:
                raise ValueError("a mask needs the source image it applies to")
            mask = (np.asarray(mask) > 0).astype(np.uint8)
            conditions["mask"], conditions["mask.image"] = mask, np.asarray(source, np.uint8)
        if request.invert_conditions is not None and source is None:
            raise ValueError("bidirectional guidance (invert_conditions) needs the source image to invert")
        if source is not None and np.asarray(source).shape != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"source is {np.asarray(source).shape}, expected ({self.image_size}, {self.image_size}, 3)"
            )
        self._check_maps(conditions)
        if request.paint:
            if request.paint_caption is None and "text" not in conditions:
                raise PaintError("paint-with-words paints phrases of the caption: give a caption (text)")
            if not (isinstance(request.paint_weight, (int, float)) and np.isfinite(request.paint_weight)):
                raise PaintError(f"paint_weight must be a finite number, got {request.paint_weight!r}")
            caption = request.paint_caption or str(conditions["text"])
            for phrase in request.paint:  # each phrase is in the caption as the model reads it
                self.phrase_tokens(caption, phrase)
        guide = self._guidance(request.guidance, given_conditions(conditions))
        inv_guide = None
        if request.invert_conditions is not None:
            self._check_maps(request.invert_conditions)
            inv_guide = self._guidance(request.invert_guidance, given_conditions(request.invert_conditions))
        return PreparedRequest(request, conditions, mask, guide, inv_guide)

    @torch.no_grad()
    def sample_batch(
        self,
        requests: Sequence[SampleRequest | PreparedRequest],
        num_inference_steps: int = 50,
        scheduler: SchedulerName = "ddim",
        threshold: Threshold | None = None,
    ) -> list[ComposerOutput]:
        """Several requests in one batched sampling run; one ``ComposerOutput`` per request.

        The requests must be compatible (``PreparedRequest.compatible_key``: the same condition
        keys, guidance and inversion guidance, with or without source/mask); their rows are
        concatenated, so each step is one UNet forward for all of them (Ray Serve's
        ``@serve.batch`` groups requests this way). Each request draws its noise from its own
        seed exactly as it would alone, so batching changes no sample beyond float rounding.
        """
        if num_inference_steps < 1:
            raise ValueError("num_images and num_inference_steps must be >= 1")
        prepared = [r if isinstance(r, PreparedRequest) else self.prepare(r) for r in requests]
        if not prepared:
            return []
        batch = Batch(prepared)
        first = batch.first
        inverting = first.invert_guidance is not None
        residual = bool(getattr(self.unet.config, "upsample_residual", False))
        if threshold is None:  # clipping x_0 to [-1, 1] would cut a residual's range [-2, 2]
            threshold = "none" if (self.vae is not None or inverting or residual) else "clip"
        if inverting and scheduler != "ddim":
            raise ValueError("bidirectional guidance inverts with DDIM; use scheduler='ddim'")
        with eval_mode(self.denoiser):  # sampling is in eval mode whatever the caller's model mode
            sched = self._scheduler(scheduler, threshold, inverting)
            x = self._noise(batch)
            encoded = self._encode_rows(
                [p.conditions for p in prepared], batch.sizes, first.guidance, batch.generators
            )
            x0 = self._encode_sources(batch) if first.request.source is not None else None
            base = self._residual_base(batch) if residual else None
            if x0 is not None and base is not None:  # the sources as the residual model sees them
                x0 = x0 - base
            if inverting:
                x = self._invert(batch, sched, x0, num_inference_steps)
            known = self._known_region(batch, x0) if first.mask is not None else None
            with self._painting(batch) as denoiser:
                x = denoise(
                    denoiser, sched, x, encoded, first.guidance, num_inference_steps, known, self.progress_bar
                )
            images = self._decode(x if base is None else x + base)
        return self._outputs(batch, images, threshold)

    # -- the steps of sample_batch ------------------------------------------------------------
    @contextlib.contextmanager
    def _painting(self, batch: Batch):
        """The denoiser of the sampling steps: painting the requests' phrases (paint-with-words)
        while the block runs, or the plain one when no request paints."""
        if not any(p.request.paint for p in batch.prepared):
            yield self.denoiser
            return
        paint = painting(
            self,
            [p.request.paint_caption or p.conditions.get("text") for p in batch.prepared],
            [p.request.paint for p in batch.prepared],
            batch.sizes,
            [p.request.paint_weight for p in batch.prepared],
        )
        with painted(self.denoiser, paint):
            yield PaintedDenoiser(self.denoiser, paint, self.scheduler.alphas_cumprod)

    def _noise(self, batch: Batch) -> torch.Tensor:
        """x_T (sum(sizes), C, S, S): each request's noise from its own generator, drawn on the CPU
        in float32 so a seed gives the same images on every device and dtype."""
        c, s = self.unet.config.image_channels, self.unet.config.sample_size
        noise = [
            randn_tensor((n, c, s, s), generator=g, device=torch.device("cpu"), dtype=torch.float32)
            for n, g in zip(batch.sizes, batch.generators, strict=True)
        ]
        return torch.cat(noise).to(self.unet.device, self.unet.dtype)

    def _residual_base(self, batch: Batch) -> torch.Tensor:
        """A residual upsampler's base (sum(sizes), C, S, S): each request's clean ``low_res``
        upsampled bicubically (``ComposerModel.residual_base``), the same for its samples."""
        return torch.cat(
            [
                self.unet.residual_base(
                    image_to_tensor(np.asarray(p.conditions["low_res"], np.uint8)[None]).to(
                        self.unet.device, self.unet.dtype
                    )
                ).repeat(n, 1, 1, 1)
                for p, n in zip(batch.prepared, batch.sizes, strict=True)
            ]
        )

    def _encode_sources(self, batch: Batch) -> torch.Tensor:
        """x_0 of every request's source, (sum(sizes), C, S, S) in model space."""
        # Encoded (through the VAE, if any) once per request, then shared by its samples.
        return torch.cat(
            [
                self._encode_images(np.asarray(p.request.source, np.uint8)[None]).repeat(n, 1, 1, 1)
                for p, n in zip(batch.prepared, batch.sizes, strict=True)
            ]
        )

    def _invert(
        self, batch: Batch, sched: DDIMScheduler, x0: torch.Tensor, num_inference_steps: int
    ) -> torch.Tensor:
        """Composer §3.2, first half: the sources' x_0 -> x_T under c1 (``invert_conditions``)."""
        guide = batch.first.invert_guidance
        encoded = self._encode_rows([p.request.invert_conditions for p in batch.prepared], batch.sizes, guide)
        return invert(self.denoiser, sched, x0, encoded, guide, num_inference_steps, self.progress_bar)

    def _known_region(
        self, batch: Batch, x0: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``denoise``'s ``known``: (x_0 of the sources, mask (B, 1, S, S) with 1 = regenerate,
        noise to bring the sources to each step's level, drawn after x_T from the same generators)."""
        device, dtype = self.unet.device, self.unet.dtype
        m = torch.cat(
            [
                torch.from_numpy(p.mask).float()[None, None].repeat(n, 1, 1, 1)
                for p, n in zip(batch.prepared, batch.sizes, strict=True)
            ]
        ).to(device, dtype)
        f = self.unet.config.local_downsample
        m = (
            torch.nn.functional.max_pool2d(m, f) if f > 1 else m
        )  # a latent is regenerated if any of its pixels is
        noise = torch.cat(
            [
                randn_tensor((n, *x0.shape[1:]), generator=g, device=torch.device("cpu"), dtype=torch.float32)
                for n, g in zip(batch.sizes, batch.generators, strict=True)
            ]
        )
        return x0, m, noise.to(device, dtype)

    def _outputs(self, batch: Batch, images: np.ndarray, threshold: Threshold) -> list[ComposerOutput]:
        """The decoded (sum(sizes), R, R, 3) uint8 images split back into one output per request."""
        first = batch.first
        outputs, start = [], 0
        for p, n in zip(batch.prepared, batch.sizes, strict=True):
            ims = images[start : start + n]
            start += n
            if p.mask is not None:
                # Region-restricted editing: outside the mask the output *is* the source.
                ims = np.where(
                    p.mask[None, :, :, None].astype(bool), ims, np.asarray(p.request.source, np.uint8)[None]
                )
            outputs.append(
                ComposerOutput(
                    images=ims,
                    guidance=first.guidance.describe(),
                    threshold=threshold,
                    invert_guidance=None
                    if first.invert_guidance is None
                    else first.invert_guidance.describe(),
                )
            )
        return outputs

    def _encode_rows(
        self,
        conditions: Sequence[Mapping[str, Any]],
        sizes: Sequence[int],
        guidance: Guidance,
        generators: Sequence[torch.Generator] | None = None,
    ):
        """Every guidance branch's conditions for each request's samples, encoded once for all steps.

        Rows are request-major within a branch (request 0's samples, request 1's, …), the layout
        ``guidance.presence`` and ``Guidance.combine`` expect for ``sum(sizes)`` samples.
        """
        per_request = [self._rows(c, n) for c, n in zip(conditions, sizes, strict=True)]
        rows: dict[str, Any] = {}
        for key in per_request[0]:
            parts = [r[key] for r in per_request]
            rows[key] = sum(parts, []) if key == "text" else np.concatenate(parts)
        if "text" in rows and self.unet.config.caption_encoder == "base":
            rows.update(self._encode_text(rows.pop("text")))
        k, n = len(guidance.branch_sets()), sum(sizes)
        conds = to_conditions(self.unet, rows)
        if conds.low_res is not None:  # before the branches are repeated: one augmentation per sample
            conds.low_res = self._augment_low_res(conds.low_res, conds.low_res_level, sizes, generators)
        presence = guidance.presence(n, self.unet.device)
        # one branch at a time: a branch's rows are then computed alike whatever the other branches
        # (a guidance schedule's empty window gives exactly the images without that condition)
        parts = [self.denoiser.encode(conds, presence[j * n : (j + 1) * n]) for j in range(k)]
        return parts[0] if k == 1 else type(parts[0]).cat(parts)

    def _augment_low_res(
        self,
        low: torch.Tensor,
        level: torch.Tensor,
        sizes: Sequence[int],
        generators: Sequence[torch.Generator] | None,
    ) -> torch.Tensor:
        """An upsampler's low-resolution rows noised to their level, as in training (Imagen's
        noise-conditioning augmentation); each request's noise from its own generator, drawn after
        its x_T (a fixed seed without generators)."""
        from models.objective import noise_to_level

        gens = list(generators) if generators is not None else [torch.Generator().manual_seed(0)] * len(sizes)
        parts, start = [], 0
        for n, g in zip(sizes, gens, strict=True):
            parts.append(noise_to_level(self.scheduler, low[start : start + n], level[start : start + n], g))
            start += n
        return torch.cat(parts)
