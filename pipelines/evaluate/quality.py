"""Image quality of generated images: FID, KID and CLIP score, from local weights only.

Composer (arXiv 2302.09778) reports zero-shot FID on COCO the way Imagen and eDiffi do: one image
per caption, compared with real images. ``fid_kid`` and ``clip_score`` compute the metrics of that
protocol; the caller (``pipelines/evaluate/run.py``) chooses captions and real images.

- FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) use the 2048-d pool features of the
  TensorFlow FID Inception v3 as ported to PyTorch (``pt_inception-2015-12-05-6726825d.pth``, the
  file of pytorch-fid and torch-fidelity), run by torch-fidelity's ``FeatureExtractorInceptionV3``,
  which resizes inside the network exactly like the TensorFlow original (see ``INCEPTION_RESIZE``).
  KID is torch-fidelity's (polynomial kernel of degree 3, unbiased MMD², seeded subsets).
- CLIP score (Hessel et al. 2021) is the mean of ``100 * max(cos(image, caption), 0)``, as
  torchmetrics' ``CLIPScore``, with an open_clip model given like ``semantics.clip_model``.

Nothing is downloaded: a metric whose weights are not configured or not on disk is reported by
``unavailable`` and raises ``ValueError`` (naming the config key) when called. The Inception file's
sha256 is recorded with the numbers; only the reference file gives FIDs comparable to papers.
``inception_features`` and ``fid_kid_from_features`` split ``fid_kid`` so that the features of a
fixed reference set can be computed once and reused.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal
from unittest import mock

import numpy as np
from pydantic import Field, StrictInt, model_validator

from pipelines.conditions.base import ExtractorUnavailable
from pipelines.conditions.semantics import (
    LOCAL_DIR,
    check_open_clip_spec,
    no_clip_model_reason,
    open_clip_model_cfg,
    resolve_open_clip,
)
from pipelines.config import Config, resource

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"
INCEPTION_SIZE = 299  # the FID Inception's input side; every image is resized to it inside the network
INCEPTION_RESIZE = (
    f"bilinear to {INCEPTION_SIZE}x{INCEPTION_SIZE} as TensorFlow 1.x resize_bilinear "
    "(torch-fidelity interpolate_bilinear_2d_like_tensorflow1x: align_corners=False, no half-pixel "
    "offset, no antialiasing) on the uint8 values as float32"
)
# torch-fidelity's default KID seed, so the subsets (and numbers) match its own calculate_metrics.
KID_SEED = 2020


class QualityConfig(Config):
    """``quality`` section of the evaluation config: where the metrics' weights are, and KID's sampling."""

    # The FID Inception (torch-fidelity / pytorch-fid format); FID and KID need it, None skips them.
    inception_weights: str | None = None
    # The CLIP of the CLIP score: 'local-dir:/path' or 'hf-hub:org/repo' (local cache only), as semantics.
    clip_model: str | None = None
    # Bińkowski et al.'s subset size; clipped to the sample counts. >= 2: the unbiased MMD²
    # averages over pairs of distinct samples.
    kid_subset_size: StrictInt = Field(1000, ge=2)
    kid_subsets: StrictInt = Field(
        100, ge=1
    )  # subsets averaged for KID's mean and std (torch-fidelity's default)
    batch_size: StrictInt = resource(32, ge=1)  # images per Inception / CLIP forward
    device: Literal["auto", "cpu", "cuda"] = resource("auto")  # auto: cuda when torch sees one

    @model_validator(mode="after")
    def _check(self) -> QualityConfig:
        if self.inception_weights is not None and not str(self.inception_weights).strip():
            raise ValueError("quality.inception_weights must be a file path or null, got an empty string")
        check_open_clip_spec(self.clip_model, "quality.clip_model")
        return self


# -- availability -------------------------------------------------------------------------------
def no_inception_reason() -> str:
    return (
        f"no FID Inception weights configured; set quality.inception_weights to a local copy of "
        f"{INCEPTION_FILE}. Nothing is downloaded here: on a machine with internet run "
        f"`wget {INCEPTION_URL}` (torch-fidelity's weights-inception-2015-12-05-6726825d.pth is the same "
        f"network) and copy the file over"
    )


def _read_inception(cfg: QualityConfig) -> tuple[dict[str, Any], str]:
    """The Inception state dict and the file's sha256; ``ValueError`` saying what is wrong."""
    import torch

    if cfg.inception_weights is None:
        raise ValueError(no_inception_reason())
    path = Path(cfg.inception_weights).expanduser()
    if not path.is_file():
        raise ValueError(f"quality.inception_weights: {str(path)!r} is not a file ({no_inception_reason()})")
    data = path.read_bytes()
    # weights_only: a plain state dict loads, a pickle that would run code does not. This state
    # dict is what the network gets (_load_inception): the file is never unpickled otherwise.
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(
            f"quality.inception_weights: {str(path)!r} is not a loadable torch state dict "
            f"({type(e).__name__}: {str(e)[:200]})"
        ) from e
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if not hasattr(fc, "shape") or tuple(fc.shape) != (1008, 2048):
        raise ValueError(
            f"quality.inception_weights: {str(path)!r} is not the FID Inception v3 state dict "
            f"(expected {INCEPTION_FILE}: torchvision-style keys and a 1008-way 'fc.weight' of shape (1008, 2048))"
        )
    return state, hashlib.sha256(data).hexdigest()


