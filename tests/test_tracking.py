"""pipelines/tracking.py against a real SQLite MLflow store, read back with MlflowClient."""

from __future__ import annotations

import math

from pipelines import tracking


def test_store_precedence(monkeypatch, tmp_path):
    local = tracking.sqlite_uri(tmp_path)
    assert local == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_uri(None, local) == local
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.resolve_uri(None, local) == "http://mlflow:5000"
    assert tracking.resolve_uri("sqlite:///x.db", local) == "sqlite:///x.db"


def test_batched_params_and_metrics_read_back(tmp_path):
    from mlflow import MlflowClient

    uri = tracking.sqlite_uri(tmp_path)
    client = MlflowClient(uri)
    exp = tracking.experiment_id(client, "recompose", uri)
    assert exp == tracking.experiment_id(client, "recompose", uri)  # found again, not created twice
    assert client.get_experiment(exp).artifact_location.startswith(
        (tmp_path / "mlartifacts").resolve().as_uri()
    )
    run = client.create_run(exp).info.run_id
    params = {f"p{i}": i for i in range(250)} | {"list": [1, 2], "long": "x" * 7000}
    tracking.log_params(client, run, params)
    tracking.log_metrics(client, run, {"loss": float("nan"), "loss/all": 0.5, "a b": 1.0}, step=3)
    tracking.log_metrics(client, run, {"fid": float("inf"), "kid": 0.25}, finite_only=True)
    data = client.get_run(run).data
    assert len(data.params) == 252 and data.params["list"] == "[1, 2]"
    assert len(data.params["long"]) == tracking.PARAM_CHARS
    assert math.isnan(data.metrics["loss"])  # a diverging run shows its NaN loss
    assert data.metrics["loss/all"] == 0.5 and data.metrics["a_b"] == 1.0
    assert "fid" not in data.metrics and data.metrics["kid"] == 0.25
    assert [m.step for m in client.get_metric_history(run, "loss")] == [3]
