"""Scenes of the built-in synthetic dataset: sampling, exact rendering, captions and their parser.

A scene is 1-3 flat-coloured shapes drawn bottom to top over a plain or gradient background. It
gives every Composer representation (arXiv 2302.09778, §3.1) a ground truth to check against:
the caption, the instance map (the paper's "masks") and a depth map from the drawing order.

Coordinates are resolution-free: ``centre`` is (x, y) in [0, 1] with x to the right and y
*downwards* (image convention, so "above" means smaller y); ``size`` is the circumradius as a
fraction of the image side; ``rotation`` is in degrees, clockwise on screen. Pixel (row i, col j)
samples the point ((j + 0.5) / W, (i + 0.5) / H), and a pixel belongs to a shape when that point
is inside it, so the masks are exact and aliased. Values are rounded before rendering, so the
scene JSON re-renders to the same pixels (``render_scene``).

Caption grammar (``caption`` writes it, ``parse_caption`` reads it back)::

    caption    := objects " on " background
    objects    := NP                                  (1 object)
                | NP " " REL " " NP                   (2 objects)
                | NP " " REL " " NP ", which is " REL " " NP ","     (3 objects)
    NP         := ART " " COLOUR " " SHAPE
    REL        := "to the left of" | "to the right of" | "above" | "below"
    background := ART " " COLOUR " background"
                | ART " " COLOUR " to " COLOUR " gradient background"
    ART        := "an" before a vowel, else "a"

Objects appear in drawing order (z = 1, 2, 3). With three objects the relations are chained:
the first relates object 1 to object 2, the second object 2 to object 3. A relation is read
off the centres: the axis with the larger offset decides (sampling keeps that offset at least
``_RELATION_RATIO`` times the other and at least ``_RELATION_MIN`` long, so it is never close).
A gradient runs from its first colour (top, or left) to its second (bottom, or right).

Depth convention: background 0; the object with z-rank k (1 = bottom) gets
``DEPTH_LEVELS[k] = round(255 * k / 3)``, i.e. 85, 170, 255 (larger = nearer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Split = Literal["train", "heldout"]
SPLITS: dict[str, int] = {"train": 0, "heldout": 1}  # the split's id in the sample's rng seed

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring")
# sRGB values at least 106 apart (Euclidean) from each other, so no two read as the same name.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 35),
    "orange": (250, 125, 0),
    "yellow": (250, 230, 40),
    "green": (30, 160, 50),
    "cyan": (40, 210, 230),
    "blue": (30, 60, 220),
    "purple": (130, 30, 170),
    "pink": (250, 140, 210),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}
OBJECT_COLOURS: tuple[str, ...] = tuple(COLOURS)[:8]  # objects are chromatic; any colour may be a background
# Never emitted in `train`; every `heldout` image has at least one. Each shape appears at least
# once and no colour twice, so every colour and every shape is still seen in training.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "star"),
    ("blue", "ring"),
    ("green", "triangle"),
    ("yellow", "square"),
    ("purple", "circle"),
    ("pink", "star"),
)
MAX_OBJECTS = 3
DEPTH_LEVELS: tuple[int, ...] = tuple(round(255 * k / MAX_OBJECTS) for k in range(MAX_OBJECTS + 1))
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")

_SIZE_RANGE = {1: (0.20, 0.38), 2: (0.16, 0.30), 3: (0.14, 0.24)}  # circumradius by object count
_MARGIN = 0.02  # objects stay this far inside the frame, so their full area is visible
_MIN_VISIBLE = 0.4  # fraction of its own pixels each object keeps, so the caption stays true
_RELATION_RATIO = 1.5  # dominant-axis offset >= this times the other axis offset
_RELATION_MIN = 0.08  # and at least this long (fraction of the image side)
_BG_MIN_DIST = 90.0  # RGB distance from every background pixel to every object colour
_CHECK_RESOLUTION = 64  # visibility is also checked here, so scenes rarely depend on resolution
_MAX_TRIES = 1000
_STAR_INNER = 0.45  # inner/outer radius; fatter than a pentagram (0.38) so it survives 16 px
_RING_INNER = 0.55


@dataclass(eq=False)
class SynthSample:
    """One rendered sample; ``scene`` is JSON-ready, ``caption`` follows the module grammar."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    instances: np.ndarray  # (H, W) uint8, 0 = background, k = object with z = k
    depth: np.ndarray  # (H, W) uint8, DEPTH_LEVELS[z], 0 = background
    scene: dict[str, Any]
    caption: str


