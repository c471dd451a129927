"""The pictures ``recompose generate`` writes: one per condition, and the grid a person looks at.

Condition pictures keep the model's values: maps are (R, R) grayscale PNGs of exactly the uint8
map the model got (an edited copy goes back in with ``--sketch-map`` etc. unchanged), instances
are colourised (``load_map`` turns colours back into ids), the mask is 255 where regenerated (it
goes back in with ``--mask``). A caption has no picture file; the grid shows its text.
"""

from __future__ import annotations

import textwrap
from typing import Any

import numpy as np

from pipelines.data.preview import colourize_instances

GRID_COLUMNS = 8  # samples per grid row
MIN_TILE = 128  # grid tiles are at least this wide, so 32-64 px models stay visible


def condition_pictures(
    conditions: dict[str, Any],
    source: np.ndarray | None,
    mask: np.ndarray | None,
    references: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """name -> picture of each condition given (no caption), plus the source when there is one."""
    from pipelines.conditions.palette import render_palette

    out: dict[str, np.ndarray] = {}
    if "semantics" in references:  # the image the semantics condition was taken from
        out["semantics"] = references["semantics"]
    elif "semantics.image" in conditions:
        out["semantics"] = np.asarray(conditions["semantics.image"], np.uint8)
    if "palette" in conditions:
        out["palette"] = render_palette(np.asarray(conditions["palette"], np.float32))
    for name in ("sketch", "instances", "depth", "intensity"):
        if name in conditions:
            a = np.asarray(conditions[name], np.uint8)
            out[name] = colourize_instances(a) if name == "instances" else a
    if mask is not None:
        out["mask"] = (np.asarray(mask) > 0).astype(np.uint8) * 255
    if source is not None:
        out["source"] = np.asarray(source, np.uint8)
    return out


def _tile(a: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    resample = Image.Resampling.NEAREST if a.shape[0] <= size else Image.Resampling.BOX
    return np.asarray(Image.fromarray(a).resize((size, size), resample))


def text_tile(text: str, size: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    draw.rectangle((0, 0, size - 1, size - 1), outline=(200, 200, 200))
    lines = textwrap.wrap(text or '""', width=max(size // 6, 8))[: max(size // 12, 1)]
    for i, line in enumerate(lines):
        draw.text((3, 2 + 12 * i), line, fill=(0, 0, 0))
    return np.asarray(im)


def grid(
    pictures: dict[str, np.ndarray], text: str | None, samples: np.ndarray, resolution: int
) -> np.ndarray:
    """(H, W, 3) uint8: the conditions (caption text first) in one labelled row, samples below."""
    size = max(resolution, MIN_TILE)
    top = [("caption", text_tile(text, size))] if text is not None else []
    top += [(name, _tile(p, size)) for name, p in pictures.items()]
    if not top:
        top = [("no conditions", text_tile("unconditional", size))]
    rows = [top] + [
        [(f"sample {i + j}", _tile(s, size)) for j, s in enumerate(samples[i : i + GRID_COLUMNS])]
        for i in range(0, len(samples), GRID_COLUMNS)
    ]
    return layout(rows, size)


def layout(rows: list[list[tuple[str, np.ndarray]]], size: int) -> np.ndarray:
    """(H, W, 3) uint8: rows of labelled tiles, each tile (h, w, 3) or (h, w) scaled to ``size``."""
    from PIL import Image, ImageDraw

    pad, label = 4, 14
    cols = max(len(r) for r in rows)
    canvas = Image.new(
        "RGB", (pad + cols * (size + pad), pad + len(rows) * (label + size + pad)), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = pad + r * (label + size + pad)
        for c, (name, tile) in enumerate(row):
            x = pad + c * (size + pad)
            draw.text((x, y), name, fill=(0, 0, 0))
            canvas.paste(Image.fromarray(_tile(tile, size)), (x, y + label))
    return np.asarray(canvas)
