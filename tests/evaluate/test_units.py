"""The evaluation's work units: which subsets run, how rows are batched, the JSON they travel as."""

from __future__ import annotations

import dataclasses

from pipelines.evaluate.config import EvalConfig
from pipelines.evaluate.report import EvalResult
from pipelines.evaluate.units import EVAL, Unit, make_units, runnable_subsets


def test_subsets_missing_a_condition_are_skipped_with_the_reason():
    cfg = EvalConfig(
        subsets={"sketch": ("sketch",), "depth": ("depth",), "mask+caption": ("mask", "caption")}
    )
    subsets, skipped = runnable_subsets(cfg, {"sketch", "mask"})
    assert subsets == {"none": (), "sketch": ("sketch",)}
    assert skipped == {
        "depth": "the model or data has no depth",
        "mask+caption": "the model or data has no caption",
    }


def test_units_batch_rows_per_subset_then_the_benchmark():
    cfg = EvalConfig(batch_size=2, subsets={"sketch": ("sketch",)}, benchmark={"guidance": 7.0})
    rowsets = {EVAL: [{}] * 3, "bench/seen": [{}] * 2, "bench/heldout": [{}] * 2}
    units = make_units(cfg, rowsets, {"none": (), "sketch": ("sketch",)})
    assert [(u.name, u.rows) for u in units[:6]] == [
        ("none", (0, 1)),
        ("sketch", (0, 1)),
        ("real", (0, 1)),
        ("none", (2,)),
        ("sketch", (2,)),
        ("real", (2,)),
    ]
    assert [u.name for u in units[6:]] == [
        "bench/seen",
        "bench-none/seen",
        "bench-real/seen",
        "bench/heldout",
        "bench-none/heldout",
        "bench-real/heldout",
    ]
    caption = units[6]
    assert caption.conditions == ("caption",) and caption.guidance == 7.0 and caption.source == "bench/seen"
    assert units[7].conditions == () and units[7].guidance is None  # the floor: unconditional
    assert all(Unit.from_json(u.to_json()) == u for u in units)


def test_summary_keys_are_evaluate_json_keys():
    keys = [f.name for f in dataclasses.fields(EvalResult)]
    assert keys == [
        "format",
        "model",
        "pipeline_dir",
        "data",
        "manifest_hash",
        "config_hash",
        "config",
        "num_rows",
        "synthetic",
        "reextract",
        "skipped",
        "training",
        "quality_unavailable",
        "seconds",
        "quality_bar",
        "metrics",
        "plots",
        "mlflow",
        "resolution",
        "cascade",
    ]
    result = EvalResult(*["x"] * 13)
    assert "mlflow" not in result.to_dict()  # MLflow disabled: the key is absent, as before
    assert dataclasses.replace(result, mlflow={"run_id": "r"}).to_dict()["mlflow"] == {"run_id": "r"}
    assert "cascade" not in result.to_dict()  # a single pipeline: no cascade key
    assert dataclasses.replace(result, cascade=[16, 32]).to_dict()["cascade"] == [16, 32]
