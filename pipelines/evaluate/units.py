"""What the evaluation measures: its rows (data and benchmark) and the units of work over them.

A unit is one call of a worker (``pipelines/evaluate/worker.py``): at most ``batch_size`` rows of
one source generated under one subset of conditions (or, for ``real``, taken as they are). The
rows themselves travel once to every worker (``RowSets``); a unit names them by index, so the
units stay a few bytes each in the Ray dataset.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pipelines.errors import UserError
from pipelines.evaluate.config import EvalConfig

FIDELITY = ("palette", "sketch", "instances", "depth", "intensity")  # re-extracted representations
EVAL = "eval"  # the RowSets key of the data's evaluation rows
SIDES = ("seen", "heldout")  # benchmark captions: only seen (colour, shape) pairs / a held-out one

Row = dict[str, Any]
RowSets = dict[str, list[Row]]  # EVAL -> data rows, "bench/<side>" -> benchmark rows


class EvalError(UserError):
    """Bad model, data, output or configuration for the evaluation; the message says which."""


@dataclass(frozen=True)
class Unit:
    """One worker call: rows ``rows`` of ``source`` under the conditions of subset ``name``."""

    # A subset ("none", "caption", …), "real", or "bench/<side>", "bench-none/<side>",
    # "bench-real/<side>" for the benchmark's generated, unconditional and rendered images.
    name: str
    kind: Literal["subset", "real", "bench", "bench-real"]  # real kinds take the row's image as is
    source: str  # a RowSets key
    rows: tuple[int, ...]  # indices into the source; row i is sampled with seed + i
    conditions: tuple[str, ...] = ()
    guidance: float | None = None  # None: EvalConfig.guidance

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Unit:
        d = json.loads(text)
        return cls(**{**d, "rows": tuple(d["rows"]), "conditions": tuple(d["conditions"])})


@dataclass(frozen=True)
class UnitResult:
    """What a unit made: its images in ``rows`` order and the measurements of each."""

    name: str  # the unit's name
    rows: tuple[int, ...]
    images: np.ndarray  # (len(rows), R, R, 3) uint8
    records: list[dict[str, Any]]  # metric -> value ("bench" -> the scene parser's score)


# -- rows -----------------------------------------------------------------------------------------
def load_rows(cfg: EvalConfig, model_config: Any, spec: Any) -> list[Row]:
    """The first ``num_samples`` rows of ``spec`` at the model's side R, as the model takes them.

    Each row: "key", "text", "image" (R, R, 3) uint8, "inputs" condition -> model input keys
    (``model_inputs.py``), "given" representation -> the value given (palette (156,), maps
    (R, R) uint8) and "mask" (R, R) {0, 1}. Maps are resized exactly as training resizes them
    (``augment.crop_and_flip`` with the full frame), intensity is the stored BT.601 one.
    """
    from pipelines.conditions.mask import MaskGenerator
    from pipelines.data.augment import AugmentConfig
    from pipelines.data.batches import make_recipe, prepare_batch

    conditions = tuple(c for c in spec.conditions if c != "mask")
    full_frame = AugmentConfig(crop_scale=(1.0, 1.0), flip=False, random_intensity=False)
    recipe = make_recipe(spec, model_config, conditions, full_frame)
    table = _read_table(cfg, spec, recipe.columns)
    n = table.num_rows
    batch = prepare_batch(table, recipe)
    masks = MaskGenerator(full_frame.mask, recipe.size).generate(
        n, recipe.size, np.random.default_rng(cfg.mask_seed), batch.get("instances")
    )
    keys = table.column("key").to_pylist() if "key" in table.column_names else list(range(n))
    texts = table.column("text").to_pylist() if "text" in table.column_names else [""] * n
    return [
        {
            "key": str(keys[i]),
            "text": str(texts[i] or ""),
            "image": batch["image"][i],
            "inputs": _inputs(batch, i, conditions, model_config.caption_encoder, texts[i]),
            "given": {name: batch[name][i] for name in FIDELITY if name in batch},
            "mask": masks[i],
        }
        for i in range(n)
    ]


def _read_table(cfg: EvalConfig, spec: Any, recipe_columns: tuple[str, ...] | list[str]) -> Any:
    """The first ``num_samples`` rows of the data's files (pyarrow Table), in manifest order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = set(pq.read_schema(spec.files[0]).names)
    columns = [c for c in ("key", "text") if c in names and c not in recipe_columns] + list(recipe_columns)
    tables, n = [], 0
    for f in spec.files:
        t = pq.read_table(f, columns=columns)
        tables.append(t.slice(0, cfg.num_samples - n))
        n += tables[-1].num_rows
        if n >= cfg.num_samples:
            break
    if n < cfg.num_samples:
        raise EvalError(f"--data {spec.root}: holds {n} rows, fewer than --num-samples {cfg.num_samples}")
    return pa.concat_tables(tables)


