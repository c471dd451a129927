"""``recompose evaluate`` end to end on a tiny model (real local Ray, real SQLite MLflow), and the
table logic on hand-made records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from jobs.cli import main
from models import build_model
from pipelines.data.scene import render_sample
from pipelines.data.synth import write_synth
from pipelines.decompose.config import DecomposeConfig
from pipelines.decompose.job import run_decompose
from pipelines.diffusion.pipeline import ComposerPipeline
from pipelines.diffusion.schedulers import default_scheduler
from pipelines.evaluate.config import EvalConfig
from pipelines.evaluate.fidelity import depth_rmse_ssi, instances_miou
from pipelines.evaluate.report import fidelity_table, quality_bar
from pipelines.evaluate.scene_parser import scene_maps
from tests.helpers.cascade import make_cascade, save_stage
from tests.helpers.tiny_clip import make_tiny_open_clip
from tests.helpers.tiny_inception import make_random_fid_inception

R = 32
FAST = ["steps=2", "batch_size=4", "benchmark.num_captions=2", "grid_rows=2", "progress=false"]


@pytest.fixture(scope="module")
def ray_module():
    """A local Ray for this module only: test_serve, next, starts its own and needs none running."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_module) -> Path:
    root = tmp_path_factory.mktemp("eval-data")
    write_synth(root / "synth", count=12, resolution=R, seed=0, split="train", progress=False)
    run_decompose(
        DecomposeConfig(
            input=str(root / "synth"),
            output=str(root / "decomposed"),
            resolution=R,
            conditions=("palette", "sketch", "instances", "depth", "intensity"),
            progress=False,
        )
    )
    return root / "decomposed"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """What `recompose train` leaves: RUN_DIR/export (with recompose-training.json naming the
    MLflow run) and RUN_DIR/train.json (naming the tracking store) — a random-init tiny model."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("eval-run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("recompose")
    run_id = client.create_run(exp, run_name="run").info.run_id
    client.set_terminated(run_id)
    torch.manual_seed(0)
    pipe = ComposerPipeline(build_model("tiny", sample_size=R).eval(), default_scheduler())
    export = root / "run" / "export"
    pipe.save_pretrained(str(export))
    (export / "recompose-training.json").write_text(json.dumps({"run_id": run_id, "step": 0}))
    (root / "run" / "train.json").write_text(json.dumps({"mlflow": {"tracking_uri": uri, "run_id": run_id}}))
    return {"export": export, "uri": uri, "run_id": run_id, "root": root}


def _evaluate(trained, data, out: Path, *extra: str) -> int:
    args = ["evaluate", "--model", str(trained["export"]), "--data", str(data), "--output", str(out)]
    args += ["--num-samples", "4"]
    for item in [*FAST, *extra]:
        args += ["--set", item]
    return main(args)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> list[str]:
    """FID Inception and CLIP, random-init in their real formats: the quality metrics run too."""
    root = tmp_path_factory.mktemp("eval-weights")
    inception = make_random_fid_inception(root / "inception")
    clip = make_tiny_open_clip(root / "clip")
    return [f"quality.inception_weights={inception}", f"quality.clip_model={clip}"]


@pytest.fixture(scope="module")
def evaluated(trained, data, weights, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("eval-out") / "eval"
    rc1 = _evaluate(trained, data, out, *weights)
    first = json.loads((out / "evaluate.json").read_text())
    table1 = pq.read_table(out / "metrics.parquet").to_pylist()
    rc2 = _evaluate(trained, data, out, *weights)
    return {"out": out, "rc": (rc1, rc2), "first": first, "table1": table1, "weights": weights}


def _value(table, group, subset, metric):
    hits = [r for r in table if (r["group"], r["subset"], r["metric"]) == (group, subset, metric)]
    assert len(hits) == 1, (group, subset, metric, hits)
    return hits[0]


@pytest.mark.slow  # a tiny model trained, then the whole evaluation on a local Ray
def test_writes_table_plots_and_summary(evaluated):
    assert evaluated["rc"] == (0, 0)
    out = evaluated["out"]
    for name in ("metrics.parquet", "per_image.parquet", "results.md", "evaluate.json"):
        assert (out / name).is_file(), name
    from PIL import Image

    for name in ("fidelity.png", "benchmark.png", "examples.png"):
        w, h = Image.open(out / name).size
        assert w > 200 and h > 100, name
    table = pq.read_table(out / "metrics.parquet").to_pylist()
    subsets = {r["subset"] for r in table if r["group"] == "fidelity"}
    assert subsets == {"none", "real", *EvalConfig().subsets}
    # Every fidelity metric of every subset is a mean over the 4 rows, with the floor beside it.
    for r in table:
        if r["group"] == "fidelity" and r["metric"] != "mask.max_abs_diff":
            assert r["n"] == 4, r
            floor = _value(table, "fidelity", "none", r["metric"])["value"]
            assert r["floor"] == pytest.approx(floor)
    # The real images re-extracted the same way are the ceiling: their palette is the one given
    # (computed on the full 32 px image both times), the scene parser reads ground-truth scenes.
    assert _value(table, "fidelity", "real", "palette.chi2")["value"] < 0.02
    assert _value(table, "fidelity", "real", "instances.miou")["value"] > 0.85
    assert _value(table, "fidelity", "real", "sketch.f1")["value"] > 0.9
    # Masked generation keeps every pixel outside the mask, whatever the model.
    assert _value(table, "fidelity", "mask+caption", "mask.max_abs_diff")["value"] == 0
    # The benchmark: floor, generated and ceiling for seen and held-out captions.
    for source in ("caption", "none", "real"):
        for side in ("seen", "heldout"):
            r = _value(table, "benchmark", f"{source}/{side}", "colour")
            assert r["n"] == 2 and 0 <= r["value"] <= 1
    assert _value(table, "benchmark", "real/seen", "colour")["value"] == 1.0
    per_image = pq.read_table(out / "per_image.parquet").to_pylist()
    assert len(per_image) == 4 * (len(subsets))
    md = (out / "results.md").read_text()
    for text in ("Condition fidelity", "Quality bar", "compositional benchmark", "FID / KID / CLIP score"):
        assert text in md
    summary = json.loads((out / "evaluate.json").read_text())
    assert summary["reextract"]["depth"] == "scene" and summary["reextract"]["instances"] == "scene"
    assert summary["synthetic"] is True and summary["num_rows"] == 4
    assert {b["condition"] for b in summary["quality_bar"]} >= {"palette", "sketch", "instances", "depth"}
    assert summary["quality_unavailable"] == {}
    # FID/KID of caption-only and unconditional images against the 4 real rows; CLIP scores.
    for subset in ("caption", "none"):
        fid = _value(table, "quality", subset, "fid")
        assert fid["value"] >= 0 and fid["n"] == 4
        _value(table, "quality", subset, "kid_mean")
    for subset in ("caption", "none", "real"):
        assert 0 <= _value(table, "quality", subset, "clip_score")["value"] <= 100
    assert "299x299" in md and "pt_inception-2015-12-05-6726825d.pth sha256:" in md and "clip_variant" in md


@pytest.mark.slow  # the whole evaluation on a local Ray, through two stages
def test_a_cascade_is_evaluated_at_its_output_side(data, weights, tmp_path, capsys):
    cascade = make_cascade(tmp_path, base=16, side=R)
    out = tmp_path / "eval"
    args = [
        "evaluate",
        "--model",
        str(cascade),
        "--data",
        str(data),
        "--output",
        str(out),
        "--num-samples",
        "4",
    ]
    subsets = "subsets={caption: [caption], sketch: [sketch], mask+caption: [mask, caption]}"
    sets = [*FAST, "upsampler_steps=2", subsets, *weights]
    assert main([*args, *(a for item in sets for a in ("--set", item))]) == 0
    summary = json.loads((out / "evaluate.json").read_text())
    assert summary["resolution"] == R and summary["cascade"] == [16, R]
    table = pq.read_table(out / "metrics.parquet").to_pylist()
    assert _value(table, "fidelity", "sketch", "sketch.f1")["n"] == 4
    assert _value(table, "fidelity", "mask+caption", "mask.max_abs_diff")["value"] == 0  # exact at 32 px
    assert _value(table, "quality", "caption", "fid")["n"] == 4
    from PIL import Image

    assert Image.open(out / "examples.png").size[0] > 200
    bad = [*args[:6], str(tmp_path / "bad24"), "--set", "resolution=24"]
    assert main(bad) == 2 and "this cascade makes 16, 32 px" in capsys.readouterr().err
    # an upsampler alone is not evaluated: it needs its low-resolution input
    up = save_stage(tmp_path / "up", "upsampler-tiny", R, 2)
    bad = ["evaluate", "--model", str(up), "--data", str(data), "--output", str(tmp_path / "bad")]
    assert main(bad) == 2 and "is an upsampler" in capsys.readouterr().err


@pytest.mark.slow  # a tiny model trained, then the whole evaluation on a local Ray
def test_same_seeds_same_numbers(evaluated):
    table2 = pq.read_table(evaluated["out"] / "metrics.parquet").to_pylist()
    assert len(table2) == len(evaluated["table1"])
    for a, b in zip(evaluated["table1"], table2, strict=True):
        assert (a["subset"], a["metric"]) == (b["subset"], b["metric"])
        assert a["value"] == pytest.approx(b["value"], abs=1e-6, nan_ok=True)


@pytest.mark.slow  # a tiny model trained, then the whole evaluation on a local Ray
def test_mlflow_run_nested_under_the_training_run(evaluated, trained):
    from mlflow import MlflowClient

    client = MlflowClient(trained["uri"])
    summary = json.loads((evaluated["out"] / "evaluate.json").read_text())
    info = summary["mlflow"]
    assert info["parent_run_id"] == trained["run_id"]
    assert info["earlier_runs"] == [evaluated["first"]["mlflow"]["run_id"]]
    run = client.get_run(info["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == trained["run_id"]
    assert run.info.status == "FINISHED"
    assert run.data.params["num_samples"] == "4"
    assert "sketch/sketch.f1" in run.data.metrics and "none/palette.chi2" in run.data.metrics
    assert "ratio_to_none/sketch" in run.data.metrics and "caption/fid" in run.data.metrics
    table = pq.read_table(evaluated["out"] / "metrics.parquet").to_pylist()
    assert run.data.metrics["real/palette.chi2"] == pytest.approx(
        _value(table, "fidelity", "real", "palette.chi2")["value"]
    )
    artifacts = {a.path for a in client.list_artifacts(info["run_id"])}
    assert {"results.md", "metrics.parquet", "fidelity.png", "benchmark.png", "examples.png"} <= artifacts
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{trained['run_id']}'"
    )
    assert len(children) == 2  # one per evaluation of the output


@pytest.mark.slow  # a tiny model trained, then the whole evaluation on a local Ray
def test_refuses_other_settings_bad_data_and_foreign_output(evaluated, trained, data, tmp_path, capsys):
    assert _evaluate(trained, data, evaluated["out"], *evaluated["weights"], "guidance=5") == 2
    assert "another config_hash" in capsys.readouterr().err
    assert _evaluate(trained, tmp_path / "nothing", tmp_path / "o1") == 2
    assert "manifest.json" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert _evaluate(trained, data, foreign) == 2
    assert (foreign / "keep.txt").read_text() == "mine"
    assert _evaluate(trained, data, tmp_path / "o2", "subsets={x: [colour]}") == 2
    assert "unknown condition" in capsys.readouterr().err
    args = [
        "evaluate",
        "--model",
        str(trained["export"]),
        "--data",
        str(data),
        "--output",
        str(tmp_path / "o3"),
    ]
    assert main([*args, "--num-samples", "50"]) == 2
    assert "fewer than --num-samples 50" in capsys.readouterr().err


# -- pieces ---------------------------------------------------------------------------------------
def test_scene_maps_read_ground_truth_scenes():
    """The depth/instances re-extraction of synthetic images, on the generator's own renders."""
    miou, rmse = [], []
    for i in range(24):
        s = render_sample(3, "train" if i % 2 else "heldout", i, 64)
        inst, depth = scene_maps(s.image)
        miou.append(instances_miou(s.instances, inst))
        rmse.append(depth_rmse_ssi(s.depth, depth))
    assert np.mean(miou) > 0.95
    assert np.mean(rmse) < 0.06


