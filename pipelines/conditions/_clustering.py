"""Colour regions, the no-weights fallback of ``instances``: k-means colours, then connected components.

Why k-means + components rather than SLIC superpixels: SLIC tiles an image into roughly equal
cells (``n_segments`` fixes their number whatever the content), so a plain backdrop or a large
uniform object comes out as many pieces; clustering colours first gives one region per
solid-colour area, which is exactly an instance on the synthetic set and keeps large uniform
objects whole on photos.

Why our own k-means: scikit-learn is not a dependency, and ``cv2.kmeans`` draws its k-means++
seeds from OpenCV's process-wide RNG, which anything else in the actor can advance. Here every
image is clustered on its own with a generator seeded by the same constant — so an image's regions
never depend on the rest of its batch — and, because every image therefore draws the same random
numbers, the whole batch runs as one set of array operations (a Python loop over clusters and
iterations only). Lloyd's iterations stop once no image changes; an image that converged earlier
stays at its fixed point, so batched and single calls give identical results.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

_SEED = 0  # the same seed for every image: batch-invariant by construction
_FIT_PIXELS = 1_024  # fit the centres on a regular grid of about this many pixels, then assign all


def colour_regions(
    images: np.ndarray,
    clusters: int,
    iters: int,
    colour_space: Literal["lab", "rgb"],
    min_area_frac: float,
    work_size: int = 64,
) -> np.ndarray:
    """Connected single-colour regions of each image of a batch, at the working resolution.

    ``images``: (B, H, W, 3) uint8 RGB; images larger than ``work_size`` are area-resized to it
    first (the cost is per pixel, and the regions a colour condition needs are far larger than a
    pixel); the caller scales the labels back. Returns (B, h, w) int64 region labels, unique
    across the batch: 0 for regions smaller than ``min_area_frac`` of the image and for every
    region of the backdrop's colour cluster (the cluster of the largest region touching the
    border), positive labels otherwise (not yet in the id convention).
    """
    import cv2
    from skimage.measure import label

    b, h, w = images.shape[:3]
    if max(h, w) > work_size:
        size = (min(w, work_size), min(h, work_size))
        images = np.stack([cv2.resize(im, size, interpolation=cv2.INTER_AREA) for im in images])
        h, w = images.shape[1:3]
    feats = _features(images, colour_space)  # (B, h, w, 3) float32
    step = max(1, math.ceil(math.sqrt(h * w / _FIT_PIXELS)))
    sample = feats[:, ::step, ::step].reshape(b, -1, 3)
    centres = _kmeans(sample, clusters, iters, np.random.default_rng(_SEED))
    colour = _nearest(feats.reshape(b, -1, 3), centres).reshape(b, h, w)

    # skimage labels maximal 4-connected runs of equal value, so one call splits every cluster
    # into its components; offsetting each image's colours keeps images from joining along the
    # batch axis (value 0 is skimage's background, hence the +1).
    k = centres.shape[1]
    offset = (np.arange(b, dtype=np.int64) * k)[:, None, None]
    regions = label(colour + offset + 1, background=0, connectivity=1)
    areas = np.bincount(regions.ravel())
    keep = areas >= max(1, math.ceil(min_area_frac * h * w))
    keep[0] = False
    cluster_of = np.zeros(len(areas), np.int64)
    cluster_of[regions.ravel()] = colour.ravel()
    # The backdrop is the colour of the largest region touching the border (argmax: the lowest
    # label on a tie); all regions of that colour go, so holes showing the backdrop (the inside
    # of a ring) are background too, not instances.
    # Labels run in raster order over the batch, so image i owns the range (last[i-1], last[i]].
    last = regions.reshape(b, -1).max(1)
    image_of = np.repeat(np.arange(b), np.diff(np.concatenate([[0], last])))
    image_of = np.concatenate([[-1], image_of])
    backdrop = np.empty(b, np.int64)
    for i in range(b):
        r = regions[i]
        border = np.unique(np.concatenate([r[0], r[-1], r[:, 0], r[:, -1]]))
        backdrop[i] = cluster_of[border[np.argmax(areas[border])]]
    keep[1:] &= cluster_of[1:] != backdrop[image_of[1:]]
    return np.where(keep[regions], regions, 0)


def _features(images: np.ndarray, colour_space: Literal["lab", "rgb"]) -> np.ndarray:
    """(B, H, W, 3) uint8 RGB -> (B, H, W, 3) float32: CIELab (L in [0, 100]) or RGB in [0, 255]."""
    if colour_space == "rgb":
        return images.astype(np.float32)
    import cv2

    b, h, w, _ = images.shape
    rgb = np.ascontiguousarray(images, dtype=np.float32).reshape(b * h, w, 3) / 255.0
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab).reshape(b, h, w, 3)


def _nearest(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(B, N, 3), (B, K, 3) -> (B, N) index of each point's nearest centre (lowest index on a tie).

    Exact squared differences, one centre at a time, summed column by column into reused buffers:
    no BLAS reduction whose rounding could depend on threads or batch size, no slow row-wise
    reduce, no temporary arrays per step.
    """
    cols = [np.ascontiguousarray(x[..., j]) for j in range(3)]
    best = np.full(x.shape[:2], np.inf, dtype=x.dtype)
    index = np.zeros(x.shape[:2], np.uint8)  # k <= 64 clusters
    d, tmp = np.empty_like(best), np.empty_like(best)
    closer = np.empty(best.shape, bool)
    for k in range(centres.shape[1]):
        c = centres[:, k]
        np.subtract(cols[0], c[:, 0:1], out=d)
        np.square(d, out=d)
        for j in (1, 2):
            np.subtract(cols[j], c[:, j : j + 1], out=tmp)
            np.square(tmp, out=tmp)
            d += tmp
        np.less(d, best, out=closer)
        np.copyto(best, d, where=closer)
        np.putmask(index, closer, k)
    return index.astype(np.int64)


