"""``latents``: the image in a pretrained base's VAE latent space, so training never runs the VAE.

Not one of Composer's eight conditions (it has no presence column in the model): it is what a
model on a pretrained latent-diffusion backbone (``--base``, ``pipelines/conditions/backbone.py``)
denoises, computed once at decomposition time as Stable Diffusion's own training scripts would
compute it on every step:

    latents (C, R/f, R/f) float16  the mean of the VAE encoder's latent distribution for the image
                                   scaled to [-1, 1]; C = the VAE's latent channels, f = its scale
                                   factor (8 for Stable Diffusion; R must be a multiple of it)

The values are **unscaled**: a model's x_0 is ``(latents - shift_factor) * scaling_factor`` (no
shift when the VAE has none), both read from the manifest's ``extractors.latents.vae``
(``vae_identity``), which also names the VAE by the SHA-256 of its weights so that training
refuses latents made by another VAE. The mean (the distribution's mode), not a sample, keeps the
column deterministic; the generation pipeline encodes an image to edit the same way.

On a GPU the VAE runs in bfloat16 (some VAEs, SDXL's among them, overflow float16; bfloat16 has
float32's range), on the CPU in float32.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pipelines.conditions.backbone import BaseModelError, load_base, resolve_base, vae_identity
from pipelines.conditions.base import Batch, ColumnSpec, Extractor, ExtractorConfig
from pipelines.config import resource, to_dict

NO_BASE = (
    "latents are a pretrained base's VAE encoding and no base is given; "
    "give --base BASE_DIR (config: base), a diffusers Stable Diffusion pipeline directory"
)


class LatentsConfig(ExtractorConfig):
    base: str | None = None  # the base pipeline whose VAE encodes; set from the job's top-level `base`
    # rows per call; the encoder's activations grow with R², so lower it for a small GPU at 512 px+
    batch_size: int = resource(16, ge=1)
    # None: one GPU per actor where the Ray cluster has GPUs left, else the CPU (the job decides).
    num_gpus: float | None = resource(None, ge=0)


class LatentsExtractor(Extractor):
    """VAE ``latent_dist.mean`` of ``batch["image"]``; see the module docstring for the column."""

    name = "latents"
    version = "1"
    config_cls = LatentsConfig
    config: LatentsConfig

    def __init__(self, config: LatentsConfig, resolution: int, has_ground_truth: bool = False):
        super().__init__(config, resolution, has_ground_truth)
        self._vae_config: dict[str, Any] | None = None
        self._identity: dict[str, Any] | None = None
        self._vae: Any = None
        self._device: Any = None
        self._dtype: Any = None

    def _config(self) -> dict[str, Any]:
        """The VAE's config.json (never its weights); ``BaseModelError`` when there is no base."""
        if self._vae_config is None:
            if self.config.base is None:
                raise BaseModelError(NO_BASE)
            path = resolve_base(self.config.base) / "vae" / "config.json"
            self._vae_config = json.loads(path.read_text())
        return self._vae_config

    def scale_factor(self) -> int:
        return 2 ** (len(self._config()["block_out_channels"]) - 1)

    def identity(self) -> dict[str, Any]:
        """``vae_identity`` of the base (hashes the weights once per extractor)."""
        if self._identity is None:
            if self.config.base is None:
                raise BaseModelError(NO_BASE)
            self._identity = vae_identity(self.config.base)
        return self._identity

    def unavailable_reason(self) -> str | None:
        try:
            f = self.scale_factor()
        except BaseModelError as e:
            return str(e)
        if self.resolution % f:
            near = max(f, round(self.resolution / f) * f)
            return (
                f"resolution {self.resolution} is not a multiple of the VAE's scale factor {f} "
                f"(--base {self.config.base}); use e.g. --resolution {near}"
            )
        return None

    def columns(self) -> list[ColumnSpec]:
        c, side = int(self._config().get("latent_channels", 4)), self.resolution // self.scale_factor()
        return [
            ColumnSpec(
                "latents",
                "float16",
                (c, side, side),
                "VAE latent_dist.mean of the image in [-1, 1], unscaled: x_0 = (latents - "
                "vae.shift_factor) * vae.scaling_factor (manifest extractors.latents.vae)",
            )
        ]

    def fingerprint(self) -> str:
        # The weights decide the values, not where they are: the same VAE under another path
        # keeps the shards, another VAE under the same path recomputes them.
        settings = {k: v for k, v in to_dict(self.config, outputs_only=True).items() if k != "base"}
        return self._fingerprint(settings | {"vae": self.identity()})

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"base": self.config.base, "vae": self.identity()}

    def uses_model(self) -> bool:
        return True

    def setup(self) -> None:
        import torch

        self._device = torch.device(self.torch_device())
        self._dtype = torch.bfloat16 if self._device.type == "cuda" else torch.float32
        self._vae = load_base(self.config.base, ("vae",), self._dtype, str(self._device)).vae

    def extract(self, batch: Batch) -> Batch:
        import torch

        # uint8 crosses to the device (a quarter of float32's bytes), then [0, 255] -> [-1, 1].
        # Ray may hand over a read-only array, which from_numpy warns about: copy only then.
        images = np.ascontiguousarray(batch["image"])
        x = torch.from_numpy(images if images.flags.writeable else images.copy()).to(self._device)
        x = (x.permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(self._dtype)
        with torch.inference_mode():
            mean = self._vae.encode(x).latent_dist.mean
        return {"latents": mean.float().cpu().numpy().astype(np.float16)}