def test_fidelity_table_and_quality_bar_on_known_records():
    per_image = [
        {"subset": "none", "sketch.f1": 0.1, "palette.chi2": 0.8},
        {"subset": "none", "sketch.f1": 0.3, "palette.chi2": 0.6},
        {"subset": "sketch", "sketch.f1": 0.5, "palette.chi2": 0.7},
        {"subset": "sketch", "sketch.f1": 0.7, "palette.chi2": 0.7},
        {"subset": "palette", "sketch.f1": 0.2, "palette.chi2": 0.4},
        {"subset": "palette", "sketch.f1": 0.2, "palette.chi2": float("nan")},
        {"subset": "real", "sketch.f1": 1.0, "palette.chi2": 0.0},
        {"subset": "mask", "mask.max_abs_diff": 0.0},
        {"subset": "mask", "mask.max_abs_diff": 3.0},
    ]
    table = fidelity_table(per_image, ["none", "sketch", "palette", "mask", "real"])
    r = _value(table, "fidelity", "sketch", "sketch.f1")
    assert r["value"] == pytest.approx(0.6) and r["floor"] == pytest.approx(0.2)
    assert r["ratio_to_floor"] == pytest.approx(3.0)
    p = _value(table, "fidelity", "palette", "palette.chi2")
    assert p["n"] == 1 and p["value"] == pytest.approx(0.4)  # nan rows are left out, and counted so
    bar = {
        b["condition"]: b
        for b in quality_bar(table, {"sketch": ("sketch",), "palette": ("palette",), "mask": ("mask",)})
    }
    assert bar["sketch"]["pass"] is True and bar["sketch"]["ceiling"] == 1.0
    assert bar["palette"]["ratio"] == pytest.approx(0.4 / 0.7) and bar["palette"]["pass"] is False
    assert bar["mask (mask)"]["value"] == pytest.approx(1.5) and bar["mask (mask)"]["pass"] is False
    assert not math.isnan(bar["palette"]["floor"])


