"""``sketch``: an edge map of the image, Composer §3.1.

The paper extracts sketches with an edge detector (PiDiNet, Su et al. 2021) followed by sketch
simplification. Three detectors are offered:

- ``canny`` (OpenCV, no weights): binary edges computed at the output resolution;
- ``pidinet`` (the paper's detector) and ``hed``: the lllyasviel/Annotators networks through
  controlnet_aux's network classes. controlnet_aux's detectors run one image per call; here the
  same pre- and post-processing runs on the whole batch in one forward.

The sketch-simplification network of the paper has no public release we can load, so it is left
out; ``edge_threshold`` and ``safe`` (controlnet_aux's own options) thin out the soft edges instead.

Output ``sketch``: (R, R) uint8, 255 = edge, 0 = none (soft values in between for the networks
unless ``edge_threshold`` binarises them).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from pipelines.conditions.base import (
    Batch,
    ColumnSpec,
    Extractor,
    ExtractorConfig,
    ExtractorUnavailable,
    resolve_weights,
)

# The checkpoint file each network loads from a lllyasviel/Annotators directory (the names
# controlnet_aux's PidiNetDetector / HEDdetector.from_pretrained look for).
CHECKPOINTS = {"pidinet": "table5_pidinet.pth", "hed": "ControlNetHED.pth"}
ANNOTATORS_REPO = "lllyasviel/Annotators"


class SketchConfig(ExtractorConfig):
    method: Literal["canny", "pidinet", "hed"] = "canny"  # pidinet is the paper's detector
    # Directory holding the lllyasviel/Annotators checkpoint (or that repo id, looked up in the
    # local Hugging Face cache only); pidinet and hed need it, canny ignores it. Not a resource():
    # other weights write other sketches.
    weights: str | None = None
    # canny: hysteresis thresholds on the Sobel gradient (controlnet_aux's defaults).
    low_threshold: int = Field(100, ge=0, le=255)
    high_threshold: int = Field(200, ge=0, le=255)
    blur: int = Field(
        0, ge=0
    )  # canny: odd Gaussian kernel size applied first to drop texture edges; 0 = none
    l2_gradient: bool = False  # canny: exact L2 gradient magnitude instead of OpenCV's L1 default
    # pidinet/hed: the side the image is resized to before the network. The annotators were
    # used at 512 in ControlNet; controlnet_aux rounds to a multiple of 64, which we require.
    detect_resolution: int = Field(512, ge=64, multiple_of=64)
    safe: bool = False  # pidinet/hed: controlnet_aux's safe_step, quantising edges to 3 levels
    # pidinet/hed: binarise the edge probability at this value (controlnet_aux's pidinet
    # `apply_filter` is 0.5); None keeps the soft edges.
    edge_threshold: float | None = Field(None, gt=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> SketchConfig:
        if not 0 <= self.low_threshold <= self.high_threshold <= 255:
            raise ValueError(
                "canny thresholds must satisfy 0 <= low_threshold <= high_threshold <= 255, "
                f"got low_threshold={self.low_threshold}, high_threshold={self.high_threshold}"
            )
        if self.blur % 2 == 0 and self.blur:
            raise ValueError(f"blur must be 0 or an odd kernel size, got {self.blur}")
        return self


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """(B, H, W, C) uint8 -> (B, size, size, C) uint8; area when shrinking, Lanczos when growing.

    The interpolation rule is controlnet_aux's ``resize_image``. One cv2 call per image.
    """
    import cv2

    if images.shape[1:3] == (size, size):
        return images
    flag = cv2.INTER_AREA if size < images.shape[1] else cv2.INTER_LANCZOS4
    out = [cv2.resize(im, (size, size), interpolation=flag) for im in images]
    return np.stack(out).reshape(len(images), size, size, *images.shape[3:])


class SketchExtractor(Extractor):
    name = "sketch"
    version = "1"
    config_cls = SketchConfig
    config: SketchConfig

    def unavailable_reason(self) -> str | None:
        c = self.config
        if c.method == "canny" or c.weights:
            return None
        filename = CHECKPOINTS[c.method]
        return (
            f"sketch.method is {c.method!r} but sketch.weights is not set: set it to a local directory "
            f"holding {filename} from {ANNOTATORS_REPO} (on a machine with internet run "
            f"`huggingface-cli download {ANNOTATORS_REPO} {filename} --local-dir DIR`), or to "
            f"{ANNOTATORS_REPO!r} if it is in the local Hugging Face cache; method 'canny' needs no weights"
        )

    def columns(self) -> list[ColumnSpec]:
        r = self.resolution
        return [ColumnSpec("sketch", "uint8", (r, r), f"{self.config.method} edges, 255 = edge, 0 = none")]

    def uses_model(self) -> bool:
        return self.config.method != "canny"

    def setup(self) -> None:
        c = self.config
        if c.method == "canny":
            return
        import os
        import warnings

        import torch

        directory = resolve_weights(c.weights, "sketch.weights")
        filename = CHECKPOINTS[c.method]
        path = os.path.join(directory, filename)
        if not os.path.isfile(path):
            raise ExtractorUnavailable(
                f"sketch.weights: {directory!r} has no {filename} (needed by method {c.method!r}); on a "
                f"machine with internet run `huggingface-cli download {ANNOTATORS_REPO} {filename} "
                f"--local-dir {directory}`"
            )
        # controlnet_aux's package __init__ imports every detector, which warns about optional
        # dependencies (mediapipe, timm renames) that these two networks do not use.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from controlnet_aux.hed import ControlNetHED_Apache2
            from controlnet_aux.pidi.model import pidinet

        # weights_only: a checkpoint is data, never code to unpickle.
        state = torch.load(path, map_location="cpu", weights_only=True)
        if c.method == "pidinet":
            # The release checkpoint is a DataParallel training checkpoint: {"state_dict":
            # {"module.<key>": tensor}}; PidiNetDetector.from_pretrained strips the prefix the same way.
            if not isinstance(state, dict) or "state_dict" not in state:
                raise ExtractorUnavailable(
                    f"sketch.weights: {path!r} has no 'state_dict' entry; is it {filename}?"
                )
            net = pidinet()
            net.load_state_dict({k.replace("module.", ""): v for k, v in state["state_dict"].items()})
        else:
            net = ControlNetHED_Apache2()  # a plain state_dict, as HEDdetector.from_pretrained loads it
            net.load_state_dict(state)
        self._device = self.torch_device()
        self._net = net.float().eval().to(self._device)

    def extract(self, batch: Batch) -> Batch:
        if self.config.method == "canny":
            return {"sketch": self._canny(batch["image"])}
        return {"sketch": self._network(batch["image"])}

    def _canny(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, R, R) uint8 in {0, 255}; edges found at R so they stay 1 px thin."""
        import cv2

        c = self.config
        out = np.empty((len(images), self.resolution, self.resolution), np.uint8)
        for i, im in enumerate(_resize(images, self.resolution)):
            if c.blur:
                im = cv2.GaussianBlur(im, (c.blur, c.blur), 0)
            # On 3 channels OpenCV takes the strongest channel's gradient, as controlnet_aux does.
            out[i] = cv2.Canny(im, c.low_threshold, c.high_threshold, L2gradient=c.l2_gradient)
        return out

    def _network(self, images: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 -> (B, R, R) uint8 edge strength, one forward for the batch.

        Reproduces PidiNetDetector / HEDdetector.__call__: resize to ``detect_resolution``; PiDiNet
        takes BGR in [0, 1] and returns sigmoid probabilities (its last output is the fused map);
        HED takes RGB in [0, 255], and its five side outputs are upsampled, averaged and passed
        through a sigmoid. The probabilities are resized to R before ``edge_threshold`` / ``safe``
        (controlnet_aux resizes after), so that a binarised map stays binary at R.
        """
        import torch
        import torch.nn.functional as F

        c = self.config
        d = c.detect_resolution
        # torch.tensor copies: Ray hands batches over as read-only arrays, which from_numpy warns about.
        x = torch.tensor(_resize(images, d), device=self._device).permute(0, 3, 1, 2).float()
        with torch.inference_mode():
            if c.method == "pidinet":
                edge = self._net(x.flip(1) / 255.0)[-1]  # (B, 1, d, d) in [0, 1]
            else:
                sides = [F.interpolate(p, (d, d), mode="bilinear", align_corners=False) for p in self._net(x)]
                edge = torch.sigmoid(torch.cat(sides, dim=1).mean(dim=1, keepdim=True))
            if d != self.resolution:
                edge = F.interpolate(
                    edge,
                    (self.resolution, self.resolution),
                    mode="bilinear",
                    align_corners=False,
                    antialias=True,
                )
            if c.edge_threshold is not None:
                edge = (edge > c.edge_threshold).float()
            if c.safe:
                edge = torch.floor(edge * 3.0) / 2.0  # controlnet_aux.util.safe_step with step=2
            # Truncation, not rounding, as controlnet_aux's astype(np.uint8).
            edge = (edge * 255.0).clamp(0, 255).to(torch.uint8)
        return edge[:, 0].cpu().numpy()
