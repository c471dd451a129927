"""How the job lays out its stages: the CPU extractors inside the decode tasks, models in actors,
and whole shards written by the tasks that computed them when no extractor runs a model.

The layout must not change what is written: the same input through the inline layout (with the
shards written by the tasks or by the driver) and through one actor stage per extractor gives the
same shards, errors and manifest, bit for bit, and a row records the first stage it fails in, in
the job's extractor order.
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
from pipelines.decompose.execute import _Progress, _writes_in_tasks, split_stages
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


def test_a_long_run_logs_its_progress(caplog, tmp_path):
    import time

    import psutil

    caplog.set_level("INFO", logger="pipelines.decompose.execute")
    images.write_folder(tmp_path / "in", n_good=3, with_bad=False)
    (p,) = JobPlan(_cfg(tmp_path / "in", tmp_path / "out")).pending()
    work = [p] * 1000  # 3,000 images in 1000 shards
    report = _Progress(work, bar=False, every=0.0)
    started = psutil.Process().create_time()
    report.first_row(started + 2.5)
    report.first_row(started + 9.0)  # logged once: the first
    report.update(3, committed=False)
    report.update(3, committed=True)
    report.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("first rows processed 2.5 s after the process started (")
    assert len([x for x in lines if x.startswith("first rows")]) == 1
    assert lines[-1].startswith("6/3,000 images (0.2%), ") and "1/1000 shards committed" in lines[-1]
    assert lines[-1].endswith(" left") and "?" not in lines[-1]
    assert time.time() > started


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
def test_inline_and_one_actor_per_extractor_write_the_same_bytes(tmp_path, ray_local, caplog):
    # Row 1 has no ground truth: depth (no model) and instances (ground truth only) both fail on
    # it, and instances comes first in the job's order. Row 3 is not an image.
    _broken_synth(tmp_path / "synth", 14)
    kw = {"instances.method": "ground_truth", "conditions": "palette,sketch,instances,depth,intensity"}
    # 14 inputs in 3 shards: the driver computes the first while Ray starts, then the other two
    # for 2 process slots: the tasks write them
    caplog.set_level("INFO", logger="pipelines.decompose.execute")
    inline = run_decompose(_cfg(tmp_path / "synth", tmp_path / "inline", **kw))
    assert "the driver computes shard" in caplog.text
    assert "stages: process and write each shard" in caplog.text
    caplog.clear()
    tasks = run_decompose(_cfg(tmp_path / "synth", tmp_path / "tasks", driver_first_shard=False, **kw))
    assert "the driver computes shard" not in caplog.text
    assert "stages: process and write each shard" in caplog.text
    driver = run_decompose(_cfg(tmp_path / "synth", tmp_path / "driver", write_in_tasks=False, **kw))
    apart = run_decompose(_cfg(tmp_path / "synth", tmp_path / "apart", inline_extractors=False, **kw))
    assert inline.errors == tasks.errors == apart.errors == driver.errors == 2
    assert inline.errors_by_stage == {"decode": 1, "instances": 1}
    assert inline.shards_computed == tasks.shards_computed == 3
    assert (
        _outputs(tmp_path / "inline")
        == _outputs(tmp_path / "tasks")
        == _outputs(tmp_path / "driver")
        == _outputs(tmp_path / "apart")
    )


def test_tasks_write_whole_shards_only_without_models_with_shards_enough_that_fit(tmp_path, caplog):
    caplog.set_level("INFO", logger="pipelines.decompose.execute")
    images.write_folder(tmp_path / "in", n_good=12, with_bad=False)

    def decide(cpus: float, **kw) -> bool:
        job = JobPlan(_cfg(tmp_path / "in", tmp_path / "out", shard_size=4, **kw))
        work = job.pending()
        return _writes_in_tasks(job, work, split_stages(job, work)[1], cpus)

    assert decide(2.0, conditions="palette,intensity")  # 3 shards, 2 slots
    assert not decide(2.0, conditions="palette,intensity", write_in_tasks=False)
    assert not decide(4.0, conditions="palette,intensity")  # 3 shards for 4 slots: smaller tasks
    assert decide(4.0, conditions="palette,intensity", **{"decode.num_cpus": 2})
    assert not decide(2.0, conditions="palette,sketch", inline_extractors=False)  # actor stages
    big = JobPlan(
        _cfg(tmp_path / "in", tmp_path / "o2", shard_size=4, resolution=512, conditions="intensity")
    )
    work = big.pending()  # 4 x (512² x 4) = 4 MiB per shard
    assert _writes_in_tasks(big, work, [], 2.0)
    capped = big.cfg.model_copy(update={"write_in_tasks_max_mb": 3})
    big.cfg = capped
    assert not _writes_in_tasks(big, work, [], 2.0)
    assert "over write_in_tasks_max_mb (3)" in caplog.text


class _Stop(Exception):
    pass


def _stop_after(what: str, shard: str):
    def hook(file: str, name: str) -> None:
        if (file, name) == (what, shard):
            raise _Stop(f"stopped after writing {what} of {shard}")

    return hook


@pytest.mark.slow
def test_a_task_stopped_between_its_writes_leaves_a_shard_the_rerun_computes_again(
    tmp_path, ray_local, monkeypatch, caplog
):
    """The write seam reaches the tasks (and the driver's own first shard): a shard whose data
    files a task wrote, but whose state the driver never did, is computed again, and the output
    matches an uninterrupted run's."""
    from pipelines.decompose import commit

    caplog.set_level("INFO", logger="pipelines.decompose.execute")
    images.write_folder(tmp_path / "in", n_good=12)
    kw = {"conditions": "palette,intensity", "shard_size": 4}
    ref = run_decompose(_cfg(tmp_path / "in", tmp_path / "ref", **kw))
    assert ref.shards_computed >= 2
    assert "stages: process and write each shard" in caplog.text
    assert "the driver computes shard folder-00000" in caplog.text
    for what, shard in (("shard", "folder-00001"), ("errors", "folder-00001"), ("shard", "folder-00000")):
        out = tmp_path / f"{what}-{shard}"
        monkeypatch.setattr(commit, "write_hook", _stop_after(what, shard))
        with pytest.raises(Exception, match=f"stopped after writing {what} of {shard}"):
            run_decompose(_cfg(tmp_path / "in", out, **kw))
        monkeypatch.setattr(commit, "write_hook", None)
        assert (out / "shards" / f"{shard}.parquet").exists()
        assert not (out / ".recompose" / "state" / f"{shard}.json").exists()
        again = run_decompose(_cfg(tmp_path / "in", out, **kw))
        assert shard in {p.name.split(".")[0] for p in (out / ".recompose" / "state").glob("*.json")}
        assert again.shards_computed >= 1
        assert _outputs(out) == _outputs(tmp_path / "ref")
