"""Condition fidelity: how closely a generated image follows the condition it was given.

The evaluation generates an image from a condition, re-extracts the same representation from
the generated image with the same extractor, and compares the two here (Composer, arXiv
2302.09778, §3.1 lists the representations). Every function is pure numpy/scipy/scikit-image,
takes one map ``(R, R)`` or a batch ``(B, R, R)`` (palettes ``(156,)`` / ``(B, 156)``) and returns
a ``float`` for one, a ``(B,)`` float64 array for a batch. ``condition_fidelity`` dispatches by
condition name; ``FIDELITY_METRICS`` says which way each metric is good, for tables.

Per condition:

- palette: histogram intersection and chi-squared on the 156-bin palette;
- sketch: edge precision / recall / F1 with a distance tolerance, and SSIM;
- instances: mIoU over the given instances after Hungarian matching of ids;
- depth: scale-and-shift-invariant RMSE;
- intensity: SSIM and PSNR;
- mask: the largest absolute change outside the mask (0 = kept exactly).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

from pipelines.conditions.palette import NUM_BINS, chi2, histogram_intersection

ConditionName = Literal["palette", "sketch", "instances", "depth", "intensity", "mask"]
Direction = Literal["higher is better", "lower is better"]

EDGE_THRESHOLD = 128  # sketch maps are 0 / 255 (Canny) or edge strength (networks): >= 128 is an edge
_SSIM_SIGMA = 1.5  # Wang et al. 2004: 11 x 11 Gaussian window, sigma 1.5 (skimage truncates at 3.5 sigma)
SSIM_MIN_SIDE = 11  # the Gaussian window's side; maps must be at least this big (32 px leaves 22 x 22)


class Metric(NamedTuple):
    name: str  # the key in condition_fidelity's result
    direction: Direction


HIGHER: Direction = "higher is better"
LOWER: Direction = "lower is better"

FIDELITY_METRICS: dict[ConditionName, tuple[Metric, ...]] = {
    "palette": (Metric("intersection", HIGHER), Metric("chi2", LOWER)),
    "sketch": (
        Metric("precision", HIGHER),
        Metric("recall", HIGHER),
        Metric("f1", HIGHER),
        Metric("ssim", HIGHER),
    ),
    "instances": (Metric("miou", HIGHER),),
    "depth": (Metric("rmse_ssi", LOWER),),
    "intensity": (Metric("ssim", HIGHER), Metric("psnr", HIGHER)),
    "mask": (Metric("max_abs_diff", LOWER),),
}


# -- input checks -----------------------------------------------------------------------------
def _maps(
    what: str, given: np.ndarray, got: np.ndarray, kind: Literal["uint8", "int"]
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Check a pair of (R, R) / (B, R, R) maps; return them as (B, R, R) and whether one was given."""
    given, got = np.asarray(given), np.asarray(got)
    if given.shape != got.shape:
        raise ValueError(f"{what}: given and got must have the same shape, got {given.shape} vs {got.shape}")
    if given.ndim not in (2, 3) or 0 in given.shape:
        raise ValueError(f"{what}: expected (R, R) or (B, R, R) maps, got shape {given.shape}")
    for name, a in (("given", given), ("got", got)):
        if kind == "uint8" and a.dtype != np.uint8:
            raise ValueError(f"{what}: {name} must be uint8, got {a.dtype}")
        if kind == "int" and not (np.issubdtype(a.dtype, np.integer) and (a >= 0).all()):
            raise ValueError(f"{what}: {name} must hold non-negative integer ids, got dtype {a.dtype}")
    single = given.ndim == 2
    return (given[None], got[None], True) if single else (given, got, False)


def _out(values: list[float] | np.ndarray, single: bool) -> float | np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return float(values[0]) if single else values