def test_config_rejects_bad_subsets():
    with pytest.raises(ValueError, match="reserved"):
        EvalConfig(subsets={"none": ("caption",)})
    with pytest.raises(ValueError, match="unknown condition"):
        EvalConfig(subsets={"x": ("colour",)})
    with pytest.raises(ValueError, match="num_samples"):
        EvalConfig(num_samples=1)


def test_example_configs_load():
    from pipelines.config import load_config

    cfg = load_config(
        EvalConfig, "configs/evaluate-gpu-cluster.yaml", {"model": "m", "data": "d", "output": "o"}
    )
    assert cfg.gpus_per_worker == 1 and cfg.quality.inception_weights.endswith(".pth")
    assert cfg.reextract.depth == "extractor"
    off = load_config(EvalConfig, None, {"model": "m"}, ["benchmark.enabled=off"])  # YAML: off is False
    assert off.benchmark.enabled == "off"


def test_the_benchmark_bar_seen_targets_and_the_held_out_gap():
    def row(subset, metric, value):
        return {"group": "benchmark", "subset": subset, "metric": metric, "value": value}

    table = [
        row("caption/seen", "colour", 0.85),
        row("caption/heldout", "colour", 0.70),  # 0.15 below seen: fails the 0.1 gap
        row("caption/seen", "shape", 0.60),  # below 0.7
        row("caption/heldout", "shape", 0.55),  # within 0.1 of seen
        row("none/seen", "colour", 0.2),
    ]
    bar = {(b["condition"], b["metric"]): b for b in quality_bar(table, {})}
    assert bar[("caption (seen pairs)", "benchmark.colour")]["pass"] is True
    assert bar[("caption (seen pairs)", "benchmark.colour")]["floor"] == 0.2
    assert bar[("caption (heldout pairs)", "benchmark.colour")]["pass"] is False
    assert bar[("caption (seen pairs)", "benchmark.shape")]["pass"] is False
    assert bar[("caption (heldout pairs)", "benchmark.shape")]["pass"] is True
