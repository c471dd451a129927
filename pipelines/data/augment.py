"""Training-time augmentation of decomposed rows (Composer §3.2; used by the training loop).

- One random square crop (resized back to R) and one horizontal flip per row, applied
  *identically* to the image and to every local map, so the maps stay aligned with the image.
  Global conditions (caption, semantics, palette) describe the whole image and are kept as
  stored; a crop of 80-100% of the side barely changes them, a flip not at all.
- ``intensity`` is recomputed from the augmented image with random channel weights, as Composer
  does (§3.1), so the model cannot learn one fixed colour-to-gray mapping and invert it.
- ``mask`` (with its masked image) is drawn here by ``MaskGenerator`` from the augmented
  instance map: the mask is not a property of the image and is never stored.

Rows use the shard keys: "image" (B, R, R, 3) uint8 and the maps "sketch", "instances",
"depth", "intensity" (B, R, R) uint8; every other key passes through unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field, model_validator

from pipelines.conditions.mask import MaskConfig, MaskGenerator
from pipelines.config import Config, nested

# Interpolation when a crop is resized back to R: label and binary maps stay labels/binary.
_NEAREST = ("instances", "sketch")
_LINEAR = ("image", "depth", "intensity")


class AugmentConfig(Config):
    crop_scale: tuple[float, float] = (0.8, 1.0)  # crop side / image side; (1, 1) = no crop
    flip: bool = False  # horizontal flip with p = 0.5; off by default: captions saying left/right would lie
    random_intensity: bool = True  # intensity from random channel weights instead of the stored BT.601
    # Dirichlet α of the channel weights; large α -> equal weights
    intensity_concentration: float = Field(1.0, gt=0)
    mask: MaskConfig = nested(MaskConfig)

    @model_validator(mode="after")
    def _check(self) -> AugmentConfig:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(
                f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {self.crop_scale}"
            )
        return self


def _crop_resize(a: np.ndarray, y: int, x: int, side: int, r: int, nearest: bool) -> np.ndarray:
    import cv2

    patch = np.ascontiguousarray(a[y : y + side, x : x + side])
    if side == r:
        return patch
    smooth = cv2.INTER_AREA if side > r else cv2.INTER_LINEAR  # area: no aliasing when shrinking
    return cv2.resize(patch, (r, r), interpolation=cv2.INTER_NEAREST if nearest else smooth)


def crop_and_flip(
    rows: dict[str, Any], config: AugmentConfig, rng: np.random.Generator, size: int | None = None
) -> dict[str, Any]:
    """The same random crop and flip for each row's image and maps (module docstring); crops are
    resized to ``size`` (default: the stored side R), so a model may train below the shards' R."""
    images = rows["image"]
    b, r = images.shape[0], images.shape[1]
    size = size or r
    lo, hi = config.crop_scale
    side = np.clip(np.rint(rng.uniform(lo, hi, b) * r), 1, r).astype(int)
    y = np.floor(rng.random(b) * (r - side + 1)).astype(int)
    x = np.floor(rng.random(b) * (r - side + 1)).astype(int)
    flip = rng.random(b) < 0.5 if config.flip else np.zeros(b, bool)
    out = dict(rows)
    for key in _NEAREST + _LINEAR:
        if key not in rows:
            continue
        src = np.asarray(rows[key])
        if src.shape[:3] != (b, r, r):
            raise ValueError(f"augment: {key} is {src.shape}, expected ({b}, {r}, {r}, ...) like the image")
        dst = np.empty((b, size, size, *src.shape[3:]), src.dtype)
        for i in range(b):
            a = _crop_resize(src[i], y[i], x[i], side[i], size, key in _NEAREST)
            dst[i] = a[:, ::-1] if flip[i] else a
        out[key] = dst
    return out


def random_intensity(images: np.ndarray, rng: np.random.Generator, concentration: float = 1.0) -> np.ndarray:
    """(B, R, R, 3) uint8 -> (B, R, R) uint8: each row's RGB mixed with its own random convex weights."""
    w = rng.dirichlet(np.full(3, concentration), images.shape[0]).astype(np.float32)  # (B, 3), rows sum to 1
    gray = np.einsum("bhwc,bc->bhw", images.astype(np.float32), w)
    return np.clip(np.rint(gray), 0, 255).astype(np.uint8)


def augment(
    rows: dict[str, Any], config: AugmentConfig, rng: np.random.Generator, size: int | None = None
) -> dict[str, Any]:
    """Crop/flip (to ``size``), random-weight intensity and a fresh mask ("mask", "mask.image")."""
    out = crop_and_flip(rows, config, rng, size)
    images = out["image"]
    if config.random_intensity:
        out["intensity"] = random_intensity(images, rng, config.intensity_concentration)
    b, r = images.shape[0], images.shape[1]
    out["mask"] = MaskGenerator(config.mask, r).generate(b, r, rng, out.get("instances"))
    out["mask.image"] = images
    return out
