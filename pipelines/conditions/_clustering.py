"""Colour regions, the no-weights fallback of ``instances``: k-means colours, then connected components.

Why k-means + components rather than SLIC superpixels: SLIC tiles an image into roughly equal
cells (``n_segments`` fixes their number whatever the content), so a plain backdrop or a large
uniform object comes out as many pieces; clustering colours first gives one region per
solid-colour area, which is exactly an instance on the synthetic set and keeps large uniform
objects whole on photos.

Why our own k-means: scikit-learn is not a dependency, and ``cv2.kmeans`` draws its k-means++
seeds from OpenCV's process-wide RNG, which anything else in the actor can advance. This one runs
per image with a generator seeded by a constant, so an image's regions never depend on the rest of
its batch, and it only loops over clusters and iterations (vectorised over pixels).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

_SEED = 0  # the same seed for every image: batch-invariant by construction
_FIT_PIXELS = 16_384  # fit the centres on a regular grid of about this many pixels, then assign all


def colour_regions(
    image: np.ndarray,
    clusters: int,
    iters: int,
    colour_space: Literal["lab", "rgb"],
    min_area_frac: float,
) -> np.ndarray:
    """Connected single-colour regions of one image.

    ``image``: (H, W, 3) uint8 RGB. Returns (H, W) int64 region labels: 0 for regions smaller than
    ``min_area_frac`` of the image and for every region of the backdrop's colour cluster (the
    cluster of the largest region touching the border), positive labels otherwise (not yet in the
    id convention).
    """
    from skimage.measure import label

    h, w = image.shape[:2]
    feats = _features(image, colour_space).reshape(-1, 3)
    step = max(1, math.ceil(math.sqrt(h * w / _FIT_PIXELS)))
    sample = _features(image[::step, ::step], colour_space).reshape(-1, 3)
    centres = _kmeans(sample, clusters, iters, np.random.default_rng(_SEED))
    colour = _nearest(feats, centres).reshape(h, w)

    # skimage labels maximal 4-connected runs of equal value, so one call splits every cluster
    # into its components (value 0 is skimage's background, hence the +1).
    regions = label(colour + 1, background=0, connectivity=1)
    areas = np.bincount(regions.ravel())
    keep = areas >= max(1, math.ceil(min_area_frac * h * w))
    keep[0] = False
    # The backdrop is the colour of the largest region touching the border (argmax: the lowest
    # label on a tie); all regions of that colour go, so holes showing the backdrop (the inside
    # of a ring) are background too, not instances.
    cluster_of = np.zeros(len(areas), np.int64)
    cluster_of[regions.ravel()] = colour.ravel()
    border = np.unique(np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]]))
    keep &= cluster_of != cluster_of[border[np.argmax(areas[border])]]
    return np.where(keep[regions], regions, 0)


def _features(image: np.ndarray, colour_space: Literal["lab", "rgb"]) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W, 3) float64: CIELab (L in [0, 100]) or RGB in [0, 255]."""
    if colour_space == "rgb":
        return image.astype(np.float64)
    import cv2

    rgb = np.ascontiguousarray(image, dtype=np.float32) / 255.0
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab).astype(np.float64)


def _nearest(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(N, 3), (K, 3) -> (N,) index of the nearest centre (the lowest index on a tie).

    Exact squared differences, one centre at a time: no BLAS reduction whose rounding could
    depend on threads, and (N,) memory per step instead of (N, K, 3).
    """
    best = np.full(len(x), np.inf)
    index = np.zeros(len(x), np.int64)
    for k, c in enumerate(centres):
        d = ((x - c) ** 2).sum(1)
        closer = d < best
        best[closer] = d[closer]
        index[closer] = k
    return index


def _kmeans(x: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding on (N, 3) points; returns (K', 3) centres, K' <= k.

    Seeding stops early when every point already coincides with a centre (an image with fewer
    distinct colours than ``k``), so a solid-colour region is never split between two centres.
    """
    centres = [x[rng.integers(len(x))]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:
            break
        i = min(int(np.searchsorted(np.cumsum(d2), rng.random() * total, side="right")), len(x) - 1)
        centres.append(x[i])
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(1))
    c = np.stack(centres)
    assign = _nearest(x, c)
    for _ in range(iters):
        counts = np.bincount(assign, minlength=len(c))
        sums = np.stack([np.bincount(assign, weights=x[:, j], minlength=len(c)) for j in range(3)], 1)
        filled = counts > 0  # an emptied cluster keeps its centre
        c[filled] = sums[filled] / counts[filled, None]
        new = _nearest(x, c)
        if np.array_equal(new, assign):
            break
        assign = new
    return c
