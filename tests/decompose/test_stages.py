"""How the job lays out its stages: the CPU extractors inside the decode tasks, models in actors.

The layout must not change what is written: the same input through the inline layout and
through one actor stage per extractor gives the same shards, errors and manifest, bit for bit,
and a row records the first stage it fails in, in the job's extractor order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.conditions.instances import InstancesConfig
from pipelines.config import load_config
from pipelines.data.decode import DecodeConfig, decode_batch
from pipelines.data.synth import write_synth
from pipelines.decompose.config import DecomposeConfig
from pipelines.decompose.execute import _Report, split_stages
from pipelines.decompose.job import run_decompose
from pipelines.decompose.plan import JobPlan
from pipelines.decompose.stages import ROW_COLUMNS, ExtractorStage, process, read_item, work_items
from tests.helpers import images


def _rows(n: int, gt: list[bool]) -> dict[str, np.ndarray]:
    """``n`` encoded rows as the read stage yields them; row i carries ground truth if gt[i]."""
    png = [images.good_png(i, 32) for i in range(n)]
    gi = images.encode(images.two_colour(32, 32, (0, 0, 0), (1, 1, 1)).convert("L"), "PNG")
    return {
        "shard": np.array(["s"] * n, object),
        "index": np.arange(n),
        "key": np.array([f"k{i}" for i in range(n)], object),
        "source": np.array([f"k{i}.png" for i in range(n)], object),
        "text": np.array([""] * n, object),
        "todo": np.array(["instances,depth,intensity"] * n, object),
        "data": np.array(png, object),
        "gt_instances_png": np.array([gi if g else b"" for g in gt], object),
        "gt_depth_png": np.array([gi if g else b"" for g in gt], object),
        "err_stage": np.array([""] * n, object),
        "err_type": np.array([""] * n, object),
        "err_msg": np.array([""] * n, object),
    }


def test_a_row_records_the_first_stage_it_fails_in_whatever_order_they_ran():
    decoded = decode_batch(_rows(3, [True, False, True]), 16, DecodeConfig(), with_gt=True)
    # Rows 0 and 1 already failed in intensity (after instances in the job's order), row 2 is clean.
    decoded["err_stage"] = np.array(["intensity", "intensity", ""], object)
    decoded["err_type"] = np.array(["E", "E", ""], object)
    gt_only = InstancesConfig(method="ground_truth")
    out = ExtractorStage("instances", gt_only, 16, True, ran_later=["intensity"])(decoded)
    # Row 1 has no ground truth: it fails here too, and instances comes first.
    assert out["err_stage"].tolist() == ["intensity", "instances", ""]
    assert out["err_type"][1] == "ValueError" and "ground truth" in out["err_msg"][1]
    assert out["instances"][2].max() == 1  # computed for the clean row
    # Without ran_later (instances ran first), a row that already failed is left alone.
    out = ExtractorStage("instances", gt_only, 16, True)(dict(decoded))
    assert out["err_stage"].tolist() == ["intensity", "intensity", ""]


def _broken_synth(root: Path, count: int) -> None:
    """The synthetic set with row 1 stripped of its ground truth and row 3 not an image."""
    write_synth(root, count=count, resolution=48, seed=5, split="train", progress=False)
    part = next(root.rglob("*.parquet"))
    table = pq.read_table(part)
    for column, row, value in (("gt_instances", 1, b""), ("image", 3, b"not an image")):
        values = table.column(column).to_pylist()
        values[row] = value
        i = table.schema.get_field_index(column)
        table = table.set_column(i, table.schema.field(column), pa.array(values, pa.binary()))
    pq.write_table(table, part)


def test_process_is_read_decode_then_each_stage_then_the_write(tmp_path):
    _broken_synth(tmp_path / "synth", 6)
    kw = {"instances.method": "ground_truth", "conditions": "instances,intensity", "shard_size": 6}
    job = JobPlan(_cfg(tmp_path / "synth", tmp_path / "out", **kw))
    (p,) = job.pending()
    items = work_items(p.unit, p.todo, 4)
    assert [i["offset"] for i in items] == [0, 4]  # 6 inputs → items of 4 and 2
    read = {"root": job.plan.root, "image_column": None, "caption_column": None, "max_bytes": None}
    decode = {"cfg": job.cfg.decode, "with_gt": True}
    configs = {n: getattr(job.cfg, n) for n in ("instances", "intensity")}
    batch = {k: np.array([i[k] for i in items], object) for k in items[0]}
    got = process(batch, read, decode, configs, 32, True, columns=None)

    want = []
    for item in items:
        b = decode_batch(read_item(item, read), 32, job.cfg.decode, with_gt=True)
        for name, config in configs.items():
            b = ExtractorStage(name, config, 32, True)(b)
        want.append(b)
    assert got["index"].tolist() == list(range(6))
    for k in got:
        np.testing.assert_array_equal(got[k], np.concatenate([w[k] for w in want]))
    assert got["err_stage"].tolist() == ["", "instances", "", "decode", "", ""]

    # To the driver: the row's identity, errors, image and the conditions, nothing it does not store.
    out = process(batch, read, decode, configs, 32, True, columns=["instances", "intensity"])
    assert sorted(out) == sorted([*ROW_COLUMNS, "instances", "intensity"])
    for k in out:
        np.testing.assert_array_equal(out[k], got[k])


def test_a_long_run_logs_its_progress(caplog):
    caplog.set_level("INFO", logger="pipelines.decompose.execute")
    report = _Report(total=1_000_000, shards=1000, every=0.0)
    report.update(64, 0)
    report.update(64, 1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("first rows written ")
    assert lines[-1].startswith("128/1,000,000 images (0.0%), ") and "1/1000 shards committed" in lines[-1]
    assert lines[-1].endswith(" left") and "?" not in lines[-1]


def _cfg(inp: Path, out: Path, **kw) -> DecomposeConfig:
    values = {"input": str(inp), "output": str(out), "resolution": 32, "progress": False, "shard_size": 5}
    return load_config(DecomposeConfig, values={**values, **kw})


def test_no_weights_extractors_run_inline_and_models_get_actors(tmp_path):
    images.write_folder(tmp_path / "in", n_good=3, with_bad=False)
    job = JobPlan(_cfg(tmp_path / "in", tmp_path / "out", conditions="palette,sketch,intensity,instances"))
    assert split_stages(job, job.pending()) == (["palette", "sketch", "instances", "intensity"], [])
    apart = JobPlan(
        _cfg(tmp_path / "in", tmp_path / "o2", conditions="palette,sketch", inline_extractors=False)
    )
    assert split_stages(apart, apart.pending()) == ([], ["palette", "sketch"])
    for name, cls_kw in {"sketch": {"method": "pidinet"}, "instances": {"method": "model"}}.items():
        ext = (
            job.extractors.get(name)
            or JobPlan(_cfg(tmp_path / "in", tmp_path / "o3", conditions=name)).extractors[name]
        )
        model = type(ext)(type(ext.config)(**cls_kw), 32)
        assert model.uses_model() and not ext.uses_model()


def _outputs(out: Path) -> dict[str, bytes]:
    files = sorted(
        [*out.glob("shards/*.parquet"), out / "errors.parquet", *out.glob(".recompose/state/*.json")]
    )
    got = {str(p.relative_to(out)): p.read_bytes() for p in files}
    got["manifest"] = json.dumps(json.loads((out / "manifest.json").read_text()), sort_keys=True).encode()
    return got


@pytest.mark.slow
def test_inline_and_one_actor_per_extractor_write_the_same_bytes(tmp_path, ray_local):
    # Row 1 has no ground truth: depth (no model) and instances (ground truth only) both fail on
    # it, and instances comes first in the job's order. Row 3 is not an image.
    _broken_synth(tmp_path / "synth", 14)
    kw = {"instances.method": "ground_truth", "conditions": "palette,sketch,instances,depth,intensity"}
    inline = run_decompose(_cfg(tmp_path / "synth", tmp_path / "inline", **kw))
    apart = run_decompose(_cfg(tmp_path / "synth", tmp_path / "apart", inline_extractors=False, **kw))
    assert inline.errors == apart.errors == 2 and inline.errors_by_stage == {"decode": 1, "instances": 1}
    assert _outputs(tmp_path / "inline") == _outputs(tmp_path / "apart")
