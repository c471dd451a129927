"""``semantics``: the CLIP image embedding, Composer's "semantics and style" condition (§3.1).

Composer conditions on the CLIP image embedding of the training image so that, at inference, a
reference image's semantics and style can be recombined with other conditions (§3.1, §4). We store
the open_clip image tower's projected embedding, L2-normalised by default as unCLIP does.

Weights come from disk only, never from the network: ``clip_model`` is either
``local-dir:/path`` (what open_clip's ``save_for_hf`` / ``push_to_hf_hub`` writes:
``open_clip_config.json`` + ``open_clip_model.safetensors``) or ``hf-hub:org/repo``, looked up in
the local Hugging Face cache only. ``resolve_open_clip`` and ``open_clip_model_cfg`` are shared with
the ``caption`` extractor, which uses the text tower of the same kind of checkpoint. (Checkpoints
whose text tower is a Hugging Face model, ``text_cfg.hf_model_name``, also need that model's config
in the cache: open_clip builds the tower from it even though the weights come from the checkpoint.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import model_validator

from pipelines.conditions.base import (
    Batch,
    ColumnSpec,
    Extractor,
    ExtractorConfig,
    ExtractorUnavailable,
    resolve_weights,
)
from pipelines.config import resource

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
# The checkpoint Composer-scale models use (SD 2.x / unCLIP's ViT-H-14); only named in messages.
SUGGESTED_CLIP = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def check_open_clip_spec(value: str | None, key: str) -> None:
    """Raise ``ValueError`` unless ``value`` is None or an open_clip ``local-dir:``/``hf-hub:`` id."""
    if value is None:
        return
    if not value.startswith((LOCAL_DIR, HF_HUB)) or value in (LOCAL_DIR, HF_HUB):
        raise ValueError(
            f"{key} must be '{LOCAL_DIR}/path/to/dir' or '{HF_HUB}org/repo' (open_clip's notation), got {value!r}"
        )


def resolve_open_clip(spec: str, key: str) -> str:
    """The local directory holding the open_clip checkpoint ``spec``; never downloads.

    Raises ``ExtractorUnavailable`` naming ``key`` when the directory (or cached snapshot) is
    missing, has no ``open_clip_config.json`` or has no weights file. The last check matters:
    open_clip itself only logs a warning and returns a randomly initialised model in that case.
    """
    if spec.startswith(LOCAL_DIR):
        path = os.path.expanduser(spec[len(LOCAL_DIR) :])
        if not os.path.isdir(path):
            raise ExtractorUnavailable(f"{key}: directory {path!r} does not exist")
    else:
        path = resolve_weights(spec[len(HF_HUB) :], key)
    root = Path(path)
    if not (root / "open_clip_config.json").is_file():
        raise ExtractorUnavailable(
            f"{key}: {path!r} has no open_clip_config.json; expected an open_clip checkpoint directory "
            f"(as written by open_clip's push_to_hf_hub, e.g. the {SUGGESTED_CLIP} repo)"
        )
    if not any(any(root.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.pth")):
        raise ExtractorUnavailable(f"{key}: {path!r} holds open_clip_config.json but no weights file")
    return path


def open_clip_model_cfg(directory: str) -> dict[str, Any]:
    """The ``model_cfg`` section of ``directory``'s ``open_clip_config.json`` (no weights read)."""
    with open(Path(directory) / "open_clip_config.json", encoding="utf-8") as f:
        return json.load(f)["model_cfg"]


def no_clip_model_reason(key: str) -> str:
    return (
        f"no CLIP weights configured; set {key} to 'local-dir:/path/to/dir' (a directory holding "
        f"open_clip_config.json and open_clip_model.safetensors) or 'hf-hub:org/repo' for a repo already "
        f"in the local Hugging Face cache. Nothing is downloaded here: on a machine with internet run "
        f"`huggingface-cli download {SUGGESTED_CLIP}` and copy the cache (or the snapshot directory) over"
    )


