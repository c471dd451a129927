"""``palette``: the smoothed CIELab colour histogram of an image, Composer §3.1 ("Color").

Composer represents colour statistics by "the smoothed CIELab histogram [Rayleigh]", quantising
CIELab into 11 hue, 5 saturation and 5 light values with a smoothing sigma of 10, a 156-d vector.
The 156 bins and the smoothing follow the authors' released code, the Rayleigh ``Palette`` as
modified by Alibaba for VideoComposer:
``modelscope/modelscope: modelscope/models/multi_modal/videocomposer/annotator/histogram/palette.py``
(ali-vilab/videocomposer ships it as ``tools/annotator/histogram/palette.py``), whose default
``Palette(num_hues=11, num_sat=5, num_light=4)`` has exactly 156 bins:

- 143 chromatic bins, ``k = 13 * hue + row`` for 11 HSV hues
  (0, .0833, .166, .25, .333, .5, .56333, .666, .73, .803, .916) and 13 rows of (S, V):
  rows 0-4 S = 1/6 .. 5/6 at V = 1; row 5 S = 1, V = 1; rows 6-9 S = 1, V = .84, .68, .52, .36;
  rows 10-12 S = .4, V = .84, .68, .52.
- 13 achromatic bins ``143 + j``, gray level ``1 - j / 12`` (143 = white, 155 = black).

Each bin's centre is that HSV colour converted to CIELab (sRGB, D65, as ``skimage.color``); a
pixel goes to the nearest centre in Lab; the histogram is smoothed with the authors' row-normalised
Gaussian kernel over the squared Lab distances between centres and values below 1e-5 are zeroed.
Two changes from the authors' code, both stated where they happen: the smoothed histogram is
renormalised to sum to 1 (theirs sums to about 1), and sigma defaults to the paper's 10 (their
``histogram()`` defaults to 20).
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable

import numpy as np
from pydantic import Field

from pipelines.conditions.base import Batch, ColumnSpec, Extractor, ExtractorConfig
from pipelines.config import resource
from pipelines.files import atomic_write

NUM_BINS = 156
# The authors' hue table for num_hues=11 (not evenly spaced: more bins where hue names change fast).
_HUES = np.array([0.0, 0.0833, 0.166, 0.25, 0.333, 0.5, 0.56333, 0.666, 0.73, 0.803, 0.916])
_NUM_SAT, _NUM_LIGHT = 5, 4
_ROWS = _NUM_SAT + 2 * _NUM_LIGHT  # 13 (S, V) rows per hue, and 13 gray levels
_FLOOR = 1e-5  # the authors zero smoothed bins below this (hist[hist < 1e-5] = 0)

# sRGB (D65) -> XYZ and the D65 2-degree white point, exactly as skimage.color.rgb2lab uses them.
_XYZ_FROM_RGB = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_WHITE = np.array([0.95047, 1.0, 1.08883])


DEFAULT_SIGMA = 10.0  # Lab smoothing width, Composer §3.1 ("smoothing sigma of 10")


class PaletteConfig(ExtractorConfig):
    sigma: float = Field(DEFAULT_SIGMA, ge=0, allow_inf_nan=False)  # 0 = no smoothing
    batch_size: int = resource(256, ge=1)  # pure numpy over a lookup table: big batches cost nothing


# -- the bin layout ---------------------------------------------------------------------------
def _linear_to_lab(lin: np.ndarray) -> np.ndarray:
    """(..., 3) linear-light sRGB -> (..., 3) float64 CIELab (D65).

    Elementwise products rather than a matrix product, so a colour's Lab value does not depend
    on how many colours are converted with it (BLAS may change the summation order with shape).
    """
    m = _XYZ_FROM_RGB / _WHITE[:, None]
    xyz = lin[..., 0:1] * m[:, 0] + lin[..., 1:2] * m[:, 1] + lin[..., 2:3] * m[:, 2]
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return np.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    c = np.asarray(c, dtype=np.float64)
    return np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)


_LINEAR_U8 = _srgb_to_linear(np.arange(256) / 255.0)  # the sRGB decoding of every 8-bit value


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB, uint8 or float in [0, 1] -> (..., 3) float64 CIELab (D65), as ``skimage.color.rgb2lab``."""
    rgb = np.asarray(rgb)
    lin = _LINEAR_U8[rgb] if rgb.dtype == np.uint8 else _srgb_to_linear(rgb)
    return _linear_to_lab(lin)