def _grid(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(resolution, dtype=np.float64) + 0.5) / resolution
    return c[None, :], c[:, None]  # x (1, W), y (H, 1)


def shape_mask(
    shape: str, centre: tuple[float, float], size: float, rotation: float, resolution: int
) -> np.ndarray:
    """(resolution, resolution) bool mask of one shape, exact at pixel centres."""
    x, y = _grid(resolution)
    t = np.deg2rad(rotation)
    dx, dy = x - centre[0], y - centre[1]
    u = dx * np.cos(t) + dy * np.sin(t)  # the shape's own frame (undo the rotation)
    v = -dx * np.sin(t) + dy * np.cos(t)
    if shape == "circle":
        return u * u + v * v <= size * size
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= size * size) & (r2 >= (_RING_INNER * size) ** 2)
    if shape in ("square", "triangle"):
        # Regular polygon as the intersection of half-planes u cos(a) + v sin(a) <= apothem;
        # the square's edges are axis-aligned and the triangle points up at rotation 0.
        n, phase = (4, 0.0) if shape == "square" else (3, -np.pi / 6)
        apothem = size * np.cos(np.pi / n)
        inside = np.ones(np.broadcast_shapes(u.shape, v.shape), bool)
        for k in range(n):
            a = phase + 2 * np.pi * k / n
            inside &= u * np.cos(a) + v * np.sin(a) <= apothem
        return inside
    if shape == "star":
        # Fold the angle into the half-sector between a tip (angle 0) and the next inner vertex,
        # then test against the tip-to-inner-vertex edge.
        sector = 2 * np.pi / 5
        ang = np.mod(np.arctan2(v, u) + np.pi / 2, sector)
        ang = np.minimum(ang, sector - ang)
        rho = np.hypot(u, v)
        px, py = rho * np.cos(ang), rho * np.sin(ang)
        ex = _STAR_INNER * size * np.cos(sector / 2) - size
        ey = _STAR_INNER * size * np.sin(sector / 2)
        return ex * py - ey * (px - size) >= 0
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _background(bg: dict[str, Any], resolution: int) -> np.ndarray:
    a = np.asarray(bg["rgb"][0], np.float64)
    if bg["kind"] == "plain":
        return np.broadcast_to(a.astype(np.uint8), (resolution, resolution, 3)).copy()
    b = np.asarray(bg["rgb"][1], np.float64)
    x, y = _grid(resolution)
    t = np.broadcast_to(y if bg["direction"] == "vertical" else x, (resolution, resolution))
    return np.rint(a + (b - a) * t[..., None]).astype(np.uint8)