def _clip_dir(cfg: QualityConfig) -> str:
    """The local open_clip directory of ``cfg.clip_model``; ``ValueError`` saying what is wrong."""
    if cfg.clip_model is None:
        raise ValueError(no_clip_model_reason("quality.clip_model"))
    try:
        return resolve_open_clip(cfg.clip_model, "quality.clip_model")
    except ExtractorUnavailable as e:
        raise ValueError(str(e)) from e


def unavailable(cfg: QualityConfig) -> dict[str, str]:
    """Metric family ("fid", "kid", "clip_score") -> why it cannot run; empty when all can.

    Reads the Inception file (to check it is the right state dict) and the CLIP directory's
    listing; never downloads.
    """
    out: dict[str, str] = {}
    try:
        _read_inception(cfg)
    except ValueError as e:
        out["fid"] = out["kid"] = str(e)
    try:
        _clip_dir(cfg)
    except ValueError as e:
        out["clip_score"] = str(e)
    return out


# -- inputs -------------------------------------------------------------------------------------
def _check_images(name: str, images: Any, min_n: int, why: str) -> int:
    if not isinstance(images, np.ndarray):
        raise ValueError(f"{name}: expected a numpy array (N, H, W, 3) uint8, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise ValueError(f"{name}: expected uint8 RGB in [0, 255], got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3 or 0 in images.shape[1:3]:
        raise ValueError(f"{name}: expected shape (N, H, W, 3), got {images.shape}")
    if len(images) < min_n:
        raise ValueError(f"{name}: {why} needs at least {min_n} images, got {len(images)}")
    return len(images)


def _device(cfg: QualityConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("quality.device is 'cuda' but torch sees no CUDA device; use 'cpu' or 'auto'")
    return cfg.device


def _sizes(**images: np.ndarray) -> str:
    """'32x32' when every set has that size, else 'real 256x256, fake 64x64'."""
    sizes = {name: f"{a.shape[1]}x{a.shape[2]}" for name, a in images.items()}
    if len(set(sizes.values())) == 1:
        return next(iter(sizes.values()))
    return ", ".join(f"{name} {size}" for name, size in sizes.items())


# -- FID / KID ----------------------------------------------------------------------------------
class _TorchLoading:
    """``torch``, except that ``load`` returns ``state`` (see ``_load_inception``)."""

    def __init__(self, state: dict[str, Any]):
        self._state = state

    def load(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self._state

    def __getattr__(self, name: str) -> Any:
        import torch

        return getattr(torch, name)


def _load_inception(cfg: QualityConfig) -> tuple[Any, str]:
    """torch-fidelity's FID Inception on ``cfg.device`` and its record '<file> sha256:<12 hex>'."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity_inception
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    state, digest = _read_inception(cfg)
    path = Path(str(cfg.inception_weights)).expanduser()
    try:
        # torch-fidelity would unpickle the weights path itself, with no weights-only check; its module is
        # handed a torch whose load returns the state dict checked above instead.
        with mock.patch.object(fidelity_inception, "torch", _TorchLoading(state)):
            net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
            )
    except RuntimeError as e:  # load_state_dict: missing / unexpected keys or wrong shapes
        raise ValueError(
            f"quality.inception_weights: {str(path)!r} does not fit torch-fidelity's FID Inception v3 "
            f"({str(e)[:300]})"
        ) from e
    return net.to(_device(cfg)).eval(), f"{path.name} sha256:{digest[:12]}"


def _features(net: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
    import torch

    device = next(net.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))
            (feats,) = net(x.to(device).permute(0, 3, 1, 2))  # uint8 in; resized to 299 inside
            out.append(feats.double().cpu().numpy())
    return np.concatenate(out)


def inception_features(images: np.ndarray, cfg: QualityConfig) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> (N, 2048) float64 pool features of the FID Inception (N >= 1)."""
    _check_images("images", images, 1, "feature extraction")
    net, _ = _load_inception(cfg)
    return _features(net, images, cfg.batch_size)


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """FID's Fréchet distance of two (N, D) feature sets (Heusel et al. 2017, eq. 6), >= 0.

    ``|mu_r - mu_f|² + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^½)`` with unbiased covariances: the value
    pytorch-fid / torch-fidelity / torchmetrics compute. They take ``tr((S_r S_f)^½)`` from a general
    eigendecomposition of the D x D product (2048 x 2048: ~25 s of CPU, minutes on a busy 2-core
    machine). We write the smaller set's covariance as ``S_s = BᵀB`` (B: its centred features /
    sqrt(N - 1) when N <= D, else the symmetric square root); the nonzero eigenvalues of S_s S_o are
    those of the symmetric PSD ``B S_o Bᵀ``, which is N x N when N <= D. So a few hundred samples
    cost milliseconds, and large sets one ``eigh`` and one ``eigvalsh`` (~0.6x the general one).
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"features: expected (N, D) and (M, D) arrays, got {real.shape} and {fake.shape}")
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"features: FID needs at least 2 samples per set, got {len(real)} and {len(fake)}")
    d = real.shape[1]
    small, large = ((f - f.mean(0)) / math.sqrt(len(f) - 1) for f in sorted((real, fake), key=len))  # S = aᵀa
    traces = np.square(small).sum() + np.square(large).sum()
    if len(small) > d:
        w, v = np.linalg.eigh(small.T @ small)
        small = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    if len(large) <= d:  # B S_o Bᵀ = (B a_oᵀ)(B a_oᵀ)ᵀ: its eigenvalues' roots are singular values
        tr_sqrt = np.linalg.svd(small @ large.T, compute_uv=False).sum()
    else:
        eig = np.linalg.eigvalsh(small @ (large.T @ large) @ small.T)
        tr_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = real.mean(0) - fake.mean(0)
    return max(float(diff @ diff + traces - 2 * tr_sqrt), 0.0)  # identical sets can round to -1e-13


def fid_kid_from_features(real: np.ndarray, fake: np.ndarray, cfg: QualityConfig) -> dict[str, Any]:
    """FID and KID of (N, D) / (M, D) Inception features (N, M >= 2); see ``fid_kid``."""
    import torch
    from torch_fidelity.metric_kid import kid_features_to_metric

    fid = frechet_distance(real, fake)
    subset = min(cfg.kid_subset_size, len(real), len(fake))
    kid = kid_features_to_metric(
        torch.from_numpy(np.asarray(real, np.float64)),
        torch.from_numpy(np.asarray(fake, np.float64)),
        kid_subsets=cfg.kid_subsets,
        kid_subset_size=subset,
        rng_seed=KID_SEED,
        verbose=False,
    )
    return {
        "fid": fid,
        "kid_mean": kid["kernel_inception_distance_mean"],
        "kid_std": kid["kernel_inception_distance_std"],
        "n_real": len(real),
        "n_fake": len(fake),
        "kid_subset_size": subset,
    }


def fid_kid(real: np.ndarray, fake: np.ndarray, cfg: QualityConfig) -> dict[str, Any]:
    """FID and KID of generated images against real ones, on the FID Inception's features.

    real (N, H, W, 3), fake (M, H, W, 3) uint8 RGB, N, M >= 2 (sizes may differ: each image is
    resized to 299 x 299 inside the network) -> {"fid", "kid_mean", "kid_std": float, "n_real",
    "n_fake", "kid_subset_size": int, "resize": str, "inception": "<file> sha256:<12 hex>"}.
    KID's subsets are ``min(kid_subset_size, N, M)`` samples drawn with a fixed seed, so a rerun
    gives the same numbers; it is an unbiased estimate and can be slightly negative. Both are
    biased by small N (papers use 10k-30k images); compare numbers at equal N only.
    """
    _check_images("real", real, 2, "FID (a covariance)")
    _check_images("fake", fake, 2, "FID (a covariance)")
    net, record = _load_inception(cfg)
    out = fid_kid_from_features(
        _features(net, real, cfg.batch_size), _features(net, fake, cfg.batch_size), cfg
    )
    out["resize"] = f"{_sizes(real=real, fake=fake)} -> {INCEPTION_RESIZE}"
    out["inception"] = record
    return out


def fid_kid_sets(
    real: np.ndarray, fakes: dict[str, np.ndarray], cfg: QualityConfig
) -> dict[str, dict[str, Any]]:
    """``fid_kid`` of several generated sets against one real set: the network is loaded and the
    real features are computed once. name -> ``fid_kid``'s result."""
    _check_images("real", real, 2, "FID (a covariance)")
    for name, fake in fakes.items():
        _check_images(name, fake, 2, "FID (a covariance)")
    net, record = _load_inception(cfg)
    real_f = _features(net, real, cfg.batch_size)
    out = {}
    for name, fake in fakes.items():
        res = fid_kid_from_features(real_f, _features(net, fake, cfg.batch_size), cfg)
        res["resize"] = f"{_sizes(real=real, fake=fake)} -> {INCEPTION_RESIZE}"
        res["inception"] = record
        out[name] = res
    return out


# -- CLIP score ---------------------------------------------------------------------------------
def _clip_variant(spec: str, model_cfg: dict[str, Any]) -> str:
    """'<open_clip architecture> (<spec>)': the built-in config equal to the checkpoint's, if any."""
    import open_clip

    for name in open_clip.list_models():
        if open_clip.get_model_config(name) == model_cfg:
            return f"{name} ({spec})"
    return f"custom open_clip model_cfg, embed_dim {model_cfg.get('embed_dim')} ({spec})"


def _clip_resize(preprocess_cfg: dict[str, Any], sizes: str) -> str:
    """What open_clip's eval transform (``image_transform``) does to the images, in words."""
    size = preprocess_cfg["size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    # open_clip uses bicubic for anything but 'bilinear' at inference ('random' included).
    interp = "bilinear" if preprocess_cfg.get("interpolation") == "bilinear" else "bicubic"
    how = {
        "shortest": f"scale the shorter side to fit, center crop {h}x{w}",
        "longest": f"scale the longer side to fit, center pad/crop to {h}x{w}",
        "squash": f"resize to {h}x{w} without keeping the aspect ratio",
    }[preprocess_cfg.get("resize_mode") or "shortest"]
    return f"{sizes} -> open_clip eval transform: PIL {interp} (antialiased), {how}"


def clip_score(images: np.ndarray, captions: Sequence[str], cfg: QualityConfig) -> dict[str, Any]:
    """CLIP score of images with their captions (Hessel et al. 2021, as torchmetrics CLIPScore).

    images (N, H, W, 3) uint8 RGB, N >= 1, captions N strings (open_clip's tokenizer truncates
    them to the model's context length) -> {"clip_score": mean of 100 * max(cos, 0) in [0, 100],
    "n": N, "clip_variant": str, "resize": str}. Images go through the model's own eval transform
    (PIL, one image at a time), as the CLIP score's reference implementation does.
    """
    n = _check_images("images", images, 1, "the CLIP score")
    if isinstance(captions, str) or len(captions) != n:
        got = "one string" if isinstance(captions, str) else f"{len(captions)} captions"
        raise ValueError(f"captions: expected one caption per image ({n}), got {got}")
    bad = [i for i, c in enumerate(captions) if not isinstance(c, str)]
    if bad:
        raise ValueError(
            f"captions: expected strings, got {type(captions[bad[0]]).__name__} at index {bad[0]}"
        )
    directory = _clip_dir(cfg)

    import open_clip
    import torch
    import torch.nn.functional as F
    from PIL import Image

    device = _device(cfg)
    name = f"{LOCAL_DIR}{directory}"
    # require_pretrained: open_clip would otherwise only warn and score with random weights.
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device, require_pretrained=True)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name)
    scores = []
    with torch.no_grad():
        for start in range(0, n, cfg.batch_size):
            stop = start + cfg.batch_size
            pixels = torch.stack([preprocess(Image.fromarray(im)) for im in images[start:stop]])
            tokens = tokenizer([str(c) for c in captions[start:stop]])
            img = F.normalize(model.encode_image(pixels.to(device)).float(), dim=-1)
            txt = F.normalize(model.encode_text(tokens.to(device)).float(), dim=-1)
            scores.append((100 * (img * txt).sum(-1)).clamp(min=0).cpu())
    return {
        "clip_score": float(torch.cat(scores).double().mean()),
        "n": n,
        "clip_variant": _clip_variant(str(cfg.clip_model), open_clip_model_cfg(directory)),
        "resize": _clip_resize(dict(model.visual.preprocess_cfg), _sizes(images=images)),
    }
