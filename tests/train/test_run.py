"""``recompose train`` end to end on a real local Ray: 2 CPU DDP workers, a real MLflow SQLite
store read back with ``MlflowClient``, a worker failure, a resumed rerun, the exported pipeline.

One chain of runs shared by the module (a Ray Train run costs ~40 s here):
  run 1  max_steps 24, checkpoint every 6, rank 0 raises once at step 12 (max_failures 1), through
         the test seam ``pipelines.train.run.step_hook`` (tests/train/faults.py)
  run 2  the same command with max_steps 30: resumes at 24, same MLflow run
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from pipelines.data.synth import write_synth
from pipelines.decompose.config import DecomposeConfig
from pipelines.decompose.job import run_decompose
from pipelines.train import run as train_run
from tests.train.faults import FailOnce

pytestmark = pytest.mark.slow

R = 32
FAST = [
    "optim.batch_size=8",
    "optim.lr=1e-3",
    "optim.warmup_steps=2",
    "optim.ema_decay=0.99",
    "mlflow.log_every=1",
    "mlflow.sample_every=12",
    "mlflow.sample_rows=2",
    "mlflow.sample_steps=3",
    "mlflow.system_metrics=true",
    "checkpoint_every=6",
    "keep_checkpoints=2",
    "progress=false",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local) -> Path:
    root = tmp_path_factory.mktemp("train-data")
    write_synth(root / "synth", count=64, resolution=48, seed=0, split="train", progress=False)
    cfg = DecomposeConfig(
        input=str(root / "synth"),
        output=str(root / "decomposed"),
        resolution=R,
        shard_size=32,
        conditions=("palette", "sketch", "instances", "depth", "intensity"),
        progress=False,
    )
    run_decompose(cfg)
    return root / "decomposed"


def _train(data: Path, run_dir: Path, uri: str, max_steps: int, *extra: str) -> int:
    args = ["train", "--data", str(data), "--output", str(run_dir), "--preset", "tiny"]
    args += ["--max-steps", str(max_steps), "--workers", "2"]
    for item in [*FAST, f"mlflow.tracking_uri={uri}", "mlflow.registered_model=recompose-test", *extra]:
        args += ["--set", item]
    return main(args)


@pytest.fixture(scope="module")
def chain(data, tmp_path_factory, ray_local) -> dict:
    root = tmp_path_factory.mktemp("train-runs")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_dir = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_run, "step_hook", FailOnce(12, str(root / "failed-at-12")))
        first = _train(data, run_dir, uri, 24, "max_failures=1")
    after_first = json.loads((run_dir / "export" / "recompose-training.json").read_text())
    ckpts_first = _checkpoints(run_dir)
    # What a kill in the middle of writing a checkpoint leaves: a newer, half-written folder that
    # Ray never recorded. The rerun must resume from the last complete one (step 24), not this.
    partial = run_dir / "checkpoint_2099-01-01_00-00-00.000000"
    (partial / "model").mkdir(parents=True)
    (partial / "model" / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 100)
    second = _train(data, run_dir, uri, 30, "max_failures=0")
    return {
        "root": root,
        "uri": uri,
        "run_dir": run_dir,
        "rc": (first, second),
        "export_after_first": after_first,
        "checkpoints_after_first": ckpts_first,
    }


def _checkpoints(run_dir: Path) -> list[str]:
    return sorted(
        p.name
        for p in run_dir.glob("checkpoint_*")
        if p.is_dir() and not p.name.startswith("checkpoint_2099")
    )


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _run_id(run_dir: Path) -> str:
    return json.loads((run_dir / "train.json").read_text())["mlflow"]["run_id"]


def test_run_logs_params_metrics_artifacts_and_registers(chain):
    assert chain["rc"] == (0, 0)
    client = _client(chain["uri"])
    runs = client.search_runs([client.get_experiment_by_name("recompose").experiment_id])
    assert len(runs) == 1, "a failure and a rerun must continue the one MLflow run"
    run = client.get_run(_run_id(chain["run_dir"]))
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.preset"] == "tiny" and params["optim.batch_size"] == "8"
    assert params["workers"] == "2" and params["model.resolved.sample_size"] == str(R)
    assert "augment.mask.p_boxes" in params and len(params) > 40, sorted(params)[:5]
    assert run.data.tags["recompose.config_hash"] and run.data.tags["recompose.manifest_hash"]
    metrics = run.data.metrics
    for key in (
        "loss",
        "loss/none",
        "loss/all",
        "loss/with_sketch",
        "images_per_s",
        "data_wait_fraction",
        "lr",
    ):
        assert key in metrics, key
    assert 0 <= metrics["data_wait_fraction"] <= 1 and metrics["images_per_s"] > 0
    assert any(k.startswith("system/") for k in metrics), "MLflow system metrics are logged"
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert "samples/step-0000012.png" in samples and "samples/step-0000030.png" in samples
    assert "metrics.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert Image.open(chain["run_dir"] / "metrics.png").width > 400
    grid = Image.open(chain["run_dir"] / "samples" / "step-0000030.png")
    assert grid.width > 5 * R and grid.height > 2 * R
    versions = client.search_model_versions("name='recompose-test'")
    assert sorted(int(v.version) for v in versions) == [1, 2]  # one per finished run, not per restart
    assert all(v.run_id == run.info.run_id for v in versions)


def test_worker_failure_restarts_from_the_checkpoint(chain):
    run_dir = chain["run_dir"]
    assert (chain["root"] / "failed-at-12").exists(), "the failure really happened"
    client = _client(chain["uri"])
    steps = [m.step for m in client.get_metric_history(_run_id(run_dir), "loss")]
    # Restarted from the step-12 checkpoint: no step trained twice, none skipped.
    assert sorted(steps) == list(range(1, 31)), steps
    assert chain["export_after_first"]["step"] == 24 and chain["export_after_first"]["version"] == 1
    assert len(chain["checkpoints_after_first"]) == 2  # keep_checkpoints


def test_rerun_resumes_same_run_and_step_count(chain):
    run_dir = chain["run_dir"]
    state = json.loads((run_dir / "export" / "recompose-training.json").read_text())
    assert state["step"] == 30 and state["version"] == 2 and state["run_id"] == _run_id(run_dir)
    latest = max((run_dir / c for c in _checkpoints(run_dir)), key=lambda p: p.stat().st_mtime)
    assert json.loads((latest / "state.json").read_text())["step"] == 30
    assert (latest / "model" / "diffusion_pytorch_model.safetensors").is_file()
    assert (latest / "ema" / "diffusion_pytorch_model.safetensors").is_file()
    assert (latest / "state.pt").is_file()


def test_loss_falls_and_the_export_generates(chain, tmp_path, monkeypatch):
    client = _client(chain["uri"])
    history = sorted(client.get_metric_history(_run_id(chain["run_dir"]), "loss"), key=lambda m: m.step)
    losses = np.array([m.value for m in history])
    assert losses[-6:].mean() < 0.7 * losses[:3].mean(), losses.round(3)
    for model in (str(chain["run_dir"] / "export"), "models:/recompose-test/2"):
        out = tmp_path / model.replace("/", "_").replace(":", "")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", chain["uri"])
        rc = main(
            ["generate", "--model", model, "--output", str(out), "--steps", "3", "--text", "a red circle"]
        )
        assert rc == 0
        sample = np.asarray(Image.open(out / "sample-0000.png"))
        assert sample.shape == (R, R, 3)


def test_the_finished_run_packs_as_a_reference_model(chain, data, tmp_path):
    """`recompose reference`: float16 weights that load back as float32 and sample like the export,
    the evaluation of the packed model beside them, and a README that says how it was made."""
    import torch

    from pipelines.diffusion.loading import load_pipeline

    out = tmp_path / "reference"
    run_dir = chain["run_dir"]
    assert (
        main(
            ["reference", "--run", str(run_dir), "--data", str(data), "--output", str(out)]
            + ["--num-samples", "2"]
        )
        == 0
    )
    record = json.loads((out / "reference.json").read_text())
    assert record["steps"] == 30 and record["dtype"] == "float16" and record["half_error"] < 2e-3
    assert record["config_hash"] == json.loads((run_dir / "train.json").read_text())["config_hash"]
    assert record["config"]["optim"]["batch_size"] == 8 and record["train_seconds"] > 0
    assert record["machine"]["cores"] and record["evaluation_hash"]
    readme = (out / "README.md").read_text()
    for fact in (record["config_hash"], "30", "recompose train", "## Quality bar", record["machine"]["cpu"]):
        assert fact in readme, fact
    for f in ("evaluate.json", "results.md", "metrics.parquet", "fidelity.png", "examples.png"):
        assert (out / "evaluation" / f).is_file(), f
    from safetensors.torch import load_file

    shipped = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in shipped.values() if v.is_floating_point()} == {torch.float16}
    packed, export = load_pipeline(str(out), "cpu"), load_pipeline(str(run_dir / "export"), "cpu")
    assert {p.dtype for p in packed.unet.parameters()} == {torch.float32}
    a = packed(conditions={"text": "a red circle"}, num_inference_steps=3, seed=0).images[0]
    b = export(conditions={"text": "a red circle"}, num_inference_steps=3, seed=0).images[0]
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2  # float16 storage: lossless enough
    # Packing again replaces the model and its records, and leaves anything else there alone.
    (out / "NOTES.txt").write_text("mine")
    assert (
        main(
            ["reference", "--run", str(run_dir), "--data", str(data), "--output", str(out)]
            + ["--num-samples", "2"]
        )
        == 0
    )
    assert (out / "NOTES.txt").read_text() == "mine"
    assert main(["reference", "--run", str(tmp_path / "nothing"), "--data", str(data)]) == 2


def test_a_run_fine_tunes_another_runs_export_and_packs_as_two_stages(chain, data, tmp_path):
    """``init_from``: the new run starts from the export's weights (at a vanishing learning rate it
    ends where it started), and `recompose reference` on it lists both runs, first to last."""
    from safetensors.torch import load_file

    export = chain["run_dir"] / "export"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Checked before Ray starts: an init_from that is no pipeline, or a model that is not this one.
    assert _train(data, tmp_path / "bad", uri, 4, f"init_from={tmp_path / 'nothing'}") == 2
    assert _train(data, tmp_path / "bad", uri, 4, f"init_from={export}", "model.resolution=16") == 2
    assert not (tmp_path / "bad").exists()
    tuned = tmp_path / "tuned"
    assert _train(data, tuned, uri, 4, f"init_from={export}", "optim.lr=1e-12", "optim.warmup_steps=0") == 0
    before = load_file(export / "unet" / "diffusion_pytorch_model.safetensors")
    after = load_file(tuned / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys()
    assert max((after[k] - before[k]).abs().max().item() for k in before) < 1e-5
    out = tmp_path / "reference"
    args = ["reference", "--run", str(tuned), "--data", str(data), "--output", str(out), "--num-samples", "2"]
    assert main(args) == 0
    record = json.loads((out / "reference.json").read_text())
    assert [s["steps"] for s in record["stages"]] == [30, 4] and record["steps"] == 34
    assert [s["run"] for s in record["stages"]] == [str(chain["run_dir"]), str(tuned)]
    assert record["stages"][1]["config"]["init_from"] == str(export)
    assert record["train_seconds"] == pytest.approx(
        sum(s["train_seconds"] for s in record["stages"]), abs=0.2
    )
    readme = (out / "README.md").read_text()
    lines = [line for line in readme.splitlines() if line.startswith("recompose train")]
    assert len(lines) == 2 and f"--output {chain['run_dir']} " in lines[0] and "--max-steps 30" in lines[0]
    assert f"--output {tuned} " in lines[1] and "--max-steps 4" in lines[1] and "30 + 4 = 34" in readme
    assert f"recompose reference --run {tuned} " in readme


def test_an_expert_fine_tunes_a_runs_noise_range_and_joins_it_in_an_ensemble(chain, tmp_path):
    """``--expert-of RUN --noise-range LO:HI`` (eDiffi): the run's config and data are inherited, the
    export records its range, MLflow has the run and its grids; ``recompose ensemble`` joins it
    with the run it came from (which takes the other timesteps) and generate loads that."""
    run_dir = chain["run_dir"]

    def expert(out: Path, noise_range: str | None, of: Path = run_dir) -> int:
        args = ["train", "--expert-of", str(of), "--output", str(out), "--max-steps", "4"]
        args += ["--noise-range", noise_range] if noise_range else []
        for item in (
            "mlflow.sample_every=4",
            "mlflow.sample_rows=1",
            "mlflow.sample_steps=3",
            "mlflow.system_metrics=false",
            "mlflow.registered_model=recompose-expert",
            "checkpoint_every=4",
            "progress=false",
        ):
            args += ["--set", item]
        return main(args)

    # refused before any Ray work: no range, a range past the schedule, not a range
    for bad in (None, "0:1200", "5:x", "7:3"):
        assert expert(tmp_path / "bad", bad) == 2, bad
    assert not (tmp_path / "bad").exists()
    low = tmp_path / "low"
    assert expert(low, "0:500") == 0
    record = json.loads((low / "export" / "expert.json").read_text())
    assert record == {"format": "recompose.expert/1", "noise_range": [0, 500], "expert_of": str(run_dir)}
    parent = json.loads((run_dir / "train.json").read_text())["config"]
    mine = json.loads((low / "train.json").read_text())["config"]
    assert mine["model"] == parent["model"] and mine["data"] == parent["data"]
    assert mine["optim"]["batch_size"] == 8
    assert mine["noise_range"] == [0, 500] and mine["expert_of"] == str(run_dir)
    client = _client(chain["uri"])
    run = client.get_run(_run_id(low))
    assert run.info.status == "FINISHED" and "loss" in run.data.metrics
    assert "samples/step-0000004.png" in [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    # an expert of an expert splits its interval; a range outside it is refused
    assert expert(tmp_path / "bad", "400:700", of=low) == 2
    ens = tmp_path / "ensemble"
    assert main(["ensemble", "--expert", str(low), "--expert", str(run_dir), "--output", str(ens)]) == 0
    index = json.loads((ens / "ensemble.json").read_text())
    assert [(e["noise_range"], index["from"][e["name"]]) for e in index["experts"]] == [
        ([500, 1000], str(run_dir)),
        ([0, 500], str(low)),
    ]
    out = tmp_path / "generated"
    assert main(["generate", "--model", str(ens), "--steps", "4", "--output", str(out)]) == 0
    assert (out / "sample-0000.png").is_file()


def test_rerun_with_another_config_is_refused(chain, data):
    rc = _train(data, chain["run_dir"], chain["uri"], 30, "optim.lr=5e-4")
    assert rc == 2


def test_refuses_foreign_output_and_bad_data(tmp_path, data):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert _train(data, foreign, uri, 2) == 2
    assert (foreign / "notes.txt").read_text() == "mine"
    assert _train(tmp_path / "nowhere", tmp_path / "run", uri, 2) == 2
    assert (
        _train(data, tmp_path / "run2", uri, 2, "loader.conditions=[caption, semantics, sketch, nope]") == 2
    )


def test_a_loss_that_is_not_a_number_stops_the_run_with_its_reason(data, tmp_path, capsys):
    """A learning rate of 1e8 sends the loss to nan within a few steps: the run stops there with
    exit code 2 and a message saying so (not 30 steps of garbage, not a traceback), its MLflow run
    FAILED, nothing exported."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "nan"
    extra = ("optim.lr=1e8", "optim.warmup_steps=0", "max_failures=0", "mlflow.sample_every=0")
    assert _train(data, run_dir, uri, 30, *extra, "mlflow.registered_model=null") == 2
    err = capsys.readouterr().err
    assert "recompose train: error: training stopped: the training loss is nan at step" in err
    assert "lower optim.lr" in err
    run = _client(uri).get_run(_run_id(run_dir))
    assert run.info.status == "FAILED"
    steps = [m.step for m in _client(uri).get_metric_history(run.info.run_id, "loss")]
    assert steps and max(steps) < 30, steps
    assert not (run_dir / "export").exists()


