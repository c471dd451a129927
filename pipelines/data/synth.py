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
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont
from pydantic import Field
from tqdm import tqdm

from pipelines.config import Config, ConfigError, from_dict, resource
from pipelines.data.scene import (
    COLOURS,
    DEPTH_LEVELS,
    HELDOUT_PAIRS,
    SHAPES,
    Split,
    SynthSample,
    parse_caption,
    render_sample,
)
from pipelines.files import OutputInUse, atomic_write, claim_output, encode_png

__all__ = [
    "COLOURS",
    "DEPTH_LEVELS",
    "FORMAT",
    "HELDOUT_PAIRS",
    "SCHEMA",
    "SHAPES",
    "SynthConfig",
    "SynthResult",
    "SynthSample",
    "parse_caption",
    "render_sample",
    "run_synth",
    "write_synth",
]

log = logging.getLogger(__name__)

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


class SynthConfig(Config):
    """The parameters of a synthetic dataset; every one but ``output`` and ``progress`` decides its bytes."""

    output: str = resource("")  # the output directory (new, empty or a previous run's)
    count: int = Field(1000, ge=1)  # samples
    resolution: int = Field(64, ge=16, le=4096)  # image side in pixels; below 16 shapes vanish
    seed: int = Field(0, ge=0)  # the dataset seed: sample i of (seed, split) is always the same
    split: Split = "train"  # heldout: every scene holds a held-out colour-shape pair
    rows_per_file: int = Field(1000, ge=1)  # rows per parquet shard: the unit of resumption
    progress: bool = resource(True)  # progress bar on stderr

    def params(self) -> dict[str, Any]:
        """What ``synth.json`` and each shard's metadata record: a rerun must match them."""
        keys = ("count", "resolution", "seed", "split", "rows_per_file")
        return {"format": FORMAT, **{k: getattr(self, k) for k in keys}}


@dataclass
class SynthResult:
    """What ``recompose synth --json`` prints."""

    output: str
    count: int
    files: int  # parquet shards
    written: int  # shards written by this run
    skipped: int  # shards a previous run had written
    manifest: str
    preview: str
    seconds: float


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_shared(path: Path, data: bytes) -> None:
    def write(f: IO[bytes]) -> None:
        os.fchmod(f.fileno(), 0o644)  # mkstemp creates 0600; the dataset is meant to be shared
        f.write(data)

    atomic_write(path, write)


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
        raise OutputInUse(
            f"{path} is not a readable synth shard ({e}); remove it or pick another output"
        ) from e
    if theirs != params:
        raise OutputInUse(f"{path} was written with {theirs}, not {params}; pick another output")
    return meta.num_rows == rows


def _claim(out: Path, params: dict[str, Any], n_parts: int) -> dict[str, str]:
    """Refuse a non-empty ``out`` that is not this run's; return the manifest's {path: sha256}."""

    def ours(entry: Path) -> bool:  # what an interrupted run of these parameters leaves
        m = _PART_RE.match(entry.name)
        tmp = entry.name.startswith(".") and entry.name.endswith(".tmp")
        return entry.is_file() and (
            entry.name == "preview.png" or tmp or bool(m and int(m.group(1)) < n_parts)
        )

    prev = claim_output(out, "synth.json", "synth output", identity=params, ours=ours)
    return {f["path"]: f["sha256"] for f in (prev or {}).get("files", [])}


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
) -> SynthResult:
    """``run_synth`` with the parameters as arguments; a bad one raises ``ConfigError`` naming it."""
    values = {"output": str(output), "count": count, "resolution": resolution, "seed": seed}
    values.update(split=split, rows_per_file=rows_per_file, progress=progress)
    return run_synth(from_dict(SynthConfig, values))


def run_synth(cfg: SynthConfig) -> SynthResult:
    """Write ``cfg.count`` samples of (seed, split) at ``resolution`` to ``cfg.output``.

    Raises ``OutputInUse`` when the output is non-empty and not a synth output with the same
    parameters. Rerunning skips shards already written; an interrupted run resumes.
    """
    if not cfg.output:
        raise ConfigError("output is required")
    t0 = time.perf_counter()
    out, params = Path(cfg.output), cfg.params()
    n_parts = -(-cfg.count // cfg.rows_per_file)
    recorded = _claim(out, params, n_parts)
    out.mkdir(parents=True, exist_ok=True)
    shards, written = _write_parts(out, params, n_parts, recorded, cfg.progress)
    _write_manifest_and_preview(out, params, shards)
    result = SynthResult(
        output=str(out),
        count=cfg.count,
        files=n_parts,
        written=written,
        skipped=n_parts - written,
        manifest=str(out / "synth.json"),
        preview=str(out / "preview.png"),
        seconds=round(time.perf_counter() - t0, 3),
    )
    log.info(
        f"{result.count} samples in {result.files} files ({result.written} written, "
        f"{result.skipped} skipped) in {result.seconds:.1f}s; preview: {result.preview}"
    )
    return result


def _write_parts(
    out: Path, params: dict[str, Any], n_parts: int, recorded: dict[str, str], progress: bool
) -> tuple[list[dict[str, Any]], int]:
    """Every shard not already on disk intact; returns the manifest's file entries and how many
    shards were written."""
    count, per_file = params["count"], params["rows_per_file"]
    entries, written = [], 0
    with tqdm(
        total=count, desc=f"synth {params['split']}", unit="img", disable=not progress, file=sys.stderr
    ) as bar:
        for p in range(n_parts):
            start, stop = p * per_file, min(count, (p + 1) * per_file)
            path = out / f"part-{p:05d}.parquet"
            sha = None
            if path.exists() and _existing_part_ok(path, params, stop - start):
                sha = _sha256(path.read_bytes())
                if path.name in recorded and recorded[path.name] != sha:
                    sha = None  # changed since the manifest was written: rewrite it
            if sha is None:
                data = _part_bytes(params, start, stop, bar)
                _write_shared(path, data)
                sha, written = _sha256(data), written + 1
            else:
                bar.update(stop - start)
            entries.append({"path": path.name, "rows": stop - start, "sha256": sha})
    return entries, written


def _write_manifest_and_preview(out: Path, params: dict[str, Any], shards: list[dict[str, Any]]) -> None:
    """synth.json and preview.png, each rewritten only when its bytes differ."""
    seed, split, res = params["seed"], params["split"], params["resolution"]
    first = [
        (f"{split}-{i:08d}", render_sample(seed, split, i, res))
        for i in range(min(params["count"], _PREVIEW_SAMPLES))
    ]
    buf = io.BytesIO()
    preview_image(first).save(buf, format="PNG", compress_level=6)
    manifest = {
        **params,
        "shapes": list(SHAPES),
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "heldout_pairs": [list(p) for p in HELDOUT_PAIRS],
        "depth_levels": list(DEPTH_LEVELS),
        "files": shards,
    }
    for name, data in (
        ("preview.png", buf.getvalue()),
        ("synth.json", json.dumps(manifest, indent=2).encode()),
    ):
        path = out / name
        if not path.exists() or path.read_bytes() != data:
            _write_shared(path, data)
