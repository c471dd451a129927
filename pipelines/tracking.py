"""One MLflow module: which tracking store, which experiment, batched logging.

The store, everywhere (``recompose train``, ``recompose evaluate``, the quickstart):

1. the ``--set mlflow.tracking_uri=…`` / config value, when given;
2. else ``$MLFLOW_TRACKING_URI`` (as ``ray job submit --runtime-env`` sets on a cluster);
3. else the stage's local default: a SQLite file ``mlflow.db`` beside the run's output directory
   (evaluation defaults to the store its training run recorded, so its run nests under it).

Runs are written through ``MlflowClient`` with explicit run ids (no global active run), so Ray
workers and drivers never fight over ``mlflow.start_run`` state. The pipeline as a registered MLflow
model is ``pipelines/diffusion/mlflow_model.py``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PARAM_BATCH = 100  # MLflow's log_batch limits: 100 params, 1000 metrics per call
METRIC_BATCH = 1000
PARAM_CHARS = 6000  # MLflow's longest param value


def sqlite_uri(directory: str | Path) -> str:
    """``sqlite:///<directory>/mlflow.db`` (absolute)."""
    return f"sqlite:///{Path(directory).resolve() / 'mlflow.db'}"


def resolve_uri(configured: str | None, local_default: str) -> str:
    """The tracking store by the one precedence rule of this module's docstring."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return local_default


def experiment_id(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created when missing; a SQLite store keeps its artifacts beside
    the database (``mlartifacts/<name>``), not in the working directory."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts" / name).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def metric_key(name: str) -> str:
    """``name`` with the characters MLflow refuses in keys (anything but alphanumerics, _ - . /)
    replaced by ``_``."""
    return "".join(c if c.isalnum() or c in "_-./" else "_" for c in name)


def log_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    """Every param in batches; lists and dicts as JSON, values cut to MLflow's limit."""
    from mlflow.entities import Param

    items = [
        Param(k, (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:PARAM_CHARS])
        for k, v in params.items()
    ]
    for i in range(0, len(items), PARAM_BATCH):
        client.log_batch(run_id, params=items[i : i + PARAM_BATCH])


def log_metrics(
    client: Any, run_id: str, metrics: Mapping[str, float], step: int = 0, finite_only: bool = False
) -> None:
    """Every metric at ``step`` in batches (keys made MLflow-safe). A NaN loss is logged as NaN,
    so a diverging run shows it; ``finite_only`` leaves out NaN and infinities (summary tables,
    where they mean "no value")."""
    import math

    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    items = [
        Metric(metric_key(k), float(v), ts, step)
        for k, v in metrics.items()
        if v is not None and not (finite_only and not math.isfinite(float(v)))
    ]
    for i in range(0, len(items), METRIC_BATCH):
        client.log_batch(run_id, metrics=items[i : i + METRIC_BATCH])
