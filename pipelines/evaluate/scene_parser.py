"""Scene parser for the synthetic compositional benchmark: reads a generated image back into objects.

The benchmark asks whether a generated image shows what its synthetic caption
(``pipelines.data.scene`` grammar) says: how many objects, their colours and shapes, and the
spatial relations between them, scored separately on seen and on held-out (colour, shape) pairs.

``parse_scene``, built for the generator's world and robust to noise, blur and soft edges:

1. Background: a plain or linear gradient fitted to the image border (objects never reach it),
   so a background of an object colour (any colour may be a background) is not an object.
2. Colours: each pixel goes to the nearest object colour or the background in CIELab, or stays
   unknown when far from all; per colour, components above a minimum area are merged into one
   object (a scene never repeats a colour, and an object on top may cut the one below in two).
3. Shapes: every shape of ``SHAPES`` is fitted (centre, size, rotation) to the object's pixels,
   other objects' pixels being "don't care" as they may hide it; the fewest mismatched pixels
   wins. Fitting rather than moments or hull ratios because occlusion may remove 60% of an object
   (``synth_scene._MIN_VISIBLE``), which changes every global descriptor but not the fit of what
   survives. The fitted centre, not the visible centroid, gives the relations.

``score`` compares a parsed scene with a caption; ``summarize`` aggregates scores over images;
``is_heldout`` says which side of the seen / held-out split a caption belongs to.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from pipelines.conditions.palette import srgb_to_lab
from pipelines.data.scene import (
    _RING_INNER,
    _STAR_INNER,
    COLOURS,
    HELDOUT_PAIRS,
    MAX_OBJECTS,
    OBJECT_COLOURS,
    SHAPES,
    parse_caption,
    relation,
    shape_mask,
)

Shape = Literal["circle", "square", "triangle", "star", "ring"]

_MAX_COLOUR_DIST = 25.0  # CIELab; object colours are >= 31.5 apart, allowed backgrounds >= 26.5 from them
_MIN_AREA = 0.003  # of the image: drops specks and blended edges; the smallest object is ~0.01
_OBJ_LAB = srgb_to_lab(np.array([COLOURS[c] for c in OBJECT_COLOURS], np.uint8))  # (8, 3)
_BG, _UNKNOWN = -1, -2  # segmentation labels besides the object colour indices
_PERIOD = {"circle": 360.0, "ring": 360.0, "square": 90.0, "triangle": 120.0, "star": 72.0}


@dataclass(frozen=True)
class ParsedObject:
    """One object found in the image; ``centre`` is (x, y) in [0, 1], y down, as in ``synth_scene``."""

    colour: str
    shape: Shape
    centre: tuple[float, float]  # fitted shape centre (the visible centroid may be off when occluded)
    area: float  # visible pixels as a fraction of the image
    size: float  # fitted circumradius, fraction of the image side
    fit: float  # in [0, 1]: 1 - (expected) mismatched pixels of the best template / visible pixels
    margin: float  # in [0, 1]: runner-up shape's extra mismatch / visible pixels (0 = a tie)
    rotation: float = 0.0  # fitted rotation in degrees, clockwise on screen (``synth_scene.shape_mask``)


@dataclass(frozen=True)
class ParsedScene:
    objects: tuple[ParsedObject, ...]  # sorted by decreasing area


# -- shapes --------------------------------------------------------------------------------------
def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of points (u, v), in the shape's own frame with circumradius 1 (as ``shape_mask``)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= _RING_INNER**2)
    if shape == "square":
        a = np.cos(np.pi / 4)
        return (np.abs(u) <= a) & (np.abs(v) <= a)
    if shape == "triangle":
        c = np.cos(np.pi / 6)
        return (v >= -0.5) & (0.5 * v + c * u <= 0.5) & (0.5 * v - c * u <= 0.5)
    if shape == "star":
        sector = 2 * np.pi / 5
        ang = np.mod(np.arctan2(v, u) + np.pi / 2, sector)
        ang = np.minimum(ang, sector - ang)
        rho = np.hypot(u, v)
        ex, ey = _STAR_INNER * np.cos(sector / 2) - 1.0, _STAR_INNER * np.sin(sector / 2)
        return ex * rho * np.sin(ang) - ey * (rho * np.cos(ang) - 1.0) >= 0
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


_T = 100  # lookup cells per unit circumradius: <= 0.12 px at the largest 64 px object
_N = 2 * _T + 5
_G = (np.arange(_N) - (_T + 2)) / _T  # cell centres; the outer two lie outside every shape
# Each unit shape rasterised once, so a template test is one gather whatever the shape (the star's
# arctan2 per pixel and candidate would otherwise dominate the parse time), and candidates of
# different shapes are tested in one call.
_TABLE = np.concatenate([_inside(s, _G[None, :], _G[:, None]).ravel() for s in SHAPES])  # (5 * _N**2,)
_UNIT_AREA = _TABLE.reshape(len(SHAPES), -1).mean(1) * (_N / _T) ** 2  # (5,) area at circumradius 1
_TURNS = np.array([float(_PERIOD[s] < 360) for s in SHAPES])  # 0: a circle or ring needs no rotation
_CHUNK = 1 << 15  # candidates x pixels per block: bigger temporaries run several times slower


def _losses(params: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Expected mismatched pixels of N templates, params (N, 5) = (cx, cy, size, rotation, shape).

    ``pts`` (3, P) float32: pixel centres x, y and the pixel's objectness ``a`` in [0, 1] (1 on
    the object, 0 on background, between on a soft edge; pixels of other objects, which may hide
    this one, are left out). Loss (N,) = sum of ``a`` over pixels outside the template + sum of
    ``1 - a`` inside = sum(a) + sum over inside of (1 - 2a): a fractional pixel count, so soft
    or blurred edges count for what they are.
    """
    out = np.empty(len(params))
    rows = max(1, _CHUNK // max(1, pts.shape[1]))
    for i in range(0, len(params), rows):
        p = params[i : i + rows]
        t, k = np.deg2rad(p[:, 3:4]), _T / p[:, 2:3]
        c, s = (np.cos(t) * k).astype(np.float32), (np.sin(t) * k).astype(np.float32)
        dx = pts[0][None] - p[:, 0:1].astype(np.float32)
        dy = pts[1][None] - p[:, 1:2].astype(np.float32)
        u, v = dx * c + dy * s, dy * c - dx * s
        u += _T + 2.5  # +0.5 so truncation rounds; clipped points land on the empty outer cells
        v += _T + 2.5
        np.clip(u, 0, _N - 1, out=u)
        np.clip(v, 0, _N - 1, out=v)
        idx = v.astype(np.int32) * _N + u.astype(np.int32) + (p[:, 4:5].astype(np.int32) * _N * _N)
        out[i : i + rows] = _TABLE[idx].astype(np.float32) @ (1 - 2 * pts[2])
    return out + float(pts[2].sum())


_MOVES = np.concatenate([np.eye(4), -np.eye(4), [[1, 1, 0, 0], [1, -1, 0, 0], [-1, 1, 0, 0], [-1, -1, 0, 0]]])


def _search(p: np.ndarray, best: np.ndarray, pts: np.ndarray, first: float, last: float, turn: float):
    """Pattern searches from K starts at once: p (K, 5), best (K,) -> improved (p, best).

    The loss is a pixel count (flat between steps, no gradient), so each search tries moves along
    each parameter and diagonally in the centre, and halves its steps when none improves; centre
    steps go from ``first`` down to ``last`` pixels, rotation steps from ``turn`` degrees. Searching all starts together keeps the
    number of numpy calls (which dominates at 32 px) per object small.
    """
    p, best = p.copy(), best.copy()
    step = np.zeros((len(p), 4))
    step[:, :3] = first, first, 0.6 * first
    step[:, 3] = turn * _TURNS[p[:, 4].astype(int)]
    active = best > 0.5  # half a pixel: the fit is as good as the pixel grid allows
    while active.any():
        ks = np.flatnonzero(active)
        cand = p[ks, None, :4] + _MOVES[None] * step[ks, None]  # (k, 12, 4)
        cand = np.concatenate([cand, np.broadcast_to(p[ks, None, 4:], (len(ks), len(_MOVES), 1))], 2)
        losses = _losses(cand.reshape(-1, 5), pts).reshape(len(ks), -1)
        j = losses.argmin(1)
        better = losses[np.arange(len(ks)), j] < best[ks]
        p[ks[better]] = cand[better, j[better]]
        best[ks[better]] = losses[better, j[better]]
        step[ks[~better]] /= 2
        active = (step[:, 0] >= last) & (best > 0.5)
    return p, best


def _classify(pts: np.ndarray, obj: np.ndarray, hidden: bool) -> list[tuple[float, str, np.ndarray]]:
    """(loss, shape, params (5,)) per shape, best first, for the points ``pts`` (see ``_losses``)
    around an object whose own pixels are ``obj`` (2, A), centres in pixels.

    Starts: centre at the visible centroid and size from the visible area, exact when nothing
    can hide the object (``hidden`` False) but for the rotation, so a rotation sweep and a short
    search suffice. A hidden part pulls the centroid off the centre and shrinks the area, so a
    hidden object also starts from shifted centres and from the farthest visible pixel as size;
    its loss is multimodal (a star's rotation and centre trade off), so the best three sweep
    candidates of each shape are searched. Candidates far worse than the best are dropped
    before each search; a shape dropped early keeps its last (upper-bound) loss.
    """
    obj, n_obj = obj.astype(np.float64), obj.shape[1]
    centre = obj.mean(1)
    far = float(np.sqrt(((obj - centre[:, None]) ** 2).sum(0).max())) + 0.5
    off = np.array([-0.25, 0.0, 0.25]) * far if hidden else np.zeros(1)
    turn = 15.0 if hidden else 7.5  # the hidden case has 18 times the starts; its search turns further
    grid = []
    for k, shape in enumerate(SHAPES):
        sizes = [np.sqrt(n_obj / _UNIT_AREA[k])] + ([far] if hidden else [])
        rots = np.arange(0.0, _PERIOD[shape], turn) if _PERIOD[shape] < 360 else [0.0]
        grid += [[*(centre + (a, b)), z, r, k] for a in off for b in off for z in sizes for r in rots]
    p = np.array(grid)
    # Large objects are first fitted on every other row and column (a quarter of the pixels):
    # enough to rank candidates and to place them to a pixel, at a quarter of the cost.
    stages = [(pts, 0.25 * far if hidden else 0.5, 0.2)]  # a fifth of a pixel is plenty
    if n_obj >= 200:
        stages = [(pts[:, np.all(np.floor(pts[:2]) % 2 == 0, axis=0)], stages[0][1], 1.0), (pts, 0.5, 0.2)]
    loss = _losses(p, stages[0][0]) * (pts.shape[1] / stages[0][0].shape[1])
    by_shape = [np.flatnonzero(p[:, 4] == k) for k in range(len(SHAPES))]
    keep = np.concatenate([i[np.argsort(loss[i], kind="stable")][: 3 if hidden else 1] for i in by_shape])
    p, loss = p[keep], loss[keep]
    final: dict[int, tuple[float, np.ndarray]] = {}
    for q, first, last in stages:
        turn /= 2
        for i in np.argsort(-loss):  # the best (last written) loss so far of every shape
            final[int(p[i, 4])] = (float(loss[i]), p[i])
        keep = loss <= 2 * loss.min() + 0.1 * n_obj
        p, loss = _search(p[keep], _losses(p[keep], q), q, first, last, turn)
        loss = loss * (pts.shape[1] / q.shape[1])
    for i in np.argsort(-loss):
        final[int(p[i, 4])] = (float(loss[i]), p[i])
    return sorted(((v[0], SHAPES[k], v[1]) for k, v in final.items()), key=lambda t: (t[0], t[2][4]))


# -- segmentation ---------------------------------------------------------------------------------
def _background(image: np.ndarray) -> np.ndarray:
    """(R, R, 3) float64 sRGB of a plain or linear-gradient background fitted to the 1-pixel border.

    The generator's backgrounds are linear in x or y, and its objects never reach the border
    pixels; one refit without the worst border pixels keeps a stray object at the edge of a
    generated image from tilting the fit.
    """
    r = image.shape[0]
    c = np.arange(r) + 0.5
    yy, xx = np.meshgrid(c, c, indexing="ij")
    border = np.zeros((r, r), bool)
    border[[0, -1], :] = border[:, [0, -1]] = True
    design = np.stack([np.ones(r * r), xx.ravel() / r, yy.ravel() / r], 1)  # (R*R, 3)
    a, target = design[border.ravel()], image[border].astype(np.float64)
    keep = np.ones(len(a), bool)
    for _ in range(2):
        coef = np.linalg.lstsq(a[keep], target[keep], rcond=None)[0]
        resid = np.linalg.norm(a @ coef - target, axis=1)
        keep = resid <= max(20.0, 3 * float(np.median(resid)))
    return np.clip(design @ coef, 0, 255).reshape(r, r, 3)


def _segment(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(R, R) int labels (k for ``OBJECT_COLOURS[k]``, ``_BG`` or ``_UNKNOWN``), the same before
    thin parts become unknown, and the background model (R, R, 3) float64 sRGB in [0, 255]."""
    lab, bg = srgb_to_lab(image), _background(image)
    bg_lab = srgb_to_lab(bg / 255.0)
    d_obj = np.linalg.norm(lab[:, :, None, :] - _OBJ_LAB, axis=-1)  # (R, R, 8)
    # Any colour may be a background, but never under an object of that colour (the generator
    # keeps them >= 90 RGB apart): a colour too close to the local background is not read there,
    # so a noisy background of an object colour does not turn into objects.
    d_obj[np.linalg.norm(bg_lab[:, :, None, :] - _OBJ_LAB, axis=-1) < _MAX_COLOUR_DIST] = np.inf
    d_bg = np.linalg.norm(lab - bg_lab, axis=-1)
    k = d_obj.argmin(-1)
    best = np.take_along_axis(d_obj, k[..., None], -1)[..., 0]
    # A pixel nearer its background than any object colour is background; far from everything
    # (a soft edge blending two colours) is unknown, neither for nor against a template.
    labels = np.where(d_bg <= np.minimum(best, _MAX_COLOUR_DIST), _BG, _UNKNOWN)
    labels = np.where((best < _MAX_COLOUR_DIST) & (best < d_bg), k, labels)
    # A blurred edge between two colours may pass through a third (red to yellow via orange) in
    # a line one pixel wide: a pixel that fewer than 4 of its 3 x 3 window share is unknown. A
    # real part 2 pixels wide (a small ring at 32 px) keeps 6 of 9.
    raw = labels.copy()
    for c in np.unique(labels[labels >= 0]):
        m = labels == c
        thin = m & (ndimage.convolve(m.astype(np.uint8), np.ones((3, 3), np.uint8), mode="constant") < 4)
        labels[thin] = _UNKNOWN
    return labels, raw, bg


def _objects_masks(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Per colour index, the union of its connected components of at least ``_MIN_AREA``."""
    min_px = _MIN_AREA * labels.size
    out = {}
    for k in np.unique(labels[labels >= 0]):
        comp, n = ndimage.label(labels == k, structure=np.ones((3, 3)))
        sizes = np.bincount(comp.ravel(), minlength=n + 1)[1:]
        big = np.flatnonzero(sizes >= min_px) + 1
        if len(big):
            out[int(k)] = np.isin(comp, big)
    return out


def _check_image(image: Any) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError(f"image must be a (R, R, 3) uint8 array, got {getattr(image, 'dtype', type(image))}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1] or image.shape[0] < 16:
        raise ValueError(f"image must be (R, R, 3) uint8 with R >= 16, got shape {image.shape}")


def parse_scene(image: np.ndarray) -> ParsedScene:
    """The objects of a (R, R, 3) uint8 sRGB image: colour, shape, centre, area (see module doc).

    Deterministic; an image without objects (uniform, noise) gives an empty ``ParsedScene``.
    """
    _check_image(image)
    return _parse(image, _segment(image))


def _parse(image: np.ndarray, segmented: tuple[np.ndarray, np.ndarray, np.ndarray]) -> ParsedScene:
    """``parse_scene`` of a checked image and its ``_segment`` result."""
    r = image.shape[0]
    labels, raw, bg = segmented
    masks = _objects_masks(labels)
    # Touching objects form a cluster; a template may only hide behind pixels of its own cluster.
    clusters, _ = ndimage.label(labels != _BG, structure=np.ones((3, 3)))
    c = np.arange(r) + 0.5
    objects = []
    for k, m in masks.items():
        # Objectness: 1 on the object, 0 on background; on an unknown pixel (a soft edge), the
        # share of the object's colour when the pixel is read as a blend of it and the background.
        o = np.asarray(COLOURS[OBJECT_COLOURS[k]], np.float64) - bg
        a = np.clip(((image - bg) * o).sum(-1) / np.maximum((o * o).sum(-1), 1.0), 0.0, 1.0)
        a[m], a[labels == _BG] = 1.0, 0.0  # a blend only where the colour is unclear: noise stays out
        # Pixels of other objects (even thin slivers) and own-colour specks may hide it: left out.
        use = m | ((labels < 0) & ((raw < 0) | (raw == k)))
        cluster = np.isin(clusters, np.unique(clusters[m]))
        ci, cj = np.nonzero(cluster)
        pad = 3  # free pixels just outside the cluster are what penalises an oversized template
        i0, i1 = max(0, ci.min() - pad), min(r, ci.max() + pad + 1)
        j0, j1 = max(0, cj.min() - pad), min(r, cj.max() + pad + 1)
        yy, xx = np.meshgrid(c[i0:i1], c[j0:j1], indexing="ij")
        win, obj = use[i0:i1, j0:j1].ravel(), m[i0:i1, j0:j1].ravel()
        xs, ys = xx.ravel(), yy.ravel()
        pts = np.stack([xs[win], ys[win], a[i0:i1, j0:j1].ravel()[win]]).astype(np.float32)
        area = float(obj.sum())
        # An object with no other colour in its cluster is complete (soft edges do not hide).
        hidden = bool((cluster & (raw >= 0) & (raw != k)).any())
        fits = _classify(pts, np.stack([xs[obj], ys[obj]]), hidden)
        (loss, shape, p), loss2 = fits[0], fits[1][0]
        objects.append(
            ParsedObject(
                colour=OBJECT_COLOURS[k],
                shape=shape,
                centre=(float(p[0]) / r, float(p[1]) / r),
                area=area / (r * r),
                size=float(p[2]) / r,
                # The fitting table's triangle points down: 60 degrees off the generator's.
                rotation=float(p[3]) + (60.0 if shape == "triangle" else 0.0),
                fit=max(0.0, 1.0 - loss / area),
                margin=min(1.0, (loss2 - loss) / area),
            )
        )
    return ParsedScene(tuple(sorted(objects, key=lambda o: -o.area)))


def scene_maps(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (instances, depth) maps of an image of the generator's world, (R, R) uint8 each, in the
    generator's conventions (``synth_scene.render_scene``, whose ``DEPTH_LEVELS`` this reproduces):
    the parsed objects re-rendered in a drawing order read from occlusion.

    This is how evaluation re-extracts depth and instances from a generated synthetic image: the
    dataset's own maps are ground truth, which a generated image does not have, and no depth or
    segmentation weights are needed. Object i is above object j when, where their fitted
    templates overlap, more pixels show i's colour than j's. Objects that do not overlap have no
    visible order; they keep the order of decreasing area (larger drawn first).

    Depth and instances are geometry: a region that stands out from the background but has no
    object colour (a generated object in a wrong or muddy colour) is still something there. Each
    such region of at least the parser's minimum area is an instance of its own, drawn below the
    parsed objects.
    """
    _check_image(image)
    segmented = _segment(image)  # once, for the parse and the occlusion evidence
    parsed = _parse(image, segmented)
    r = image.shape[0]
    labels = segmented[1]  # before thin parts turn unknown: slivers are occlusion evidence
    blobs, count = ndimage.label(labels == _UNKNOWN, structure=np.ones((3, 3)))
    sizes = np.bincount(blobs.ravel(), minlength=count + 1)
    extra = [blobs == k for k in range(1, count + 1) if sizes[k] >= _MIN_AREA * r * r]
    objs = parsed.objects
    tpl = [shape_mask(o.shape, o.centre, o.size, o.rotation, r) for o in objs]
    vis = [labels == OBJECT_COLOURS.index(o.colour) for o in objs]
    n = len(objs)
    above = np.zeros((n, n), bool)  # above[i, j]: i is drawn over j
    for i in range(n):
        for j in range(i + 1, n):
            both = tpl[i] & tpl[j]
            a, b = int((vis[i] & both).sum()), int((vis[j] & both).sum())
            above[i, j], above[j, i] = a > b, b > a
    order: list[int] = []
    left = list(range(n))  # by decreasing area
    while left:
        # The next drawn is one above none of the others left (a cycle: the fewest such).
        k = min(left, key=lambda i: (int(above[i, left].sum()), left.index(i)))
        order.append(k)
        left.remove(k)
    # Drawn bottom to top as ``render_scene`` does; a generated image may show more objects than
    # the generator's MAX_OBJECTS, which then share the depth range.
    instances = np.zeros((r, r), np.uint8)
    for z, m in enumerate([*extra, *(tpl[k] for k in order)], start=1):
        instances[m] = z
    n += len(extra)
    levels = np.rint(255 * np.arange(n + 1) / max(MAX_OBJECTS, n)).astype(np.uint8)
    depth = levels[instances]
    return instances, depth


# -- scoring -------------------------------------------------------------------------------------
def is_heldout(caption: str) -> bool:
    """Whether ``caption`` asks for a held-out (colour, shape) pair (``HELDOUT_PAIRS``)."""
    return any((o["colour"], o["shape"]) in HELDOUT_PAIRS for o in parse_caption(caption)["objects"])


def score(parsed: ParsedScene, caption: str) -> dict[str, Any]:
    """How well ``parsed`` matches ``caption`` (``synth_scene`` grammar; ``ValueError`` otherwise).

    Caption objects are matched one-to-one to parsed objects (Hungarian; colour agreement counts
    more than shape, so "a red star" read as a red square is a shape error, not a colour one).
    Returns, fractions in [0, 1] over the caption's objects / relations:

    - ``count``: bool, as many parsed objects as caption objects;
    - ``colour``, ``shape``: matched object has the caption's colour / shape (unmatched: wrong);
    - ``pairs``: some parsed object has the caption object's (colour, shape);
    - ``relation``: matched centres stand in the caption's relation (``synth_scene.relation``);
      None for a one-object caption;
    - ``all``: bool, count right and every colour, shape and relation right;
    - ``heldout``: bool, the caption asks for a held-out pair; ``n_objects``, ``n_relations``.
    """
    cap = parse_caption(caption)
    want, got = cap["objects"], parsed.objects
    gain = np.array([[2.0 * (w["colour"] == g.colour) + (w["shape"] == g.shape) for g in got] for w in want])
    match: dict[int, ParsedObject] = {}
    if got:
        rows, cols = linear_sum_assignment(gain.reshape(len(want), len(got)), maximize=True)
        match = {int(i): got[j] for i, j in zip(rows, cols, strict=True)}
    colour = [i in match and match[i].colour == w["colour"] for i, w in enumerate(want)]
    shape = [i in match and match[i].shape == w["shape"] for i, w in enumerate(want)]
    pairs = [any((g.colour, g.shape) == (w["colour"], w["shape"]) for g in got) for w in want]

    def holds(r: dict[str, Any]) -> bool:
        a, b = match.get(r["subject"]), match.get(r["object"])
        return bool(a and b and relation({"centre": a.centre}, {"centre": b.centre}) == r["relation"])

    rel = [holds(r) for r in cap["relations"]]
    count = len(got) == len(want)
    return {
        "count": count,
        "colour": float(np.mean(colour)),
        "shape": float(np.mean(shape)),
        "pairs": float(np.mean(pairs)),
        "relation": float(np.mean(rel)) if rel else None,
        "all": bool(count and all(colour) and all(shape) and all(rel)),
        "heldout": is_heldout(caption),
        "n_objects": len(want),
        "n_relations": len(rel),
    }


def summarize(scores: Iterable[dict[str, Any]]) -> dict[str, float | int]:
    """Aggregate ``score`` results: accuracies in [0, 1] (nan when there is nothing to average).

    ``count`` and ``all`` are per image; ``colour``, ``shape`` and ``pairs`` per object and
    ``relation`` per relation (each image weighted by how many it has); ``n_images``,
    ``n_objects``, ``n_relations``. Split seen / held-out first with ``s["heldout"]``.
    """
    scores = list(scores)
    n = {w: sum(s[w] for s in scores) for w in ("n_objects", "n_relations")}

    def mean(key: str, weight: str | None = None) -> float:
        total = n[weight] if weight else len(scores)
        num = sum(s[key] * (s[weight] if weight else 1) for s in scores if weight is None or s[weight])
        return num / total if total else float("nan")

    out = {k: mean(k) for k in ("count", "all")} | {
        k: mean(k, "n_objects") for k in ("colour", "shape", "pairs")
    }
    return out | {"relation": mean("relation", "n_relations"), "n_images": len(scores), **n}