def _hsv2rgb(hsv: np.ndarray) -> np.ndarray:
    """(..., 3) float64 HSV in [0, 1] -> sRGB, the arithmetic of ``skimage.color.hsv2rgb`` (the
    authors' conversion) without importing scikit-image, which takes longer than the rest of a
    worker's first palette."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    hi = np.floor(h * 6)
    f = h * 6 - hi
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    hi = np.stack([hi, hi, hi], axis=-1).astype(np.uint8) % 6
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    return np.choose(hi, np.stack([np.stack(c, axis=-1) for c in choices]))


@functools.lru_cache(maxsize=1)
def _centres_rgb() -> np.ndarray:
    """(156, 3) float64 sRGB in [0, 1] of the bin centres, in the authors' bin order."""
    sats = np.hstack([np.linspace(0, 1, _NUM_SAT + 2)[1:-1], 1, [1] * _NUM_LIGHT, [0.4] * (_NUM_LIGHT - 1)])
    lights = np.hstack(
        [
            [1] * _NUM_SAT,
            1,
            np.linspace(1, 0.2, _NUM_LIGHT + 2)[1:-1],
            np.linspace(1, 0.2, _NUM_LIGHT + 2)[1:-2],
        ]
    )
    hsv = np.stack(np.broadcast_arrays(_HUES[:, None], sats[None, :], lights[None, :]), axis=-1)
    chroma = _hsv2rgb(hsv).reshape(-1, 3)  # (11 * 13, 3), k = 13 * hue + row as in the authors' code
    gray = np.repeat(np.linspace(1, 0, _ROWS)[:, None], 3, axis=1)
    return np.vstack([chroma, gray])


def bin_centres() -> np.ndarray:
    """(156, 3) float32 CIELab (L in [0, 100]) of the bin centres; layout in the module docstring."""
    return srgb_to_lab(_centres_rgb()).astype(np.float32)