def render_scene(scene: dict[str, Any], resolution: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render ``scene`` to (image (H, W, 3) uint8, instances (H, W) uint8, depth (H, W) uint8)."""
    image = _background(scene["background"], resolution)
    instances = np.zeros((resolution, resolution), np.uint8)
    for obj in sorted(scene["objects"], key=lambda o: o["z"]):
        m = shape_mask(obj["shape"], obj["centre"], obj["size"], obj["rotation"], resolution)
        image[m] = obj["rgb"]
        instances[m] = obj["z"]
    depth = np.asarray(DEPTH_LEVELS, np.uint8)[instances]
    return image, instances, depth


def relation(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Where object ``a`` is relative to ``b``, from their centres (dominant axis decides)."""
    dx = b["centre"][0] - a["centre"][0]
    dy = b["centre"][1] - a["centre"][1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def _clear_relation(a: dict[str, Any], b: dict[str, Any]) -> bool:
    d = sorted((abs(b["centre"][0] - a["centre"][0]), abs(b["centre"][1] - a["centre"][1])))
    return d[1] >= _RELATION_MIN and d[1] >= _RELATION_RATIO * d[0]


def _visible_enough(objects: list[dict[str, Any]], resolution: int) -> bool:
    masks = [shape_mask(o["shape"], o["centre"], o["size"], o["rotation"], resolution) for o in objects]
    instances = np.zeros((resolution, resolution), np.uint8)
    for k, m in enumerate(masks, 1):
        instances[m] = k
    for k, m in enumerate(masks, 1):
        own = int(m.sum())
        if own == 0 or (instances == k).sum() < _MIN_VISIBLE * own:
            return False
    return True


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    t = 0.0 if not ab.any() else float(np.clip(np.dot(p - a, ab) / np.dot(ab, ab), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


def _sample_background(rng: np.random.Generator, used: list[str]) -> dict[str, Any]:
    objs = [np.asarray(COLOURS[c], np.float64) for c in used]

    def ok(a: str, b: str) -> bool:
        pa, pb = np.asarray(COLOURS[a], np.float64), np.asarray(COLOURS[b], np.float64)
        return all(_segment_distance(p, pa, pb) >= _BG_MIN_DIST for p in objs)

    names = [c for c in COLOURS if c not in used]
    gradients = [(a, b) for a in names for b in names if a != b and ok(a, b)]
    if rng.random() < 0.4 and gradients:
        a, b = gradients[rng.integers(len(gradients))]
        direction = ("vertical", "horizontal")[rng.integers(2)]
        return {
            "kind": "gradient",
            "colours": [a, b],
            "rgb": [list(COLOURS[a]), list(COLOURS[b])],
            "direction": direction,
        }
    plain = [c for c in names if ok(c, c)]
    c = plain[rng.integers(len(plain))]
    return {"kind": "plain", "colours": [c], "rgb": [list(COLOURS[c])]}


def _sample_pairs(rng: np.random.Generator, split: Split) -> list[tuple[str, str]]:
    n = int(rng.choice([1, 2, 3], p=[0.3, 0.35, 0.35]))
    held = set(HELDOUT_PAIRS)
    while True:
        colours = [OBJECT_COLOURS[i] for i in rng.choice(len(OBJECT_COLOURS), n, replace=False)]
        pairs = [(c, SHAPES[rng.integers(len(SHAPES))]) for c in colours]
        if split == "heldout":
            # Put one held-out pair in a random slot; the rest may be anything with other colours.
            hp = HELDOUT_PAIRS[rng.integers(len(HELDOUT_PAIRS))]
            pairs = [p for p in pairs if p[0] != hp[0]][: n - 1]
            pairs.insert(int(rng.integers(n)), hp)
            return pairs
        if not any(p in held for p in pairs):
            return pairs


def _sample_objects(rng: np.random.Generator, pairs: list[tuple[str, str]]) -> list[dict[str, Any]] | None:
    lo, hi = _SIZE_RANGE[len(pairs)]
    objects: list[dict[str, Any]] = []
    for z, (colour, shape) in enumerate(pairs, 1):
        size = round(float(rng.uniform(lo, hi)), 4)
        rotation = 0.0 if shape in ("circle", "ring") else round(float(rng.uniform(0, 360)), 1)
        if objects and rng.random() < 0.5:
            # Overlap the previous object on purpose, along a direction near an axis so the
            # caption's relation stays clear; visibility is checked afterwards.
            prev = objects[-1]
            ang = np.pi / 2 * rng.integers(4) + rng.uniform(-0.35, 0.35)
            dist = (prev["size"] + size) * rng.uniform(0.45, 0.95)
            centre = (prev["centre"][0] + dist * np.cos(ang), prev["centre"][1] + dist * np.sin(ang))
        else:
            centre = tuple(rng.uniform(size + _MARGIN, 1 - size - _MARGIN, 2))
        centre = (round(float(centre[0]), 4), round(float(centre[1]), 4))
        if not all(size + _MARGIN <= c <= 1 - size - _MARGIN for c in centre):
            return None
        obj = {"z": z, "shape": shape, "colour": colour, "rgb": list(COLOURS[colour])}
        obj.update(centre=list(centre), size=size, rotation=rotation)
        if objects and not _clear_relation(objects[-1], obj):
            return None
        objects.append(obj)
    return objects


def sample_scene(seed: int, split: Split, index: int, resolution: int) -> dict[str, Any]:
    """The scene of sample ``index``; it depends only on (seed, split, index).

    The objects' colours and shapes are drawn once; their placement is redrawn until every
    object keeps ``_MIN_VISIBLE`` of its pixels both at ``resolution`` and at 64 px. So a scene
    is the same at every resolution except, rarely (about 1% at 16 px), a very low one, where
    a placement that would lose an object is redrawn.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    if not isinstance(resolution, int) or not 16 <= resolution <= 4096:
        raise ValueError(f"resolution must be an integer in [16, 4096], got {resolution!r}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    pairs = _sample_pairs(rng, split)  # drawn once, so rejection below does not bias what appears
    for _ in range(_MAX_TRIES):
        objects = _sample_objects(rng, pairs)
        if objects is None:
            continue
        if all(_visible_enough(objects, r) for r in sorted({resolution, _CHECK_RESOLUTION})):
            return {"background": _sample_background(rng, [o["colour"] for o in objects]), "objects": objects}
    raise RuntimeError(f"no valid scene for seed={seed} split={split} index={index} after {_MAX_TRIES} tries")


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def caption(scene: dict[str, Any]) -> str:
    """The scene described in the module's caption grammar."""
    objs = sorted(scene["objects"], key=lambda o: o["z"])
    text = f"{_a(objs[0]['colour'])} {objs[0]['shape']}"
    for k in range(1, len(objs)):
        rel = f"{relation(objs[k - 1], objs[k])} {_a(objs[k]['colour'])} {objs[k]['shape']}"
        text += f" {rel}" if k == 1 else f", which is {rel},"
    bg = scene["background"]
    if bg["kind"] == "gradient":
        return f"{text} on {_a(bg['colours'][0])} to {bg['colours'][1]} gradient background"
    return f"{text} on {_a(bg['colours'][0])} background"


_C = "|".join(COLOURS)
_NP = rf"an? ({_C}) ({'|'.join(SHAPES)})"
_REL = f"({'|'.join(RELATIONS)})"
_CAPTION_RE = re.compile(
    rf"^{_NP}(?: {_REL} {_NP}(?:, which is {_REL} {_NP},)?)? on an? ({_C})(?: to ({_C}) gradient)? background$"
)


def parse_caption(text: str) -> dict[str, Any]:
    """Invert ``caption``: objects in z-order, chained relations and background.

    Returns ``{"objects": [{"colour", "shape"}, ...], "relations": [{"subject": i, "relation":
    REL, "object": i + 1}, ...], "background": {"kind": "plain"|"gradient", "colours": [...]}}``.
    Raises ``ValueError`` when ``text`` is not in the grammar.
    """
    m = _CAPTION_RE.match(text)
    if m is None:
        raise ValueError(f"not a synth caption: {text!r}")
    g = m.groups()
    objects, relations = [{"colour": g[0], "shape": g[1]}], []
    for rel, colour, shape in (g[2:5], g[5:8]):
        if rel is None:
            break
        relations.append({"subject": len(objects) - 1, "relation": rel, "object": len(objects)})
        objects.append({"colour": colour, "shape": shape})
    bg = {"kind": "gradient", "colours": [g[8], g[9]]} if g[9] else {"kind": "plain", "colours": [g[8]]}
    return {"objects": objects, "relations": relations, "background": bg}


def render_sample(seed: int, split: Split, index: int, resolution: int) -> SynthSample:
    """Sample ``index`` of (seed, split) at ``resolution`` x ``resolution``, with its ground truth."""
    scene = sample_scene(seed, split, index, resolution)
    image, instances, depth = render_scene(scene, resolution)
    return SynthSample(image=image, instances=instances, depth=depth, scene=scene, caption=caption(scene))
