"""The evaluation's MLflow run: nested under the model's training run, in the training's store.

Every evaluation of an output directory is its own run; the summary lists the earlier ones. The
store follows ``pipelines/tracking.py``'s one rule, the local default being the store the training
run recorded (``train.json`` beside an export directory), so the run nests under its parent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines import tracking
from pipelines.config import flatten
from pipelines.evaluate.config import EvalConfig
from pipelines.evaluate.report import EvalResult


def tracking_uri(cfg: EvalConfig, pdir: Path, out: Path) -> str:
    """The config's, else $MLFLOW_TRACKING_URI, else the training run's (train.json beside an
    export directory), else sqlite:///<OUTPUT's parent>/mlflow.db."""
    local = tracking.sqlite_uri(out.resolve().parent)
    train = pdir.parent / "train.json"
    if train.is_file():
        local = json.loads(train.read_text()).get("mlflow", {}).get("tracking_uri") or local
    return tracking.resolve_uri(cfg.mlflow.tracking_uri, local)


def log_run(
    out: Path, result: EvalResult, cfg: EvalConfig, pdir: Path, prev: dict[str, Any] | None
) -> dict[str, Any]:
    """Log the config, the headline numbers and the output files as a new run; returns the
    "mlflow" entry of the summary (tracking_uri, run_id, experiment_id, parent_run_id, earlier_runs)."""
    from mlflow import MlflowClient

    uri = tracking_uri(cfg, pdir, out)
    client = MlflowClient(uri)
    parent_id = (result.training or {}).get("run_id")
    parent = _parent(client, parent_id)
    tags = {
        "recompose.stage": "evaluate",
        "recompose.model": result.model,
        "recompose.config_hash": result.config_hash,
        "recompose.manifest_hash": result.manifest_hash,
    }
    if parent is not None:
        experiment_id = parent.info.experiment_id
        tags["mlflow.parentRunId"] = parent_id
    else:
        experiment_id = tracking.experiment_id(client, cfg.mlflow.experiment, uri)
        tags["recompose.parent"] = f"training run {parent_id or '(none recorded)'} not found in {uri}"
    rid = client.create_run(experiment_id, run_name=f"evaluate-{out.name}", tags=tags).info.run_id
    tracking.log_params(client, rid, flatten(cfg))
    metrics = dict(result.metrics)
    for b in result.quality_bar:
        if b["ratio"] is not None:
            metrics[f"ratio_to_none/{b['condition']}"] = b["ratio"]
    tracking.log_metrics(client, rid, metrics, finite_only=True)
    for name in ("results.md", "metrics.parquet", "per_image.parquet", *result.plots):
        client.log_artifact(rid, str(out / name))
    client.set_terminated(rid)
    earlier = list(((prev or {}).get("mlflow") or {}).get("earlier_runs", []))
    if prev and (prev.get("mlflow") or {}).get("run_id"):
        earlier.append(prev["mlflow"]["run_id"])
    return {
        "tracking_uri": uri,
        "run_id": rid,
        "experiment_id": experiment_id,
        "parent_run_id": parent_id if parent is not None else None,
        "earlier_runs": earlier,
    }


def _parent(client: Any, run_id: str | None) -> Any:
    """The training run ``run_id`` in the client's store, or None when absent or not recorded."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None