def _kmeans(x: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding on (B, N, 3) points; returns (B, k, 3) centres.

    Seeding stops adding centres for an image once every point coincides with a centre (fewer
    distinct colours than ``k``); its remaining slots repeat centre 0, which never wins a tie
    against it, so a solid-colour region is never split between two centres.
    """
    b, n, _ = x.shape
    rows = np.arange(b)
    first = int(rng.integers(n))
    centres = np.repeat(x[:, first : first + 1], k, axis=1)  # (B, k, 3); unused slots = centre 0
    d2 = np.square(x - x[:, first : first + 1]).sum(-1)  # (B, N)
    for j in range(1, k):
        total = d2.sum(1)
        u = rng.random()  # the same draw for every image: each has its own identically seeded rng
        active = total > 0
        if not active.any():
            break
        cum = np.cumsum(d2, axis=1)
        idx = np.minimum((cum <= (u * total)[:, None]).sum(1), n - 1)  # searchsorted, side="right"
        picked = x[rows, idx]
        centres[active, j] = picked[active]
        d2 = np.where(active[:, None], np.minimum(d2, np.square(x - picked[:, None]).sum(-1)), d2)
    assign = _nearest(x, centres)
    flat = (assign + rows[:, None] * k).ravel()
    for _ in range(iters):
        counts = np.bincount(flat, minlength=b * k).reshape(b, k)
        sums = np.stack(
            [np.bincount(flat, weights=x[..., j].ravel(), minlength=b * k).reshape(b, k) for j in range(3)],
            -1,
        )
        filled = counts > 0  # an emptied cluster keeps its centre
        centres[filled] = sums[filled] / counts[filled][:, None]
        new = _nearest(x, centres)
        if np.array_equal(new, assign):
            break
        assign = new
        flat = (assign + rows[:, None] * k).ravel()
    return centres