def _inputs(
    batch: dict[str, Any], i: int, conditions: tuple[str, ...], caption_encoder: str, text: Any
) -> dict[str, dict[str, Any]]:
    """Condition -> the model input keys of row ``i`` of a prepared batch."""
    inputs: dict[str, dict[str, Any]] = {}
    if "caption" in conditions and batch["has_caption"][i]:
        if caption_encoder == "trainable":
            inputs["caption"] = {"text": str(text)}
        else:
            inputs["caption"] = {k: batch[k][i] for k in batch if k.startswith("caption.")}
    if "semantics" in conditions:
        sem = batch.get("semantics")
        inputs["semantics"] = (
            {"semantics": sem[i]} if sem is not None else {"semantics.image": batch["image"][i]}
        )
    for name in FIDELITY:
        if name in batch:
            inputs[name] = {name: batch[name][i]}
    inputs["mask"] = {}  # the pipeline adds the mask inputs from source= and mask=
    return inputs


def is_synthetic(rows: list[Row]) -> bool:
    """Whether the rows' captions are the synthetic generator's (``synth_scene`` grammar)."""
    from pipelines.data.scene import parse_caption

    try:
        for r in rows:
            parse_caption(r["text"])
    except ValueError:
        return False
    return bool(rows)


def benchmark_rows(cfg: EvalConfig, resolution: int) -> RowSets:
    """Fresh generator scenes at the model's side: ``num_captions`` per side, seen then held-out.

    Each row: "key", "text" (the caption, also the only model input), "image" the generator's
    render (R, R, 3) uint8, "split"."""
    from pipelines.data.scene import render_sample

    n = cfg.benchmark.num_captions or cfg.num_samples
    out: RowSets = {}
    for side, split in zip(SIDES, ("train", "heldout"), strict=True):
        rows = []
        for i in range(n):
            s = render_sample(cfg.benchmark.seed, split, i, resolution)
            rows.append(
                {
                    "key": f"{split}/{i}",
                    "text": s.caption,
                    "image": s.image,
                    "split": split,
                    "inputs": {"caption": {"text": s.caption}},
                }
            )
        out[f"bench/{side}"] = rows
    return out


# -- units of work --------------------------------------------------------------------------------
def runnable_subsets(
    cfg: EvalConfig, available: set[str]
) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """``none`` and every configured subset whose conditions the model and data have; the
    others, skipped, with the reason."""
    subsets: dict[str, tuple[str, ...]] = {"none": ()}
    skipped: dict[str, str] = {}
    for name, conds in cfg.subsets.items():
        missing = [c for c in conds if c not in available]
        if missing:
            skipped[name] = f"the model or data has no {', '.join(missing)}"
        else:
            subsets[name] = tuple(conds)
    return subsets, skipped


def _batches(n: int, size: int) -> list[tuple[int, ...]]:
    return [tuple(range(start, min(n, start + size))) for start in range(0, n, size)]


def make_units(cfg: EvalConfig, rowsets: RowSets, subsets: dict[str, tuple[str, ...]]) -> list[Unit]:
    """Units of at most ``batch_size`` rows: each of ``subsets`` and ``real`` over the data's rows,
    then, when ``rowsets`` holds benchmark rows, the benchmark's caption-only, unconditional
    (the floor: the same seeds read against the same captions) and rendered images per side."""
    units = []
    for idx in _batches(len(rowsets[EVAL]), cfg.batch_size):
        units += [Unit(name, "subset", EVAL, idx, conds) for name, conds in subsets.items()]
        units.append(Unit("real", "real", EVAL, idx))
    for side in SIDES:
        source = f"bench/{side}"
        for idx in _batches(len(rowsets.get(source, ())), cfg.batch_size):
            units += [
                Unit(source, "bench", source, idx, ("caption",), cfg.benchmark.guidance),
                Unit(f"bench-none/{side}", "bench", source, idx),
                Unit(f"bench-real/{side}", "bench-real", source, idx),
            ]
    return units