# -- palette ----------------------------------------------------------------------------------
def palette_fidelity(given: np.ndarray, got: np.ndarray) -> dict[str, float | np.ndarray]:
    """Palette distance between (156,) / (B, 156) histograms, each non-negative and summing to 1.

    ``intersection``: ``sum(min(a, b))`` (Swain & Ballard 1991) in [0, 1], 1 = equal, higher is
    better; ``chi2``: ``0.5 * sum((a - b)^2 / (a + b))`` in [0, 1], 0 = equal, lower is better.
    Both are the palette module's own functions, so evaluation and retrieval measure alike.
    """
    given, got = np.asarray(given, dtype=np.float64), np.asarray(got, dtype=np.float64)
    if given.shape != got.shape:
        raise ValueError(f"palette: given and got must have the same shape, got {given.shape} vs {got.shape}")
    if given.ndim not in (1, 2) or given.shape[-1] != NUM_BINS:
        raise ValueError(f"palette: expected ({NUM_BINS},) or (B, {NUM_BINS}) histograms, got {given.shape}")
    for name, a in (("given", given), ("got", got)):
        if not np.isfinite(a).all() or (a < 0).any():
            raise ValueError(f"palette: {name} must be finite and non-negative")
    single = given.ndim == 1
    return {
        "intersection": _out(np.atleast_1d(histogram_intersection(given, got)), single),
        "chi2": _out(np.atleast_1d(chi2(given, got)), single),
    }


# -- sketch -----------------------------------------------------------------------------------
def edge_f1(given: np.ndarray, got: np.ndarray, tolerance_px: float = 1) -> dict[str, float | np.ndarray]:
    """Edge precision, recall and F1 of (R, R) / (B, R, R) uint8 edge maps, each in [0, 1].

    A pixel is an edge where the map is >= 128. As BSDS boundary evaluation (Martin et al. 2004),
    simplified: a got edge pixel is correct if a given edge pixel lies within ``tolerance_px``
    (Euclidean, via a distance transform), and a given edge pixel is recalled if a got edge pixel
    lies within it; BSDS's one-to-one matching is left out, so a thick got edge along a thin
    given one is not penalised. ``tolerance_px=0`` asks for exact pixels; 1 forgives a 1 px shift
    along a row or column (not a diagonal one, which is sqrt(2) away).

    Empty maps: precision is 1 when got has no edge (nothing wrongly drawn) and recall is 1 when
    given has none (nothing to find). So empty vs empty is P = R = F1 = 1; empty given vs edges
    got is P = 0, R = 1, F1 = 0; edges given vs empty got is P = 1, R = 0, F1 = 0.
    """
    from scipy.ndimage import distance_transform_edt

    if not (tolerance_px >= 0 and np.isfinite(tolerance_px)):
        raise ValueError(f"edge_f1: tolerance_px must be a finite number >= 0, got {tolerance_px}")
    given, got, single = _maps("edge_f1", given, got, "uint8")
    scores = np.empty((len(given), 3))
    for i, (g, p) in enumerate(zip(given >= EDGE_THRESHOLD, got >= EDGE_THRESHOLD, strict=True)):
        n_g, n_p = int(g.sum()), int(p.sum())
        # distance_transform_edt measures the distance to the nearest zero, so invert the edges;
        # an edge-free map has no zero and is handled by the empty cases above instead.
        precision = (
            1.0 if n_p == 0 else 0.0 if n_g == 0 else (distance_transform_edt(~g)[p] <= tolerance_px).mean()
        )
        recall = (
            1.0 if n_g == 0 else 0.0 if n_p == 0 else (distance_transform_edt(~p)[g] <= tolerance_px).mean()
        )
        f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
        scores[i] = precision, recall, f1
    return {k: _out(scores[:, j], single) for j, k in enumerate(("precision", "recall", "f1"))}


# -- SSIM / PSNR ------------------------------------------------------------------------------
def ssim(a: np.ndarray, b: np.ndarray) -> float | np.ndarray:
    """SSIM of (R, R) / (B, R, R) uint8 maps (Wang et al. 2004), in [-1, 1], 1 = identical.

    ``skimage.metrics.structural_similarity`` with the paper's settings: data range 255, an
    11 x 11 Gaussian window of sigma 1.5, population covariances; the mean is over the pixels
    the window fits in (22 x 22 of 32 x 32). Two equal constant maps score 1. R must be >= 11.
    """
    from skimage.metrics import structural_similarity

    a, b, single = _maps("ssim", a, b, "uint8")
    if min(a.shape[1:]) < SSIM_MIN_SIDE:
        raise ValueError(f"ssim: maps must be at least {SSIM_MIN_SIDE} px a side, got {a.shape[1:]}")
    values = [
        structural_similarity(
            x, y, data_range=255, gaussian_weights=True, sigma=_SSIM_SIGMA, use_sample_covariance=False
        )
        for x, y in zip(a, b, strict=True)
    ]
    return _out(values, single)


