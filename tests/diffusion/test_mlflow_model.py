"""A tiny pipeline through a real MLflow registry (SQLite store in tmp): log, register, resolve, generate."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

R = 32
NAME = "composer-tiny"


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> dict:
    """An MLflow tracking store of one run, which logged and registered a tiny pipeline as version 1."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from models import build_model
    from pipelines.diffusion.mlflow_model import log_pipeline
    from pipelines.diffusion.pipeline import ComposerPipeline
    from pipelines.diffusion.schedulers import default_scheduler
    from tests.helpers import block_network

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    previous = tracking_utils._tracking_uri
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("RECOMPOSE_CACHE", str(root / "cache"))
        mlflow.set_tracking_uri(uri)
        try:
            torch.manual_seed(0)
            export = root / "export"
            pipe = ComposerPipeline(build_model("tiny", sample_size=R).eval(), default_scheduler())
            pipe.save_pretrained(str(export))
            experiment = mlflow.create_experiment("composer", artifact_location=str(root / "artifacts"))
            with pytest.MonkeyPatch.context() as offline:
                refused = block_network(offline)  # requirements are pinned, never inferred online
                with mlflow.start_run(experiment_id=experiment) as run:
                    logged = log_pipeline(export, NAME)
                assert refused == []
            yield {"uri": logged, "export": export, "run_id": run.info.run_id, "root": root, "pipe": pipe}
        finally:
            mlflow.set_tracking_uri(previous)


def test_log_pipeline_registers_version_1(registry):
    from mlflow import MlflowClient

    assert registry["uri"] == (f"models:/{NAME}/1", 1)
    version = MlflowClient().get_model_version(NAME, "1")
    assert version.status == "READY" and version.run_id == registry["run_id"]
    assert version.source.startswith("models:/m-")  # MLflow 3: a logged model, not a run path


def test_log_pipeline_needs_an_active_run(registry):
    from pipelines.diffusion.mlflow_model import log_pipeline

    with pytest.raises(RuntimeError, match="active MLflow run"):
        log_pipeline(registry["export"], None)


def test_resolve_model_gives_the_same_weights_once_downloaded(registry, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from pipelines.diffusion.mlflow_model import resolve_model
    from pipelines.diffusion.pipeline import ComposerPipeline

    local = resolve_model(f"models:/{NAME}/1")
    assert (local / "model_index.json").is_file()
    assert Path(registry["root"] / "cache" / "mlflow") in local.parents
    loaded = ComposerPipeline.from_pretrained(str(local))
    want = registry["pipe"].unet.state_dict()
    got = loaded.unet.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)

    MlflowClient().set_registered_model_alias(NAME, "champion", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", refuse)
    # An alias or 'latest' is the same version: the same cache entry, nothing downloaded.
    assert resolve_model(f"models:/{NAME}/1") == local
    assert resolve_model(f"models:/{NAME}@champion") == local
    assert resolve_model(f"models:/{NAME}/latest") == local


def test_resolve_model_of_a_run_and_of_no_pipeline(registry):
    import mlflow

    from pipelines.diffusion.mlflow_model import resolve_model

    assert (resolve_model(f"runs:/{registry['run_id']}/pipeline") / "model_index.json").is_file()
    with mlflow.start_run(experiment_id=mlflow.get_run(registry["run_id"]).info.experiment_id) as run:
        mlflow.log_text("not a model", "notes/readme.txt")
    with pytest.raises(ValueError, match=rf"runs:/{run.info.run_id}/notes: holds no saved ComposerPipeline"):
        resolve_model(f"runs:/{run.info.run_id}/notes")
    with pytest.raises(ValueError, match="expected models:/"):
        resolve_model("s3://bucket/model")


def test_generate_from_a_registered_model_matches_the_directory(registry, tmp_path):
    from jobs.cli import main

    outputs = {f"models:/{NAME}/1": tmp_path / "registry", str(registry["export"]): tmp_path / "directory"}
    for model, out in outputs.items():
        args = [
            "--model",
            model,
            "--output",
            str(out),
            "--steps",
            "2",
            "--text",
            "a red circle",
            "--seed",
            "3",
        ]
        assert main(["generate", *args]) == 0
    samples = [(out / "sample-0000.png").read_bytes() for out in outputs.values()]
    assert Image.open(io.BytesIO(samples[0])).size == (R, R)
    assert samples[0] == samples[1]


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        (f"models:/{NAME}/9", f"--model models:/{NAME}/9: Model Version (name={NAME}, version=9) not found"),
        ("models:/no-such-model/1", "--model models:/no-such-model/1: "),
        (f"models:/{NAME}@nobody", f"--model models:/{NAME}@nobody: "),
    ],
)
def test_unknown_model_exits_2_naming_the_uri(registry, tmp_path, capsys, uri, message):
    from jobs.cli import main

    out = tmp_path / "out"
    assert main(["generate", "--model", uri, "--output", str(out), "--steps", "1"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_pyfunc_predicts_png_bytes_as_the_pipeline_samples(registry):
    import mlflow
    import pandas as pd

    from pipelines.files import encode_png

    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    frame = pd.DataFrame({"text": ["a red circle", None], "seed": [0, 1]})
    out = model.predict(frame, params={"num_inference_steps": 2})
    assert list(out.columns) == ["image"] and len(out) == 2
    images = [np.asarray(Image.open(io.BytesIO(b))) for b in out["image"]]
    assert all(im.shape == (R, R, 3) and im.dtype == np.uint8 for im in images)
    pipe = registry["pipe"]
    want = pipe({"text": "a red circle"}, guidance=3.0, num_inference_steps=2, seed=0).images[0]
    assert out["image"][0] == encode_png(want)
    unconditional = pipe({}, num_inference_steps=2, seed=1).images[0]
    assert out["image"][1] == encode_png(unconditional)