def test_fsdp_trains_checkpoints_and_resumes_after_a_failure(data, tmp_path, monkeypatch):
    """FSDP2 over 2 CPU workers (gloo) with gradient accumulation: a failure at the step-3
    checkpoint resumes from the gathered full states."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "fsdp"
    monkeypatch.setattr(train_run, "step_hook", FailOnce(3, str(tmp_path / "failed-at-3")))
    extra = (
        "strategy=fsdp",
        "max_failures=1",
        "checkpoint_every=3",
        "mlflow.sample_every=0",
    )
    assert _train(data, run_dir, uri, 6, *extra, "mlflow.registered_model=null") == 0
    assert (tmp_path / "failed-at-3").exists()
    steps = [m.step for m in _client(uri).get_metric_history(_run_id(run_dir), "loss")]
    assert sorted(steps) == list(range(1, 7)), steps
    latest = run_dir / _checkpoints(run_dir)[-1]
    assert json.loads((latest / "state.json").read_text())["step"] == 6
    from pipelines.diffusion.pipeline import ComposerPipeline

    pipe = ComposerPipeline.from_pretrained(str(run_dir / "export"))
    assert sum(p.numel() for p in pipe.unet.parameters()) > 1_000_000  # full weights, not a shard


def test_prepare_batch_gives_aligned_model_inputs(data):
    """The Ray Data UDF and the worker's conversion, without Ray: shapes, ranges, availability."""
    import pyarrow.parquet as pq
    import torch

    from models import CONDITIONS, ComposerModel
    from pipelines.config import load_config
    from pipelines.data.batches import make_recipe, open_data, prepare_batch
    from pipelines.train.config import TrainConfig
    from pipelines.train.loop import batch_inputs
    from pipelines.train.run import model_arguments

    spec = open_data(data)
    assert spec.rows == 64 and spec.resolution == R and len(spec.files) == 2
    assert spec.conditions == tuple(CONDITIONS)
    assert set(spec.settings) == {"decode", "palette", "sketch", "instances", "depth", "intensity"}
    cfg = load_config(TrainConfig, None, {"data": str(data), "model.resolution": 16}, [])
    kwargs = model_arguments(cfg, spec)
    assert kwargs["caption_encoder"] == "trainable" and kwargs["semantics_encoder"] == "trainable"
    model = ComposerModel(**kwargs)
    recipe = make_recipe(spec, model.config, spec.conditions, cfg.augment)
    assert "caption" not in recipe.columns and "text" in recipe.columns  # only what the model uses
    table = pq.read_table(spec.files[0], columns=list(recipe.columns)).slice(0, 6)
    out = prepare_batch(table, recipe)
    assert out["image"].shape == (6, 16, 16, 3) and out["image"].dtype == np.uint8  # cropped, resized
    for name in ("sketch", "instances", "depth", "intensity", "mask"):
        assert out[name].shape == (6, 16, 16) and out[name].dtype == np.uint8, name
    assert set(np.unique(out["mask"])) <= {0, 1} and out["mask"].any()
    assert out["text_ids"].shape == (6, model.config.caption_length) and out["has_caption"].all()
    assert out["palette"].shape == (6, 156)
    x0, cond, available = batch_inputs(model, {k: torch.as_tensor(v) for k, v in out.items()}, recipe)
    assert x0.shape == (6, 3, 16, 16) and -1 <= float(x0.min()) and float(x0.max()) <= 1
    assert available.all() and available.shape == (6, len(CONDITIONS))
    assert cond.semantics_image is not None and cond.masked_image is not None and cond.text_ids is not None
    eps = model(x0, torch.zeros(6, dtype=torch.long), conditions=cond, presence=available)
    assert eps.shape == x0.shape