class SemanticsConfig(ExtractorConfig):
    clip_model: str | None = None  # open_clip weights, 'local-dir:/path' or 'hf-hub:org/repo' (cache only)
    normalize: bool = True  # unit L2 norm, as CLIP's contrastive space and unCLIP's prior use it
    batch_size: int = resource(64, ge=1)  # a ViT-H forward amortises well at 64 images

    @model_validator(mode="after")
    def _check(self) -> SemanticsConfig:
        check_open_clip_spec(self.clip_model, "semantics.clip_model")
        return self


class SemanticsExtractor(Extractor):
    """The open_clip image embedding: ``semantics`` (D,) float16, D = the checkpoint's embed_dim."""

    name = "semantics"
    version = "1"
    config_cls = SemanticsConfig
    config: SemanticsConfig

    def __init__(self, config: SemanticsConfig, resolution: int, has_ground_truth: bool = False):
        super().__init__(config, resolution, has_ground_truth)
        self._dir: str | None = None
        self._visual: Any = None
        self._preprocess_cfg: dict[str, Any] = {}
        self._device: Any = None

    def _clip_dir(self) -> str:
        if self._dir is None:
            if self.config.clip_model is None:
                raise ExtractorUnavailable(f"{self.name}: {no_clip_model_reason('semantics.clip_model')}")
            self._dir = resolve_open_clip(self.config.clip_model, "semantics.clip_model")
        return self._dir

    def unavailable_reason(self) -> str | None:
        if self.config.clip_model is None:
            return no_clip_model_reason("semantics.clip_model")
        try:
            self._clip_dir()
        except ExtractorUnavailable as e:
            return str(e)
        return None

    def columns(self) -> list[ColumnSpec]:
        embed_dim = int(open_clip_model_cfg(self._clip_dir())["embed_dim"])
        unit = "unit-norm " if self.config.normalize else ""
        return [ColumnSpec("semantics", "float16", (embed_dim,), f"{unit}CLIP image embedding")]

    def uses_model(self) -> bool:
        return True

    def setup(self) -> None:
        import open_clip
        import torch

        device = torch.device(self.torch_device())
        # require_pretrained: fail rather than embed with random weights if the checkpoint is off.
        model = open_clip.create_model(
            f"{LOCAL_DIR}{self._clip_dir()}", device=device, require_pretrained=True
        )
        self._visual = model.visual.eval()  # the text tower is not needed; let it be freed
        self._preprocess_cfg = dict(model.visual.preprocess_cfg)
        self._device = device

    def _preprocess(self, images: np.ndarray) -> Any:
        """(B, H, W, 3) uint8 -> (B, 3, h, w) float32 normalised, as open_clip's eval transform.

        Batched torch ops instead of open_clip's per-image PIL pipeline; resizing the uint8 tensor
        with torchvision (bicubic, antialiased, rounded back to uint8) follows PIL closely.
        """
        import torch
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        cfg = self._preprocess_cfg
        size = cfg["size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self._device).permute(0, 3, 1, 2)
        in_h, in_w = x.shape[-2:]
        if (in_h, in_w) != (h, w):
            mode = cfg.get("resize_mode", "shortest")
            interp = InterpolationMode(cfg.get("interpolation", "bicubic"))
            if mode == "squash":
                x = TF.resize(x, [h, w], interpolation=interp, antialias=True)
            else:  # 'shortest' fills the target and crops, 'longest' fits inside it and pads
                scale = (max if mode == "shortest" else min)(h / in_h, w / in_w)
                new = [max(1, round(in_h * scale)), max(1, round(in_w * scale))]
                x = TF.resize(x, new, interpolation=interp, antialias=True)
                x = TF.center_crop(x, [h, w])
        x = x.float().div_(255.0)
        mean = torch.tensor(cfg["mean"], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg["std"], device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def extract(self, batch: Batch) -> Batch:
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            emb = self._visual(self._preprocess(batch["image"])).float()
            if self.config.normalize:
                emb = F.normalize(emb, dim=-1)
        return {"semantics": emb.cpu().numpy().astype(np.float16)}