def bin_colours() -> np.ndarray:
    """(156, 3) uint8 sRGB of the bin centres, for drawing."""
    return np.clip(np.rint(_centres_rgb() * 255), 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _smoothing(sigma: float) -> np.ndarray:
    """(156, 156) float64 row-normalised Gaussian over squared Lab distances (authors' ``weight``)."""
    lab = srgb_to_lab(_centres_rgb())
    d2 = ((lab[:, None, :] - lab[None, :, :]) ** 2).sum(-1)
    w = np.exp(-d2 / (2.0 * sigma**2))
    return w / w.sum(1, keepdims=True)


@functools.lru_cache(maxsize=1)
def _tree():
    from scipy.spatial import cKDTree

    return cKDTree(srgb_to_lab(_centres_rgb()))


def _nearest_bins(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 sRGB -> (N,) int64 index of the nearest bin centre in Lab (exact search)."""
    if rgb.dtype != np.uint8:
        raise ValueError(f"palette: expected uint8 sRGB, got {rgb.dtype}")
    return _tree().query(srgb_to_lab(rgb), workers=-1)[1]


@functools.lru_cache(maxsize=1)
def _bin_table() -> np.ndarray:
    """(2**24,) uint8: the exact nearest bin of every 8-bit sRGB colour ``r << 16 | g << 8 | b``.

    Every pixel's bin is then one gather. The table takes ~3 s to compute, so it is computed once
    per machine and cached (``_cached``)."""

    def compute() -> np.ndarray:
        table = np.empty(1 << 24, np.uint8)
        step = 1 << 20
        for start in range(0, 1 << 24, step):
            packed = np.arange(start, start + step, dtype=np.uint32)
            table[start : start + step] = _nearest_bins(_unpack(packed))
        return table

    return _cached("palette-bins", compute)


@functools.lru_cache(maxsize=1)
def _bin_table_rgba() -> np.ndarray:
    """``_bin_table`` indexed by ``r | g << 8 | b << 16`` (a little-endian RGBA word, alpha masked);
    cached too: permuting the table takes a worker's first palette a tenth of a second."""

    def compute() -> np.ndarray:
        return np.ascontiguousarray(_bin_table().reshape(256, 256, 256).transpose(2, 1, 0)).reshape(-1)

    return _cached("palette-bins-rgba", compute)


def _cached(name: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """A (2**24,) uint8 table, cached in ``$RECOMPOSE_CACHE`` (default ``~/.cache/recompose``) as
    ``<name>-<hash of the bin centres>.npy``; an unreadable cache is recomputed, an unwritable one
    skipped."""
    import hashlib
    import os
    from pathlib import Path

    key = hashlib.sha256(bin_centres().tobytes()).hexdigest()[:16]
    cache = Path(os.environ.get("RECOMPOSE_CACHE", Path.home() / ".cache" / "recompose"))
    path = cache / f"{name}-{key}.npy"
    try:
        table = np.load(path, allow_pickle=False)
        if table.shape == (1 << 24,) and table.dtype == np.uint8:
            return table
    except (OSError, ValueError):
        pass
    table = compute()
    try:
        atomic_write(path, lambda f: np.save(f, table, allow_pickle=False))
    except OSError:
        pass  # a read-only cache: compute the table again next time
    return table


def _unpack(packed: np.ndarray) -> np.ndarray:
    return np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], axis=-1).astype(np.uint8)


def _bins_of(packed: np.ndarray) -> np.ndarray:
    """Packed ``r << 16 | g << 8 | b`` colours (any shape, uint32) -> their bins (uint8)."""
    return _bin_table()[packed]


# -- histograms -------------------------------------------------------------------------------
def smooth_histogram(hist: np.ndarray, sigma: float) -> np.ndarray:
    """(B, 156) raw histograms -> (B, 156) float64 smoothed histograms, each summing to 1.

    The authors' smoothing (``hist = (weight * hist).sum(1)``, then zeroing below 1e-5), computed
    as an elementwise product and a sum over the last axis rather than a matrix product, so each
    row's arithmetic is the same whatever the batch size (BLAS may change order with the shape).
    """
    h = np.asarray(hist, dtype=np.float64)
    h = h / np.maximum(h.sum(-1, keepdims=True), 1e-300)
    if sigma > 0:
        w = _smoothing(float(sigma))
        out = np.empty_like(h)
        for s in range(0, len(h), 64):  # 64 rows at a time: (64, 156, 156) float64 is 12 MiB
            out[s : s + 64] = (h[s : s + 64, None, :] * w[None]).sum(-1)
        out[out < _FLOOR] = 0.0
        # Deviation from the authors: renormalise, so palettes compare as distributions.
        h = out / out.sum(-1, keepdims=True)
    return h


def palette_of(images: np.ndarray, sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """(B, H, W, 3) uint8 sRGB -> (B, 156) float64 smoothed CIELab histograms summing to 1."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"palette: expected (B, H, W, 3) uint8 images, got {images.dtype}{images.shape}")
    b, h, w, _ = images.shape
    if sys.byteorder == "little":
        # An RGBA copy read as uint32 is r | g << 8 | b << 16 | a << 24: one C call per image
        # instead of three shifts over uint32 copies (~8x faster); the table is permuted to match.
        import cv2

        # Image by image, so the keys and bins stay in cache and no batch-sized temporaries are
        # allocated (~1.6x faster than one gather and one offset bincount over the whole batch).
        table = _bin_table_rgba()
        counts = np.empty((b, NUM_BINS), np.int64)
        for i, im in enumerate(images):
            keys = cv2.cvtColor(np.ascontiguousarray(im), cv2.COLOR_RGB2RGBA).view(np.uint32).reshape(-1)
            keys &= 0xFFFFFF
            counts[i] = np.bincount(table[keys], minlength=NUM_BINS)
    else:
        px = images.reshape(b, h * w, 3).astype(np.uint32)
        bins = _bins_of((px[..., 0] << 16) | (px[..., 1] << 8) | px[..., 2])
        # One bincount for the whole batch: row i's bins are offset by i * 156.
        ids = bins.astype(np.int64) + (np.arange(b, dtype=np.int64) * NUM_BINS)[:, None]
        counts = np.bincount(ids.ravel(), minlength=b * NUM_BINS).reshape(b, NUM_BINS)
    return smooth_histogram(counts, sigma)


_HEX = re.compile(r"^#?([0-9a-fA-F]{6}|[0-9a-fA-F]{3})$")


def parse_hex(colour: str) -> tuple[int, int, int]:
    """``'#ff8800'``, ``'ff8800'`` or ``'#f80'`` -> (255, 136, 0)."""
    m = _HEX.match(colour.strip())
    if not m:
        raise ValueError(f"palette colour {colour!r} is not a hex colour like '#ff8800' or '#f80'")
    h = m.group(1)
    if len(h) == 3:
        h = "".join(ch * 2 for ch in h)
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def palette_from_hex(
    colours: list[str], weights: list[float] | None = None, sigma: float = DEFAULT_SIGMA
) -> np.ndarray:
    """(156,) float32: the palette of an image painted with ``colours`` in proportions ``weights``.

    Equal proportions when ``weights`` is None. This is what ``--palette '#ff0000,#00ff00'`` means.
    """
    if not colours:
        raise ValueError("palette_from_hex: give at least one colour")
    rgb = np.array([parse_hex(c) for c in colours], dtype=np.uint8)
    if weights is None:
        w = np.ones(len(colours))
    else:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (len(colours),):
            raise ValueError(f"palette_from_hex: {len(colours)} colours but {w.size} weights")
        if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
            raise ValueError(f"palette_from_hex: weights must be >= 0 with a positive sum, got {list(w)}")
    hist = np.bincount(_nearest_bins(rgb), weights=w, minlength=NUM_BINS)
    return smooth_histogram(hist[None], sigma)[0].astype(np.float32)


# -- comparing and showing palettes ---------------------------------------------------------
def histogram_intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Similarity ``sum(min(a, b))`` over the last axis: 1 for equal normalised palettes, 0 disjoint."""
    a, b = _pair(a, b)
    return np.minimum(a, b).sum(-1)


def chi2(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Distance ``0.5 * sum((a - b)**2 / (a + b))`` over the last axis (0/0 terms count 0); in [0, 1]."""
    a, b = _pair(a, b)
    s = a + b
    terms = np.divide((a - b) ** 2, s, out=np.zeros_like(s), where=s > 0)
    return 0.5 * terms.sum(-1)


def _pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"palette distance: shapes differ, {a.shape} vs {b.shape}")
    return a, b


def render_palette(
    hist: np.ndarray, width: int = 256, height: int = 32, percentile: float = 90
) -> np.ndarray:
    """(156,) palette -> (height, width, 3) uint8 picture: bars of the bin colours, widest first.

    As the authors' ``get_palette_image``: only bins above the ``percentile``-th percentile of the
    palette are drawn (all non-zero bins when none is), with widths proportional to their mass;
    unlike theirs, the bars fill the whole width.
    """
    h = np.asarray(hist, dtype=np.float64)
    if h.shape != (NUM_BINS,) or not np.isfinite(h).all() or (h < 0).any() or h.sum() <= 0:
        raise ValueError(f"render_palette: expected a ({NUM_BINS},) non-negative palette, got {h.shape}")
    if width < 1 or height < 1:
        raise ValueError(f"render_palette: width and height must be >= 1, got {width}x{height}")
    keep = h > np.percentile(h, percentile)
    if not keep.any():
        keep = h > 0
    order = np.argsort(-np.where(keep, h, -1.0), kind="stable")[: int(keep.sum())]
    edges = np.cumsum(h[order]) / h[order].sum() * width  # right edge of each bar, in pixels
    bar = np.minimum(np.searchsorted(edges, np.arange(width) + 0.5), len(order) - 1)
    row = bin_colours()[order[bar]]  # (width, 3)
    return np.ascontiguousarray(np.broadcast_to(row, (height, width, 3)))


class PaletteExtractor(Extractor):
    name = "palette"
    version = "1"
    config_cls = PaletteConfig

    def columns(self) -> list[ColumnSpec]:
        return [
            ColumnSpec(
                "palette", "float16", (NUM_BINS,), "smoothed CIELab histogram over 156 colour bins, sums to 1"
            )
        ]

    def extract(self, batch: Batch) -> Batch:
        return {"palette": palette_of(batch["image"], self.config.sigma).astype(np.float16)}