def test_open_data_rejects_what_is_not_a_decomposition(tmp_path):
    from pipelines.data.batches import DataError, open_data

    with pytest.raises(DataError, match="no manifest.json"):
        open_data(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(DataError, match="manifest format"):
        open_data(tmp_path)


def test_an_upsampler_trains_resumes_and_its_export_upsamples(data, tmp_path):
    """``stage: upsampler`` on the same decomposition: a ×2 model at 32 px whose 16 px inputs are
    derived from each image on the fly; a rerun resumes; the export upsamples a given image."""
    from pipelines.data.shards import read_shard
    from pipelines.diffusion.inputs import downsample_image
    from pipelines.diffusion.pipeline import ComposerPipeline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "upsampler"
    extra = ("stage=upsampler", "upsample_factor=2", "mlflow.registered_model=null")
    assert _train(data, run_dir, uri, 16, *extra) == 0
    assert _train(data, run_dir, uri, 18, *extra) == 0  # resumes at 16
    client = _client(uri)
    history = sorted(client.get_metric_history(_run_id(run_dir), "loss"), key=lambda m: m.step)
    losses = np.array([m.value for m in history])
    assert [m.step for m in history] == list(range(1, 19))
    assert losses[-4:].mean() < losses[:4].mean(), losses.round(3)
    params = client.get_run(_run_id(run_dir)).data.params
    assert params["stage"] == "upsampler" and params["model.resolved.upsample_factor"] == "2"
    grid = np.asarray(Image.open(run_dir / "samples" / "step-0000018.png"))
    assert grid.ndim == 3 and grid.shape[1] > grid.shape[0]  # image, low-res, then the sets side by side

    pipe = ComposerPipeline.from_pretrained(str(run_dir / "export"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.upsample_factor == 2 and pipe.image_size == R
    image = read_shard(sorted((data / "shards").glob("*.parquet"))[0], ["image"])["image"][:1]
    low = downsample_image(image, 2)[0]
    out = pipe({"low_res": low, "low_res.level": 50}, num_inference_steps=3, num_images=2)
    assert out.images.shape == (2, R, R, 3)

    # refused before any Ray work: a side the factor does not divide, the factor set as an override
    assert _train(data, tmp_path / "bad", uri, 2, "stage=upsampler", "upsample_factor=3") == 2
    assert _train(data, tmp_path / "bad", uri, 2, "model.overrides={upsample_factor: 2}") == 2
    assert not (tmp_path / "bad").exists()


def test_a_prior_trains_resumes_and_samples_semantics_for_the_cascade(data, tmp_path, capsys):
    """``stage: prior`` on the embedded default: the base's trainable semantics embedding is the
    target (``prior_of``); its export joins a cascade and ``generate --prior`` conditions the base
    on the semantics it samples from the caption. (Resuming is the job's, tested above.)"""
    from pipelines.diffusion.prior import PriorPipeline
    from tests.helpers.cascade import save_stage

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = save_stage(tmp_path / "base", "tiny", R)
    run_dir = tmp_path / "prior"
    extra = ("stage=prior", f"prior_of={base}", "mlflow.registered_model=null", "optim.lr=1e-3")
    assert _train(data, run_dir, uri, 18, *extra) == 0
    client = _client(uri)
    run_id = _run_id(run_dir)
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    losses = np.array([m.value for m in history])
    assert [m.step for m in history] == list(range(1, 19))
    assert losses[-4:].mean() < losses[:4].mean(), losses.round(3)
    cosine = client.get_metric_history(run_id, "prior/cosine")
    assert cosine and -1 <= cosine[-1].value <= 1
    assert client.get_run(run_id).data.params["stage"] == "prior"
    assert (run_dir / "samples" / "step-0000018.png").is_file()  # the similarity picture
    pipe = PriorPipeline.from_pretrained(str(run_dir / "export"))
    emb = pipe(["a red circle", "a blue star"], num_inference_steps=3)
    assert emb.shape == (2, 8) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)

    cascade = tmp_path / "cascade"
    assert (
        main(["cascade", "--base", str(base), "--prior", str(run_dir / "export"), "--output", str(cascade)])
        == 0
    )
    out = tmp_path / "gen"
    args = ["generate", "--model", str(cascade), "--output", str(out), "--steps", "2", "--prior-steps", "3"]
    assert main([*args, "--text", "a red circle", "--prior", "--guidance", "text=3,semantics=2"]) == 0
    record = json.loads((out / "generate.json").read_text())
    assert len(record["prior"]["semantics"]) == 8 and record["conditions"]["semantics"]["from"].startswith(
        "--prior"
    )
    assert (
        main(
            [
                *args[:4],
                str(tmp_path / "gen2"),
                "--steps",
                "2",
                "--text",
                "x",
                "--prior",
                "--model",
                str(base),
            ]
        )
        == 2
    )
    assert "has no prior" in capsys.readouterr().err
    # the embedded default's data has no CLIP semantics: the prior needs the base it learns for
    assert _train(data, tmp_path / "bad", uri, 2, "stage=prior") == 2
    assert "set prior_of" in capsys.readouterr().err
