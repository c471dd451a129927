"""The built-in synthetic dataset (``recompose synth``): parquet shards with ground truth.

Scenes, captions and the caption grammar live in ``pipelines.data.scene``; this module writes
them to disk in the format the decomposition job reads::

    OUTPUT/part-00000.parquet, part-00001.parquet, ...   rows_per_file rows each
        key           string  f"{split}-{i:08d}"
        image         binary  PNG, RGB
        caption       string  see pipelines.data.scene
        gt_instances  binary  PNG, mode "L": 0 = background, k = object drawn k-th (z = k)
        gt_depth      binary  PNG, mode "L": 0 = background, round(255 * z / 3) (larger = nearer)
        scene         string  JSON: background and objects (shape, colour, rgb, centre, size,
                              rotation, z)
        split         string
    OUTPUT/synth.json     manifest: parameters, palette, held-out pairs, files with sha256
    OUTPUT/preview.png    contact sheet of the first samples: image | instances | depth, caption

Every file is written to a temporary name and renamed, and its bytes depend only on the
parameters, so a rerun with the same parameters skips what is already there and an
interrupted run resumes. Each shard records the parameters in its parquet schema metadata.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from pipelines.data.scene import (
    COLOURS,
    DEPTH_LEVELS,
    HELDOUT_PAIRS,
    SHAPES,
    SPLITS,
    Split,
    SynthSample,
    parse_caption,
    render_sample,
)
from pipelines.files import encode_png

__all__ = [
    "COLOURS",
    "DEPTH_LEVELS",
    "FORMAT",
    "HELDOUT_PAIRS",
    "SCHEMA",
    "SHAPES",
    "SynthSample",
    "parse_caption",
    "render_sample",
    "write_synth",
]

FORMAT = "recompose.synth/1"
_META_KEY = b"recompose.synth"  # parquet schema metadata: the parameters that wrote the shard
SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("image", pa.binary()),
        ("caption", pa.string()),
        ("gt_instances", pa.binary()),
        ("gt_depth", pa.binary()),
        ("scene", pa.string()),
        ("split", pa.string()),
    ]
)
_PART_RE = re.compile(r"^part-(\d{5})\.parquet$")
_PREVIEW_SAMPLES = 16
_PANEL = 128  # preview panel side in pixels
# Okabe-Ito colours for instance ids 1..3 (colour-blind safe); id 0 is dark gray.
_INSTANCE_PALETTE = np.array([(40, 40, 40), (230, 159, 0), (86, 180, 233), (0, 158, 115)], np.uint8)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; shards are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _part_bytes(params: dict[str, Any], start: int, stop: int, bar: tqdm) -> bytes:
    seed, split, res = params["seed"], params["split"], params["resolution"]
    rows: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    for i in range(start, stop):
        bar.update(1)
        s = render_sample(seed, split, i, res)
        rows["key"].append(f"{split}-{i:08d}")
        rows["image"].append(encode_png(s.image))
        rows["caption"].append(s.caption)
        rows["gt_instances"].append(encode_png(s.instances))
        rows["gt_depth"].append(encode_png(s.depth))
        rows["scene"].append(json.dumps(s.scene, sort_keys=True))
        rows["split"].append(split)
    schema = SCHEMA.with_metadata({_META_KEY: json.dumps(params, sort_keys=True).encode()})
    table = pa.Table.from_pydict(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="snappy", row_group_size=max(1, stop - start))
    return buf.getvalue()


def _existing_part_ok(path: Path, params: dict[str, Any], rows: int) -> bool:
    """Whether ``path`` is a complete shard of this run; raise if it belongs to another run."""
    try:
        meta = pq.read_metadata(path)
        theirs = json.loads((meta.schema.to_arrow_schema().metadata or {}).get(_META_KEY, b"null"))
    except Exception as e:  # an unreadable file under our name: never overwrite what we did not write
        raise FileExistsError(
            f"{path} is not a readable synth shard ({e}); remove it or pick another output"
        ) from e
    if theirs != params:
        raise FileExistsError(f"{path} was written with {theirs}, not {params}; pick another output")
    return meta.num_rows == rows


def _check_output(out: Path, params: dict[str, Any], n_parts: int) -> dict[str, str]:
    """Refuse a non-empty ``out`` that is not this run's; return the manifest's {path: sha256}."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a directory")
    if not out.exists():
        return {}
    manifest, recorded = out / "synth.json", {}
    if manifest.exists():
        try:
            old = json.loads(manifest.read_text())
            theirs = {k: old.get(k) for k in params}
            recorded = {f["path"]: f["sha256"] for f in old.get("files", [])}
        except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
            raise FileExistsError(f"{manifest} is not a synth manifest ({e}); pick another output") from e
        if theirs != params:
            raise FileExistsError(
                f"output {out} holds a synth output with different parameters {theirs}; "
                f"requested {params}. Pick another output directory"
            )
    foreign = []
    for entry in sorted(out.iterdir()):
        m = _PART_RE.match(entry.name)
        ours = entry.name in ("synth.json", "preview.png") or (
            entry.name.startswith(".") and entry.name.endswith(".tmp")
        )
        if not (ours or (m and int(m.group(1)) < n_parts)) or not entry.is_file():
            foreign.append(entry.name)
    if foreign:
        raise FileExistsError(
            f"output {out} is not empty and not a synth output with these parameters "
            f"(unexpected: {', '.join(foreign[:5])}); pick an empty or new directory"
        )
    return recorded


