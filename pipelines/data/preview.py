"""Pictures of decomposed rows: each image beside its representations (every output is also a picture)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipelines.conditions import MAPS
from pipelines.data.shards import read_shard


def colourize_instances(ids: np.ndarray) -> np.ndarray:
    """(H, W) uint8 ids → (H, W, 3) uint8, a fixed colour per id, black background."""
    rng = np.random.default_rng(12345)
    lut = rng.integers(64, 256, (256, 3), dtype=np.uint8)
    lut[0] = 0
    return lut[ids]


def tiles_for(row: dict[str, np.ndarray], size: int) -> list[tuple[str, np.ndarray]]:
    """(label, (size, size, 3) uint8) tiles: the image, each map present, the palette."""
    from PIL import Image

    def fit(a: np.ndarray) -> np.ndarray:
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        return np.asarray(Image.fromarray(a).resize((size, size), Image.Resampling.NEAREST))

    tiles = [("image", fit(row["image"]))]
    for name in MAPS:
        if name in row:
            a = colourize_instances(row[name]) if name == "instances" else row[name]
            tiles.append((name, fit(a)))
    if "palette" in row:
        from pipelines.conditions.palette import render_palette

        tiles.append(
            ("palette", fit(render_palette(row["palette"].astype(np.float32), width=size, height=size)))
        )
    return tiles


def write_preview(shard: str | Path, out: str | Path, rows: int = 8, size: int = 96) -> None:
    """A grid PNG of the first ``rows`` rows of ``shard``: one line per row, one tile per representation."""
    from PIL import Image, ImageDraw

    data = read_shard(shard)
    n = min(rows, len(data["key"]))
    lines = [tiles_for({k: v[i] for k, v in data.items()}, size) for i in range(n)]
    cols = max(len(t) for t in lines)
    head, text_h, pad = 14, 14, 4
    W = cols * (size + pad) + pad
    H = head + n * (size + text_h + pad) + pad
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, (label, _) in enumerate(lines[0]):
        draw.text((pad + c * (size + pad), 1), label, fill=(0, 0, 0))
    for r, tiles in enumerate(lines):
        y = head + r * (size + text_h + pad)
        for c, (_, tile) in enumerate(tiles):
            canvas.paste(Image.fromarray(tile), (pad + c * (size + pad), y))
        caption = f"{data['key'][r]}: {data['text'][r]}"[: W // 6]
        draw.text((pad, y + size + 1), caption, fill=(0, 0, 0))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