def psnr(a: np.ndarray, b: np.ndarray) -> float | np.ndarray:
    """PSNR ``10 log10(255^2 / MSE)`` in dB of (R, R) / (B, R, R) uint8 maps, per map
    (``skimage.metrics.peak_signal_noise_ratio`` with data range 255).

    Identical maps give ``inf``, as the limit does; not capped here, because any cap is an
    arbitrary number that would then be averaged as if measured (the report caps it at
    ``PSNR_CAP`` for its means). Every other pair is finite (at most 20 log10(255 R) dB: ~78 dB
    at 32 px), so a table should average MSE or report a median rather than average PSNRs.
    """
    from skimage.metrics import peak_signal_noise_ratio

    a, b, single = _maps("psnr", a, b, "uint8")
    with np.errstate(divide="ignore"):  # identical maps: MSE 0, PSNR inf
        values = [peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(a, b, strict=True)]
    return _out(values, single)


# -- depth ------------------------------------------------------------------------------------
def depth_rmse_ssi(given: np.ndarray, got: np.ndarray) -> float | np.ndarray:
    """Scale-and-shift-invariant RMSE of (R, R) / (B, R, R) uint8 depth maps, in [0, 0.5].

    Both maps are scaled to [0, 1]; per map, ``s * got + t`` is fitted to ``given`` by least
    squares and the RMSE of the residual returned, 0 = equal up to scale and shift. The fit is
    the one MiDaS evaluates relative inverse depth with (Ranftl et al., TPAMI 2022, eq. 4), which
    our maps are (per-image normalised disparity). One change: ``s >= 0``. Our maps have a fixed
    sign (255 = nearest), so a near/far-swapped map must not score 0; where the free fit's ``s``
    is negative the best allowed fit is ``s = 0, t = mean(given)``, i.e. the RMSE is ``std(given)``.
    Constant maps: a constant ``got`` also leaves ``std(given)``; a constant ``given`` is matched by
    any ``got`` with ``s = 0`` and scores 0, as under any scale-invariant measure.
    """
    given, got, single = _maps("depth_rmse_ssi", given, got, "uint8")
    g = given.reshape(len(given), -1) / 255.0
    p = got.reshape(len(got), -1) / 255.0
    gc, pc = g - g.mean(1, keepdims=True), p - p.mean(1, keepdims=True)
    var_p = (pc**2).mean(1)
    # Closed form of the 2-parameter least squares on centred values; var_p == 0 (constant got)
    # leaves s free, and s = 0 is the minimum-norm choice.
    s = np.divide((gc * pc).mean(1), var_p, out=np.zeros_like(var_p), where=var_p > 0)
    s = np.maximum(s, 0.0)
    residual = gc - s[:, None] * pc
    return _out(np.sqrt((residual**2).mean(1)), single)


# -- instances --------------------------------------------------------------------------------
def instances_miou(given: np.ndarray, got: np.ndarray) -> float | np.ndarray:
    """Mean IoU over the given instances of (R, R) / (B, R, R) integer id maps, in [0, 1].

    Instance ids are arbitrary labels, so got's ids are matched one-to-one to given's to maximise
    the summed IoU (Hungarian algorithm, ``scipy.optimize.linear_sum_assignment``), then IoU is
    averaged over every given instance (id > 0), an unmatched one counting 0: the matched
    "instance mIoU" of segmentation benchmarks. Background (id 0) is not a class in the mean:
    it is usually most of the picture and trivially right, so including it would lift every
    score; it still counts through the unions, since a got instance spilling into the
    background lowers its IoU. Extra got instances are not penalised unless they overlap.
    No given instances: 1 if got has none either, else 0 (every got instance is spurious).
    """
    from scipy.optimize import linear_sum_assignment

    given, got, single = _maps("instances_miou", given, got, "int")
    values = []
    for g, p in zip(given, got, strict=True):
        g_ids, g_inv = np.unique(g, return_inverse=True)
        p_ids, p_inv = np.unique(p, return_inverse=True)
        # One joint histogram gives every pairwise intersection at once.
        inter = np.bincount(g_inv.ravel() * len(p_ids) + p_inv.ravel(), minlength=len(g_ids) * len(p_ids))
        inter = inter.reshape(len(g_ids), len(p_ids))
        union = inter.sum(1, keepdims=True) + inter.sum(0, keepdims=True) - inter
        iou = (inter / union)[g_ids > 0][:, p_ids > 0]  # union > 0: every id present has pixels
        if iou.shape[0] == 0:
            values.append(1.0 if iou.shape[1] == 0 else 0.0)
            continue
        rows, cols = linear_sum_assignment(iou, maximize=True)
        values.append(iou[rows, cols].sum() / iou.shape[0])
    return _out(values, single)


