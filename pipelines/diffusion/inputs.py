"""Decomposed arrays (the shard format of the decomposition job) -> the model's ``Conditions``.

One place for the conversion, used by the training loop and by the generation pipeline:

    "text"              (B,) str                 trainable caption encoder
    "caption.clip_sentence" / "caption.clip_tokens" (B, D) / (B, L, W)   caption_encoder = clip
    "caption.t5_sentence"   / "caption.t5_tokens"   (B, D) / (B, L, W)   caption_encoder = t5
                                                     (both sets: caption_encoder = clip+t5)
    "semantics"         (B, D) float             CLIP (or precomputed) embedding
    "semantics.image"   (B, R, R, 3) uint8       image for the trainable semantics encoder
    "palette"           (B, 156) float
    "sketch" "depth" "intensity"  (B, R, R) uint8 -> (B, 1, R, R) in [0, 1]
    "instances"         (B, R, R) uint8 ids
    "mask"              (B, R, R) uint8 {0, 1}, 1 = regenerate, with
    "mask.image"        (B, R, R, 3) uint8: the source image, blanked inside the mask here
    "low_res"           (B, R/f, R/f, 3) uint8   an upsampler's (upsample_factor f) image to upsample
    "low_res.level"     (B,) int                 its noise-augmentation level (default 0: clean)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from models import ComposerModel, Conditions
from models.objective import downsample
from pipelines.conditions.mask import apply_mask


def image_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    return (
        torch.tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    )  # copies: inputs may be read-only


def tensor_to_image(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return x.permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


def downsample_image(images: np.ndarray, factor: int) -> np.ndarray:
    """(B, R, R, 3) uint8 -> (B, R/f, R/f, 3) uint8, as an upsampler's training input is made
    (``models.objective.downsample``: antialiased bicubic)."""
    return tensor_to_image(downsample(image_to_tensor(images), factor))


def upsample_bicubic(images: np.ndarray, side: int) -> np.ndarray:
    """(B, r, r, 3) uint8 -> (B, side, side, 3) uint8, bicubic as an upsampler sees its input
    (``ComposerModel``'s ``low_res`` path): the baseline an upsampler must beat."""
    import torch.nn.functional as F

    x = F.interpolate(image_to_tensor(images), size=(side, side), mode="bicubic", align_corners=False)
    return tensor_to_image(x.clamp(-1, 1))


def join_tokens(parts: list[np.ndarray]) -> np.ndarray:
    """Token sequences (B, L_i, W_i) of several encoders -> (B, ΣL_i, ΣW_i), one after the other,
    each in its own feature columns (zeros elsewhere): one linear projection of the joined
    tokens is then exactly a separate projection per encoder."""
    b = parts[0].shape[0]
    out = np.zeros((b, sum(p.shape[1] for p in parts), sum(p.shape[2] for p in parts)), np.float32)
    row = col = 0
    for p in parts:
        out[:, row : row + p.shape[1], col : col + p.shape[2]] = p
        row, col = row + p.shape[1], col + p.shape[2]
    return out


def _map(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32) / 255.0).unsqueeze(1)


def to_conditions(model: ComposerModel, rows: Mapping[str, Any]) -> Conditions:
    """The model inputs for ``rows`` (keys as in the module docstring; others are ignored)."""
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    if "text" in rows and cfg.caption_encoder == "trainable":
        out["text_ids"] = model.tokenize([str(t) for t in rows["text"]])
    if cfg.caption_encoder != "trainable":
        keys = cfg.caption_encoder.split("+")
        if all(f"caption.{k}_sentence" in rows for k in keys):
            sentences = [np.asarray(rows[f"caption.{k}_sentence"], np.float32) for k in keys]
            out["caption_sentence"] = torch.from_numpy(np.concatenate(sentences, axis=-1))
            out["caption_tokens"] = torch.from_numpy(
                join_tokens([np.asarray(rows[f"caption.{k}_tokens"], np.float32) for k in keys])
            )
    if "semantics" in rows:
        out["semantics"] = torch.as_tensor(np.asarray(rows["semantics"], np.float32))
    elif "semantics.image" in rows:
        out["semantics_image"] = image_to_tensor(rows["semantics.image"])
    if "palette" in rows:
        out["palette"] = torch.as_tensor(np.asarray(rows["palette"], np.float32))
    for name in ("sketch", "depth", "intensity"):
        if name in rows:
            out[name] = _map(rows[name])
    if "instances" in rows:
        out["instances"] = torch.from_numpy(np.asarray(rows["instances"]).astype(np.int64))
    if "mask" in rows:
        mask = torch.from_numpy(np.asarray(rows["mask"]).astype(np.float32)).unsqueeze(1)
        if "mask.image" not in rows:
            raise ValueError("the mask condition needs the source image as 'mask.image'")
        out["mask"] = mask
        image = image_to_tensor(rows["mask.image"]).permute(0, 2, 3, 1).numpy()  # channels last, [-1, 1]
        masked = apply_mask(image, np.asarray(rows["mask"]))  # mid-gray (0) where regenerated
        out["masked_image"] = torch.from_numpy(masked).permute(0, 3, 1, 2)
    if "low_res" in rows:
        out["low_res"] = image_to_tensor(rows["low_res"])
        level = rows.get("low_res.level", np.zeros(len(out["low_res"]), np.int64))
        out["low_res_level"] = torch.from_numpy(np.asarray(level).astype(np.int64))
    return Conditions(**out)
