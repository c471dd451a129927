"""``depth``: monocular depth, Composer §3.1.

The paper uses an off-the-shelf monocular depth model (MiDaS-style). Rows of the synthetic
dataset carry exact ground-truth depth, which is used instead when the config allows it.

Output ``depth``: (R, R) uint8, 255 = nearest. For model rows it is the model's relative
inverse depth (disparity, what MiDaS / DPT / Depth Anything predict), min-max normalised per
image to [0, 255]: the scale of relative depth is arbitrary, and normalising each image on its
own keeps a row's output independent of the rest of its batch. Ground-truth rows are passed
through as stored (already 255 = nearest), resized to R if needed.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from pipelines.conditions.base import Batch, ColumnSpec, Extractor, ExtractorConfig, resolve_weights

_NEEDS_MODEL = (
    "set depth.weights to a local directory of a transformers depth model such as Intel/dpt-hybrid-midas "
    "or depth-anything/Depth-Anything-V2-Small-hf (prefetch on a machine with internet with "
    "`huggingface-cli download depth-anything/Depth-Anything-V2-Small-hf --local-dir DIR`)"
)


class DepthConfig(ExtractorConfig):
    # auto and ground_truth: rows with ground truth use it, the others the model (if weights are
    # set); model: the model for every row, ground truth or not.
    method: Literal["auto", "ground_truth", "model"] = "auto"
    # A transformers depth model directory (AutoModelForDepthEstimation + AutoImageProcessor),
    # or its repo id looked up in the local Hugging Face cache only. Not a resource(): other
    # weights write other depth maps.
    weights: str | None = None


class DepthExtractor(Extractor):
    name = "depth"
    version = "1"
    config_cls = DepthConfig
    config: DepthConfig

    def unavailable_reason(self) -> str | None:
        c = self.config
        if c.weights:
            return None
        if c.method != "model" and self.has_ground_truth:
            return None
        why = (
            "depth.method is 'model'" if c.method == "model" else "this source carries no ground-truth depth"
        )
        return f"depth needs a depth model ({why}): {_NEEDS_MODEL}; only the synthetic dataset carries ground-truth depth"

    def columns(self) -> list[ColumnSpec]:
        r = self.resolution
        return [
            ColumnSpec("depth", "uint8", (r, r), "relative inverse depth, min-max per image, 255 = nearest")
        ]

    def uses_model(self) -> bool:
        return bool(self.config.weights)

    def setup(self) -> None:
        self._model = None
        if not self.config.weights:
            return
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        directory = resolve_weights(self.config.weights, "depth.weights")
        self._device = self.torch_device()
        self._processor = AutoImageProcessor.from_pretrained(directory, local_files_only=True)
        model = AutoModelForDepthEstimation.from_pretrained(directory, local_files_only=True)
        self._model = model.float().eval().to(self._device)
        # Metric heads (Depth Anything's "metric" variants) predict distance, larger = farther;
        # relative ones (MiDaS, DPT, Depth Anything) predict inverse depth, larger = nearer.
        self._metric = getattr(model.config, "depth_estimation_type", "relative") == "metric"

    def extract(self, batch: Batch) -> Batch:
        n, r = len(batch["image"]), self.resolution
        has_gt = np.asarray(batch.get("has_gt", np.zeros(n, bool)), dtype=bool)
        use_gt = has_gt if self.config.method != "model" else np.zeros(n, bool)
        out = np.empty((n, r, r), np.uint8)
        if use_gt.any():
            out[use_gt] = _resize_maps(batch["gt_depth"][use_gt], r)
        rest = np.flatnonzero(~use_gt)
        if len(rest):
            if self._model is None:
                raise ValueError(
                    f"depth: row(s) {rest.tolist()} of the batch carry no ground-truth depth (has_gt is False) "
                    f"and no depth model is configured: {_NEEDS_MODEL}"
                )
            out[rest] = self._predict(batch["image"][rest])
        return {"depth": out}

    def _predict(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 RGB -> (B, R, R) uint8, 255 = nearest; one forward for the batch.

        The processor (a torchvision-backed one in transformers >= 5) resizes, rescales and
        normalises the whole batch with the model's own settings from preprocessor_config.json.
        """
        import torch
        import torch.nn.functional as F

        r = self.resolution
        # torch.tensor copies: Ray hands batches over as read-only arrays, which from_numpy warns about.
        chw = torch.tensor(images).permute(0, 3, 1, 2)
        inputs = self._processor(
            images=list(chw), input_data_format="channels_first", return_tensors="pt", device=self._device
        )
        with torch.inference_mode():
            pred = self._model(pixel_values=inputs["pixel_values"].to(self._device)).predicted_depth
            pred = F.interpolate(pred[:, None].float(), (r, r), mode="bilinear", align_corners=False)[:, 0]
            if self._metric:
                pred = 1.0 / pred.clamp_min(1e-6)
            lo = pred.amin(dim=(1, 2), keepdim=True)
            hi = pred.amax(dim=(1, 2), keepdim=True)
            # A constant prediction has no depth order: it maps to 0 rather than dividing by zero.
            scaled = (pred - lo) / (hi - lo).clamp_min(1e-12) * 255.0
            return scaled.round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def _resize_maps(maps: np.ndarray, size: int) -> np.ndarray:
    """(B, H, W) uint8 -> (B, size, size) uint8; area when shrinking, bilinear when growing."""
    import cv2

    if maps.shape[1:] == (size, size):
        return maps
    flag = cv2.INTER_AREA if size < maps.shape[1] else cv2.INTER_LINEAR
    return np.stack([cv2.resize(m, (size, size), interpolation=flag) for m in maps])
