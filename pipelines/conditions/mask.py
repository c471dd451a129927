"""``mask``: the binary edit mask, the eighth representation of Composer §3.1 ("Masking").

Composer restricts generation to an editable region with a 4-channel condition: the masked RGB
image and the binary mask (§3.1); like every condition it is composed with the others, and
dropped, at training time (§3.2). Unlike the other seven it is not a property of the image, so
it is never extracted and never stored in shards:

- training: the training data pipeline draws one mask per sample with ``MaskGenerator.generate``
  (random boxes, brush strokes, or the union of instances from the stored ``instances`` map);
- inference: the user gives a mask image, read with ``mask_from_image`` (white = regenerate).

Either way ``apply_mask`` then makes the masked image. In a mask, 1 marks the region to
regenerate and 0 the region to keep. The box and stroke shapes follow the authors' random masks
(``make_rectangle_mask`` / ``make_irregular_mask`` in VideoComposer,
``modelscope/models/multi_modal/videocomposer/ops/random_mask.py``), with sizes as fractions of
the resolution instead of pixels.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import Field, model_validator

from pipelines.conditions.base import Batch, ColumnSpec, Extractor, ExtractorConfig


def _check_range(name: str, r: tuple[float, float]) -> None:
    if not (0 < r[0] <= r[1] <= 1):
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high <= 1, got {r}")


class MaskConfig(ExtractorConfig):
    # Per-sample mode probabilities; the paper gives no split, so roughly even. Without an
    # instance map (or for a sample with no instances) p_instance's share goes to the other two.
    p_boxes: float = Field(0.35, ge=0, le=1)
    p_strokes: float = Field(0.35, ge=0, le=1)
    p_instance: float = Field(0.3, ge=0, le=1)
    max_boxes: int = Field(3, ge=1)  # 1..max_boxes rectangles per mask
    box_size: tuple[float, float] = (0.12, 0.5)  # side length / resolution (authors: 30-150 px at 256)
    max_strokes: int = Field(5, ge=1)  # 1..max_strokes brush strokes per mask (as the authors)
    max_vertices: int = Field(6, ge=2)  # 2..max_vertices points per stroke (authors: 1-5 segments)
    stroke_width: tuple[float, float] = (0.02, 0.2)  # / resolution (authors: 5-105 px at 256)
    stroke_length: tuple[float, float] = (0.05, 0.4)  # per segment / resolution (authors: 10-210 px)
    max_turn: float = Field(1.5, ge=0)  # radians a stroke may turn between segments, so strokes look drawn
    max_instances: int = Field(2, ge=1)  # 1..max_instances instances per instance mask

    @model_validator(mode="after")
    def _check(self) -> MaskConfig:
        probs = {"p_boxes": self.p_boxes, "p_strokes": self.p_strokes, "p_instance": self.p_instance}
        if abs(sum(probs.values()) - 1) > 1e-6:
            raise ValueError(f"p_boxes + p_strokes + p_instance must be 1, got {sum(probs.values())}")
        if self.p_boxes + self.p_strokes <= 0:
            raise ValueError("p_boxes + p_strokes must be > 0: they stand in where there are no instances")
        for k in ("box_size", "stroke_width", "stroke_length"):
            _check_range(k, getattr(self, k))
        return self


class MaskGenerator(Extractor):
    """Draws random training masks; registered with the extractors but never run as one."""

    name = "mask"
    version = "1"
    config_cls = MaskConfig
    extracted: ClassVar[bool] = False

    def columns(self) -> list[ColumnSpec]:
        return []

    def extract(self, batch: Batch) -> Batch:
        raise RuntimeError(
            "mask is not extracted: it is generated at training time by MaskGenerator.generate "
            "and given by the user at inference time (mask_from_image), and is never stored in shards"
        )

    def generate(
        self,
        batch_size: int,
        resolution: int,
        rng: np.random.Generator,
        instances: np.ndarray | None = None,
    ) -> np.ndarray:
        """(B, R, R) uint8 in {0, 1}, 1 = region to regenerate; one random mode per sample.

        ``instances``: optional (B, H, W) uint8 instance ids (0 = background), resampled to R
        with nearest neighbour. The draws use ``rng`` in a fixed order, so a seed fixes the masks.
        """
        b, r, c = batch_size, resolution, self.config
        if b < 1 or r < 1:
            raise ValueError(f"mask: batch_size and resolution must be >= 1, got {b} and {r}")
        inst = None if instances is None else _resample(_check_instances(instances, b), r)
        present = np.zeros((b, 256), bool)
        if inst is not None:
            ids = inst.reshape(b, -1).astype(np.int64) + (np.arange(b) * 256)[:, None]
            present = np.bincount(ids.ravel(), minlength=b * 256).reshape(b, 256) > 0
            present[:, 0] = False  # background is never an instance

        # Per-sample mode 0 boxes, 1 strokes, 2 instance; p_instance only where the sample has
        # instances, renormalised.
        p = np.tile([c.p_boxes, c.p_strokes, c.p_instance], (b, 1))
        p[:, 2] *= present.any(1)
        cum = np.cumsum(p, 1) / p.sum(1, keepdims=True)
        mode = np.minimum((rng.random(b)[:, None] >= cum).sum(1), 2)

        # Every mode's parameters are drawn for every sample, so the draws never depend on the
        # modes picked and the same seed always means the same masks.
        boxes = self._boxes(b, r, rng)
        strokes = self._strokes(b, r, rng, draw=mode == 1)
        chosen = _instance_union(inst, present, rng, c.max_instances) if inst is not None else boxes
        return np.select([mode[:, None, None] == 0, mode[:, None, None] == 1], [boxes, strokes], chosen)

    def _boxes(self, b: int, r: int, rng: np.random.Generator) -> np.ndarray:
        """(B, R, R) uint8 unions of 1..max_boxes axis-aligned rectangles, vectorised over B."""
        k, (lo, hi) = self.config.max_boxes, self.config.box_size
        n = rng.integers(1, k + 1, b)
        size = np.maximum(np.rint(rng.uniform(lo, hi, (b, k, 2)) * r), 1).astype(np.int64)
        start = np.floor(rng.random((b, k, 2)) * (r - size + 1)).astype(np.int64)
        active = np.arange(k)[None, :] < n[:, None]  # (B, K)
        pix = np.arange(r)
        inside = (pix >= start[..., None]) & (pix < (start + size)[..., None]) & active[..., None, None]
        rows, cols = inside[:, :, 0].astype(np.float32), inside[:, :, 1].astype(np.float32)  # (B, K, R)
        return (rows.transpose(0, 2, 1) @ cols > 0).astype(np.uint8)  # any box covering (y, x)

    def _strokes(self, b: int, r: int, rng: np.random.Generator, draw: np.ndarray) -> np.ndarray:
        """(B, R, R) uint8 thick polylines (brush strokes); drawn only where ``draw`` is set."""
        import cv2

        c = self.config
        s, v = c.max_strokes, c.max_vertices
        n = rng.integers(1, s + 1, b)
        nv = rng.integers(2, v + 1, (b, s))
        width = np.maximum(np.rint(rng.uniform(*c.stroke_width, (b, s)) * r), 1).astype(int)
        start = rng.random((b, s, 1, 2)) * r
        angle = rng.uniform(0, 2 * np.pi, (b, s, 1)) + np.cumsum(
            rng.uniform(-c.max_turn, c.max_turn, (b, s, v - 1)), -1
        )
        step = rng.uniform(*c.stroke_length, (b, s, v - 1))[..., None] * r
        step = step * np.stack([np.cos(angle), np.sin(angle)], -1)
        pts = np.clip(np.concatenate([start, start + np.cumsum(step, 2)], 2), 0, r - 1)
        pts = np.rint(pts).astype(np.int32)  # (B, S, V, 2) as (x, y)

        out = np.zeros((b, r, r), np.uint8)
        for i in np.flatnonzero(draw):  # cv2 draws one canvas at a time; no per-pixel work here
            for j in range(n[i]):
                cv2.polylines(out[i], [pts[i, j, : nv[i, j]]], False, 1, thickness=int(width[i, j]))
        return out


def _check_instances(instances: np.ndarray, b: int) -> np.ndarray:
    if instances.dtype != np.uint8 or instances.ndim != 3 or len(instances) != b:
        raise ValueError(
            f"mask: instances must be ({b}, H, W) uint8 ids, got {instances.dtype}{instances.shape}"
        )
    return instances


def _resample(a: np.ndarray, r: int) -> np.ndarray:
    """(B, H, W) -> (B, R, R) by nearest neighbour (ids must not be blended)."""
    h, w = a.shape[1:]
    if (h, w) == (r, r):
        return a
    ys = np.minimum(((np.arange(r) + 0.5) * h / r).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(r) + 0.5) * w / r).astype(np.int64), w - 1)
    return a[:, ys][:, :, xs]


def _instance_union(inst: np.ndarray, present: np.ndarray, rng: np.random.Generator, k: int) -> np.ndarray:
    """(B, R, R) uint8 union of 1..k distinct random instances of each sample (empty if none)."""
    b = len(inst)
    want = rng.integers(1, k + 1, b)
    keys = np.where(present, rng.random((b, 256)), 2.0)  # absent ids sort last
    order = np.argsort(keys, axis=1, kind="stable")[:, :k]  # (B, k) random present ids first
    take = np.arange(k)[None, :] < np.minimum(want, present.sum(1))[:, None]
    selected = np.zeros((b, 256), bool)
    np.put_along_axis(selected, order, take, axis=1)
    return selected[np.arange(b)[:, None, None], inst].astype(np.uint8)


def mask_from_image(img: np.ndarray, resolution: int) -> np.ndarray:
    """A user's mask picture, (H, W) or (H, W, 3) uint8 (white = regenerate) -> (R, R) uint8 {0, 1}.

    The picture is averaged over channels, area-resized to R x R (stretched: give it the same
    framing as the image it edits) and thresholded at mid-gray.
    """
    import cv2

    a = np.asarray(img)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ValueError(f"mask image must be (H, W) or (H, W, 3) uint8, got {a.dtype}{a.shape}")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    gray = a.astype(np.float32) if a.ndim == 2 else a.astype(np.float32).mean(-1)
    small = cv2.resize(gray, (resolution, resolution), interpolation=cv2.INTER_AREA)
    return (small >= 127.5).astype(np.uint8)


def apply_mask(image: np.ndarray, mask: np.ndarray, fill: float | None = None) -> np.ndarray:
    """The masked image of Composer's mask condition: ``image`` with the region to regenerate filled.

    ``image``: (B, H, W, 3) or (H, W, 3), uint8 in [0, 255] or float in [-1, 1]; ``mask``:
    (B, H, W) or (H, W) in {0, 1}, 1 = regenerate. The fill defaults to neutral mid-gray, i.e. 0
    in the model's [-1, 1] range (128 for uint8), as diffusers' inpainting pipelines do with
    ``image * (mask < 0.5)``; it carries no colour or edge into the region to regenerate.
    """
    image, m = np.asarray(image), np.asarray(mask)
    if image.ndim not in (3, 4) or image.shape[-1] != 3:
        raise ValueError(f"apply_mask: image must be (B, H, W, 3) or (H, W, 3), got {image.shape}")
    if m.shape not in (image.shape[:-1], image.shape[-3:-1]):
        raise ValueError(f"apply_mask: mask {m.shape} does not match image {image.shape}")
    if not ((m == 0) | (m == 1)).all():
        raise ValueError("apply_mask: mask values must be 0 or 1")
    if fill is None:
        fill = 128 if image.dtype == np.uint8 else 0.0
    return np.where(m.astype(bool)[..., None], np.asarray(fill, image.dtype), image)
