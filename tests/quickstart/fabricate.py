"""Fabricated outputs for the quickstart tests: an evaluation as `recompose evaluate` writes it, and
a shipped reference model (pipeline, reference.json, evaluation/) as `recompose reference` packs it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.files import encode_png
from pipelines.quickstart.results import EvaluateResult

PNG = encode_png(np.zeros((4, 4, 3), "uint8"))
BAR = [
    {
        "condition": "palette",
        "metric": "palette.chi2",
        "value": 0.2,
        "floor": 0.8,
        "ceiling": 0.01,
        "ratio": 0.25,
        "target": "≤ 0.5×",
        "pass": True,
    },
    {
        "condition": "sketch",
        "metric": "sketch.f1",
        "value": 0.1,
        "floor": 0.1,
        "ceiling": None,
        "ratio": 1.0,
        "target": "≥ 2.0×",
        "pass": False,
    },
]
# what the fabricated reference model's record says of its training
REFERENCE_STEPS, REFERENCE_SECONDS = 20000, 9000.0  # 2.50 h


def row(group, subset, metric, value, direction="higher", n=4, std=None):
    return {
        "group": group,
        "subset": subset,
        "metric": metric,
        "direction": direction,
        "value": value,
        "std": std,
        "n": n,
        "floor": None,
        "ratio_to_floor": None,
    }


def write_evaluation(
    out: Path,
    quality: bool,
    num_rows: int = 4,
    steps: int = 4,
    bar: list[dict] = BAR,
    bench_value: float = 0.5,
    pictures: tuple[str, ...] = ("fidelity.png", "examples.png"),
) -> EvaluateResult:
    """An evaluation output as `recompose evaluate` writes it (the files the report reads); no
    benchmark.png by default: a picture not written is left out of the report."""
    rows = [
        row("fidelity", s, m, v, d)
        for s in ("none", "palette", "<b>sketch</b>", "real")
        for m, v, d in (("palette.chi2", 0.5, "lower"), ("sketch.f1", float("nan"), "higher"))
    ]
    rows += [
        row("benchmark", f"{src}/{side}", m, bench_value, n=3)
        for side in ("heldout", "seen")
        for src in ("caption", "real")
        for m in ("count", "all")
    ]
    if quality:
        rows += [
            row("quality", "caption", "fid", 123.4, "lower", n=8),
            row("quality", "caption", "kid_mean", 0.1, "lower", 8, 0.01),
        ]
        rows += [row("quality", "real", "clip_score", 25.0, n=8)]
    out.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "metrics.parquet")
    summary = {
        "model": "/m/export",
        "data": "/d",
        "num_rows": num_rows,
        "manifest_hash": "abc",
        "config_hash": "def",
        "config": {
            "seed": 0,
            "steps": steps,
            "guidance": 3.0,
            "num_samples": num_rows,
            "workers": 2,
            "benchmark": {"guidance": 5.0},
            "quality": {"inception_weights": "/w/inception.pt", "clip_model": None, "kid_subset_size": 1000},
        },
        "reextract": {"depth": "scene", "instances": "scene"},
        "skipped": {"depth fidelity": "no <depth> weights"},
        "quality_unavailable": {}
        if quality
        else {"fid": "no Inception weights", "kid": "no Inception weights", "clip_score": "no CLIP"},
        "quality_bar": bar,
        "metrics": {f"{r['subset']}/{r['metric']}": r["value"] for r in rows},
        "seconds": 12.0,
    }
    (out / "evaluate.json").write_text(json.dumps(summary))
    for name in pictures:
        (out / name).write_bytes(PNG)
    return EvaluateResult(output=str(out), seconds=12.0, quality_bar=bar)


# the reference model's quality bar: every row passes, values unlike the fresh model's
REFERENCE_BAR = [{**b, "value": 0.05 + i, "ratio": 0.0625, "pass": True} for i, b in enumerate(BAR)]


def write_reference(out: Path, pipeline: str | Path) -> Path:
    """A shipped reference model in ``out``: the saved pipeline ``pipeline`` (copied),
    reference.json and evaluation/ (64 rows, 25 steps; every file `recompose reference` ships)."""
    shutil.copytree(pipeline, out)
    record = {
        "output": str(out),
        "model": "recompose:reference",
        "steps": REFERENCE_STEPS,
        "train_seconds": REFERENCE_SECONDS,
        "config_hash": "c0ffee",
        "machine": {
            "cpu": "Test CPU",
            "cores": 8,
            "gpu": None,
            "python": "3.12",
            "torch": "2",
            "diffusers": "0",
        },
        "quality_bar": REFERENCE_BAR,
        "benchmark": {"caption/seen/all": 0.875},
    }
    (out / "reference.json").write_text(json.dumps(record))
    pictures = ("fidelity.png", "benchmark.png", "examples.png")
    write_evaluation(
        out / "evaluation",
        True,
        num_rows=64,
        steps=25,
        bar=REFERENCE_BAR,
        bench_value=0.875,
        pictures=pictures,
    )
    (out / "evaluation" / "results.md").write_text("# Evaluation\n")
    return out
