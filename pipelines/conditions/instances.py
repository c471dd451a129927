"""``instances``: an instance-id map, Composer §3.1 ("Instances", instance segmentation masks).

The paper runs an instance segmenter (YOLOv5) and keeps its masks; here the map comes from one of
three sources, chosen per row:

- ``ground_truth``: the synthetic set's ``gt_instances`` (already instance ids);
- ``model``: a transformers universal-segmentation model (Mask2Former or OneFormer),
  one batched forward and the processor's panoptic post-processing per image;
- ``cluster``: the no-weights fallback, k-means in CIELab plus connected components
  (``pipelines/conditions/_clustering.py``).

``auto`` uses the ground truth where a row has it (``has_gt``), else the model when ``weights`` is
set, else ``cluster``.

Id convention (the same for every source): ``instances`` is ``(R, R) uint8``; 0 is background or
unassigned, instances are numbered 1..N by decreasing area, ties broken by the raster-order index
of their first pixel, and only the ``max_instances`` largest are kept (the rest become 0). The
ground truth is re-numbered with this convention too, so id 1 is always the largest instance
whatever the source. Source-specific details:

- ground truth: each nonzero id is one instance, whether or not its pixels are connected;
- model: every panoptic segment (things and stuff alike, nothing fused) is one instance; pixels no
  segment claims are 0;
- cluster: each connected region of one colour cluster (4-connectivity) is one instance; regions
  smaller than ``min_area_frac`` of the image are 0, and so is every region of the backdrop's
  cluster (the cluster of the largest region touching the border), holes showing it included.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

from pipelines.conditions.base import (
    Batch,
    ColumnSpec,
    Extractor,
    ExtractorConfig,
    ExtractorUnavailable,
    resolve_weights,
)
from pipelines.config import resource

logger = logging.getLogger(__name__)

# A panoptic checkpoint that works out of the box; any Mask2Former or OneFormer one does.
SUGGESTED_WEIGHTS = "facebook/mask2former-swin-tiny-coco-panoptic"
# The model types whose outputs (class_queries_logits, masks_queries_logits) and processors
# (post_process_panoptic_segmentation) this module reads; both are covered by tiny-model tests.
_MODEL_TYPES = frozenset({"mask2former", "oneformer"})


class InstancesConfig(ExtractorConfig):
    method: Literal["auto", "ground_truth", "model", "cluster"] = "auto"  # see the module docstring
    # A transformers universal-segmentation checkpoint: a local directory or a repo id already in
    # the Hugging Face cache (never downloaded). None: `auto` falls back to `cluster`.
    weights: str | None = None
    max_instances: int = Field(
        32, ge=1, le=255
    )  # ids are uint8; ids 1..32 cover a crowded COCO image; smaller ones become background
    # model: the class-score a query needs to count as a segment (transformers' panoptic default).
    score_threshold: float = Field(0.5, ge=0, le=1)
    # cluster: colour clusters per image; 8 separates the dominant colours of a photo without
    # splitting smooth shading into many bands.
    clusters: int = Field(8, ge=2, le=64)
    kmeans_iters: int = Field(
        10, ge=1
    )  # fixed cap, so the work per image is bounded; converged ones stop early
    colour_space: Literal["lab", "rgb"] = "lab"  # Lab distances follow perceived colour difference
    # cluster: regions below this fraction of the image are speckle, not instances (0.002 of
    # 256x256 is 131 pixels, about an 11x11 square).
    min_area_frac: float = Field(0.002, ge=0, lt=1)
    # Clustering runs on the image area-resized to at most this side and the id map is scaled
    # back (nearest): the cost is per pixel, and Composer's base model reads maps at 64x64.
    # Raise it for finer region boundaries at high stored resolutions.
    cluster_resolution: int = Field(64, ge=16)
    batch_size: int = resource(16, ge=1)  # a Mask2Former forward at 384 px; the fallback is per image


def renumber(labels: np.ndarray, max_instances: int) -> np.ndarray:
    """Re-number an integer label map with the module's id convention.

    ``labels``: (H, W) integers, 0 (or negative) = background, any other value = one instance.
    Returns (H, W) uint8: 1..N by decreasing area, ties by first pixel in raster order, at most
    ``max_instances`` (smaller instances become 0).
    """
    flat = np.where(labels > 0, labels, 0).ravel()
    values, first, inverse, counts = np.unique(
        flat, return_index=True, return_inverse=True, return_counts=True
    )
    # lexsort sorts by the last key first: area descending, then first pixel ascending.
    order = np.lexsort((first, -counts))
    order = order[values[order] != 0][:max_instances]
    lut = np.zeros(len(values), np.uint8)
    lut[order] = np.arange(1, len(order) + 1, dtype=np.uint8)
    return lut[inverse.reshape(-1)].reshape(labels.shape)


class InstancesExtractor(Extractor):
    name = "instances"
    version = "1"
    config_cls = InstancesConfig

    def __init__(self, config: InstancesConfig, resolution: int, has_ground_truth: bool = False):
        super().__init__(config, resolution, has_ground_truth)
        self._model: Any = None
        self._processor: Any = None

    # -- declaration -------------------------------------------------------------------------
    def columns(self) -> list[ColumnSpec]:
        r = self.resolution
        return [
            ColumnSpec("instances", "uint8", (r, r), "instance ids, 0 = background, 1..N by decreasing area")
        ]

    def unavailable_reason(self) -> str | None:
        c = self.config
        if c.method == "model" and not c.weights:
            return (
                "method='model' needs a segmentation checkpoint: set instances.weights to a local "
                "directory or a cached repo id of a transformers universal-segmentation model "
                f"(Mask2Former or OneFormer, e.g. {SUGGESTED_WEIGHTS}; prefetch it with "
                f"`huggingface-cli download {SUGGESTED_WEIGHTS}`), or use method='cluster' (no weights)."
            )
        if c.method == "ground_truth" and not self.has_ground_truth:
            return (
                "method='ground_truth' needs a source with ground-truth instances (the synthetic set); "
                "use method='auto' to fall back to a model or clustering elsewhere."
            )
        return None

    def uses_model(self) -> bool:
        return self.config.method == "model" or (self.config.method == "auto" and bool(self.config.weights))

    # -- execution ---------------------------------------------------------------------------
    def setup(self) -> None:
        if not self.uses_model():
            if self.config.method == "auto":
                logger.info("instances: no weights set; rows without ground truth use colour clustering")
            return
        path = resolve_weights(self.config.weights, "instances.weights")
        from transformers import (
            AutoConfig,
            AutoImageProcessor,
            AutoModelForUniversalSegmentation,
            AutoProcessor,
        )

        model_type = None
        try:
            model_type = AutoConfig.from_pretrained(path).model_type
            if model_type not in _MODEL_TYPES:
                # e.g. DETR: also a universal-segmentation model, but with other output fields.
                raise ValueError(f"model_type {model_type!r} is not one of {sorted(_MODEL_TYPES)}")
            self._model = (
                AutoModelForUniversalSegmentation.from_pretrained(path).to(self.torch_device()).eval()
            )
            # OneFormer is prompted with a task string, so it needs its full processor (with the
            # tokenizer); Mask2Former only needs the image processor.
            if model_type == "oneformer":
                self._processor = AutoProcessor.from_pretrained(path)
            else:
                self._processor = AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError) as e:
            hint = (
                " OneFormer's processor also reads class metadata from the hub repo named by its "
                "repo_path and class_info_file (e.g. `huggingface-cli download shi-labs/oneformer_demo "
                "coco_panoptic.json --repo-type dataset`); prefetch that too."
                if model_type == "oneformer"
                else ""
            )
            raise ExtractorUnavailable(
                f"instances.weights: could not load a universal-segmentation model from {path!r} "
                f"({type(e).__name__}: {e}); expected a Mask2Former or OneFormer checkpoint such as "
                f"{SUGGESTED_WEIGHTS}.{hint}"
            ) from e

    def extract(self, batch: Batch) -> Batch:
        images = batch["image"]
        n, r = len(images), self.resolution
        if images.shape[1:] != (r, r, 3):
            raise ValueError(f"instances: expected images of shape (B, {r}, {r}, 3), got {images.shape}")
        has_gt = batch.get("has_gt")
        use_gt = np.zeros(n, bool) if has_gt is None else np.asarray(has_gt, bool)
        method = self.config.method
        if method == "ground_truth":
            if not use_gt.all():
                missing = np.flatnonzero(~use_gt).tolist()
                raise ValueError(f"instances: method='ground_truth' but rows {missing} have no ground truth")
        elif method in ("model", "cluster"):
            use_gt = np.zeros(n, bool)

        out = np.zeros((n, r, r), np.uint8)
        if use_gt.any():
            gt = batch["gt_instances"]
            if gt.shape != (n, r, r):
                raise ValueError(f"instances: expected gt_instances of shape {(n, r, r)}, got {gt.shape}")
            for i in np.flatnonzero(use_gt):
                out[i] = renumber(gt[i], self.config.max_instances)
        rest = np.flatnonzero(~use_gt)
        if len(rest) and self.uses_model():
            out[rest] = self._segment_with_model(images[rest])
        elif len(rest):
            out[rest] = self._cluster(images[rest])
        return {"instances": out}

    def _cluster(self, images: np.ndarray) -> np.ndarray:
        """(B, R, R, 3) uint8 -> (B, R, R) uint8 ids: clustered (and numbered) at the working size."""
        import cv2

        from pipelines.conditions._clustering import colour_regions

        c, r = self.config, self.resolution
        regions = colour_regions(
            images, c.clusters, c.kmeans_iters, c.colour_space, c.min_area_frac, c.cluster_resolution
        )
        ids = [renumber(reg, c.max_instances) for reg in regions]
        if regions.shape[1:] != (r, r):
            ids = [cv2.resize(i, (r, r), interpolation=cv2.INTER_NEAREST) for i in ids]
        return np.stack(ids)

    def _segment_with_model(self, images: np.ndarray) -> np.ndarray:
        """(B, R, R, 3) uint8 RGB -> (B, R, R) uint8 ids: one forward, panoptic post-processing per image."""
        import torch

        n, r = len(images), self.resolution
        kwargs: dict[str, Any] = {"images": list(images), "return_tensors": "pt"}
        kwargs["input_data_format"] = "channels_last"  # a 3-pixel-tall image must not look CHW
        if self._model.config.model_type == "oneformer":
            kwargs["task_inputs"] = ["panoptic"] * n
        inputs = self._processor(**kwargs).to(self._model.device)
        with torch.inference_mode():
            outputs = self._model(**inputs)
        class_logits = outputs.class_queries_logits.float().cpu()
        mask_logits = outputs.masks_queries_logits.float().cpu()
        out = np.zeros((n, r, r), np.uint8)
        for i in range(n):
            # Per image: Mask2Former's post-processing upsamples every query's mask to a hard-coded
            # 384x384 before the target size, which for a whole batch at once costs GBs.
            one = _QueryLogits(class_logits[i : i + 1], mask_logits[i : i + 1])
            (result,) = self._processor.post_process_panoptic_segmentation(
                one, threshold=self.config.score_threshold, label_ids_to_fuse=set(), target_sizes=[(r, r)]
            )
            # Segment ids start at 1, 0 is unclaimed; an image with no segment comes back as -1s.
            seg = result["segmentation"].to(torch.int64).numpy()
            out[i] = renumber(seg, self.config.max_instances)
        return out


@dataclass
class _QueryLogits:
    """The two fields the processors' post-processing reads from a model output."""

    class_queries_logits: Any  # (1, Q, num_labels + 1)
    masks_queries_logits: Any  # (1, Q, h, w)