# -- mask -------------------------------------------------------------------------------------
def mask_preservation(source: np.ndarray, image: np.ndarray, mask: np.ndarray) -> float | np.ndarray:
    """Largest absolute difference between ``source`` and ``image`` outside the mask, per image.

    ``source``, ``image``: (R, R), (R, R, C), (B, R, R) or (B, R, R, C), same shape and dtype
    (uint8 for pictures, in grey levels); ``mask``: (R, R) / (B, R, R) in {0, 1}, 1 = regenerate
    (Composer §3.1 "Masking"). A batch is recognised by the mask being 3-d. Returns >= 0, and 0
    exactly when every kept pixel is unchanged, which masked editing must achieve; no pixel kept
    (an all-ones mask) also gives 0.
    """
    source, image, mask = np.asarray(source), np.asarray(image), np.asarray(mask)
    if source.shape != image.shape or source.dtype != image.dtype:
        raise ValueError(
            f"mask_preservation: source and image must match, got {source.shape} {source.dtype} "
            f"vs {image.shape} {image.dtype}"
        )
    if mask.ndim not in (2, 3) or source.shape[: mask.ndim] != mask.shape or source.ndim > mask.ndim + 1:
        raise ValueError(
            f"mask_preservation: mask must be (R, R) or (B, R, R) with images of shape mask.shape or "
            f"mask.shape + (C,), got mask {mask.shape} and images {source.shape}"
        )
    if not (mask.dtype == bool or np.issubdtype(mask.dtype, np.integer)) or not np.isin(mask, (0, 1)).all():
        raise ValueError(f"mask_preservation: mask must hold only 0 and 1, got dtype {mask.dtype}")
    if not np.issubdtype(source.dtype, np.number):
        raise ValueError(f"mask_preservation: images must be numeric, got {source.dtype}")
    single = mask.ndim == 2
    if single:
        source, image, mask = source[None], image[None], mask[None]
    diff = np.abs(source.astype(np.float64) - image)
    if diff.ndim == 4:
        diff = diff.max(-1)  # a pixel changes when any of its channels does
    return _out(np.where(mask.astype(bool), 0.0, diff).max(axis=(1, 2)), single)


# -- dispatch ---------------------------------------------------------------------------------
def condition_fidelity(
    name: ConditionName, given: np.ndarray, got: np.ndarray, **kw
) -> dict[str, float | np.ndarray]:
    """The fidelity metrics of condition ``name``, keyed as in ``FIDELITY_METRICS[name]``.

    ``given`` is the condition the image was generated from, ``got`` the same representation
    re-extracted from the generated image; shapes as the per-metric functions. For ``mask``,
    ``given`` is the source image, ``got`` the generated one and ``mask=`` is required.
    Extra keywords go to the metric that takes them (``tolerance_px`` for ``sketch``).
    """
    if name not in FIDELITY_METRICS:
        raise ValueError(f"unknown condition {name!r} for fidelity; known: {', '.join(FIDELITY_METRICS)}")
    if name == "mask":
        if set(kw) != {"mask"}:
            raise ValueError(f"mask fidelity takes exactly one keyword, mask=, got {sorted(kw)}")
        return {"max_abs_diff": mask_preservation(given, got, kw["mask"])}
    allowed = {"tolerance_px"} if name == "sketch" else set()
    if set(kw) - allowed:
        raise ValueError(f"{name} fidelity got unexpected keywords {sorted(set(kw) - allowed)}")
    if name == "palette":
        return palette_fidelity(given, got)
    if name == "sketch":
        return {**edge_f1(given, got, **kw), "ssim": ssim(given, got)}
    if name == "instances":
        return {"miou": instances_miou(given, got)}
    if name == "depth":
        return {"rmse_ssi": depth_rmse_ssi(given, got)}
    return {"ssim": ssim(given, got), "psnr": psnr(given, got)}