def _panel(array: np.ndarray, nearest: bool) -> Image.Image:
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return Image.fromarray(array).convert("RGB").resize((_PANEL, _PANEL), resample)


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    lines = [""]
    for word in text.split():
        candidate = f"{lines[-1]} {word}".strip()
        if lines[-1] and font.getlength(candidate) > width:
            lines.append(word)
        else:
            lines[-1] = candidate
    return lines


def preview_image(samples: list[tuple[str, SynthSample]]) -> Image.Image:
    """Contact sheet, 4 per row: image | instance map (coloured) | depth map, key and caption below."""
    font = ImageFont.load_default()
    gap, line_h, lines, header = 4, 12, 4, 18
    tile_w, tile_h = 3 * _PANEL + 2 * gap, _PANEL + lines * line_h + 2 * gap
    cols = min(4, len(samples))
    rows = -(-len(samples) // cols)
    sheet = Image.new("RGB", (max(cols * (tile_w + 2 * gap), 640), header + rows * tile_h), "white")
    draw = ImageDraw.Draw(sheet)
    legend = "each sample: image | instance ids (1 orange, 2 blue, 3 green; 1 = bottom) | depth (brighter = nearer)"
    draw.text((gap, 3), legend, fill="black", font=font)
    for n, (key, s) in enumerate(samples):
        x0, y0 = (n % cols) * (tile_w + 2 * gap) + gap, header + (n // cols) * tile_h
        panels = (s.image, _INSTANCE_PALETTE[np.minimum(s.instances, 3)], s.depth)
        for p, arr in enumerate(panels):
            nearest = p > 0 or s.image.shape[0] <= _PANEL  # keep label maps and upscaled pixels crisp
            sheet.paste(_panel(arr, nearest), (x0 + p * (_PANEL + gap), y0))
        for k, line in enumerate(_wrap(f"{key}: {s.caption}", font, tile_w)[:lines]):
            draw.text((x0, y0 + _PANEL + gap + k * line_h), line, fill="black", font=font)
    return sheet


def write_synth(
    output: str | Path,
    count: int,
    resolution: int,
    seed: int,
    split: Split,
    rows_per_file: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``count`` samples of (seed, split) at ``resolution`` to ``output``; return a summary.

    Raises ``ValueError`` on bad arguments and ``FileExistsError`` when ``output`` is non-empty
    and not a synth output with the same parameters. Rerunning skips shards already written.
    """
    for name, value, lo in (("count", count, 1), ("rows_per_file", rows_per_file, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 16 <= resolution <= 4096:
        raise ValueError(f"resolution must be an integer in [16, 4096], got {resolution!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    t0 = time.perf_counter()
    out = Path(output)
    params = {
        "format": FORMAT,
        "count": count,
        "resolution": resolution,
        "seed": seed,
        "split": split,
        "rows_per_file": rows_per_file,
    }
    n_parts = -(-count // rows_per_file)
    recorded = _check_output(out, params, n_parts)
    out.mkdir(parents=True, exist_ok=True)

    files, written = [], 0
    with tqdm(total=count, desc=f"synth {split}", unit="img", disable=not progress, file=sys.stderr) as bar:
        for p in range(n_parts):
            start, stop = p * rows_per_file, min(count, (p + 1) * rows_per_file)
            path = out / f"part-{p:05d}.parquet"
            sha = None
            if path.exists() and _existing_part_ok(path, params, stop - start):
                sha = _sha256(path.read_bytes())
                if path.name in recorded and recorded[path.name] != sha:
                    sha = None  # changed since the manifest was written: rewrite it
            if sha is None:
                data = _part_bytes(params, start, stop, bar)
                _write_atomic(path, data)
                sha, written = _sha256(data), written + 1
            else:
                bar.update(stop - start)
            files.append({"path": path.name, "rows": stop - start, "sha256": sha})

    first = [
        (f"{split}-{i:08d}", render_sample(seed, split, i, resolution))
        for i in range(min(count, _PREVIEW_SAMPLES))
    ]
    buf = io.BytesIO()
    preview_image(first).save(buf, format="PNG", compress_level=6)
    manifest = {
        **params,
        "shapes": list(SHAPES),
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "heldout_pairs": [list(p) for p in HELDOUT_PAIRS],
        "depth_levels": list(DEPTH_LEVELS),
        "files": files,
    }
    for name, data in (
        ("preview.png", buf.getvalue()),
        ("synth.json", json.dumps(manifest, indent=2).encode()),
    ):
        path = out / name
        if not path.exists() or path.read_bytes() != data:
            _write_atomic(path, data)
    return {
        "output": str(out),
        "count": count,
        "files": n_parts,
        "written": written,
        "skipped": n_parts - written,
        "manifest": str(out / "synth.json"),
        "preview": str(out / "preview.png"),
        "seconds": round(time.perf_counter() - t0, 3),
    }
