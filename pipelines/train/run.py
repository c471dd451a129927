"""The training job (driver side): shards -> a trained, exported, registered ComposerPipeline.

    open_data (manifest, columns, shapes) -> model arguments -> MLflow run (new or the same again)
      -> Ray Data dataset -> TorchTrainer(train_loop_per_worker) -> RUN_DIR/export, models:/name/N

``RUN_DIR`` is Ray Train's run folder (``storage_path`` = its parent, ``name`` = its name), so
Ray's checkpoints (``checkpoint_*``) and its checkpoint-manager snapshot live there next to
``train.json`` (config hash, data, MLflow run), ``samples/`` and ``export/``. Running the same
command again resumes: Ray hands the latest checkpoint to the workers and the MLflow run
continues. On a multi-node cluster RUN_DIR must be on storage every node sees.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import FrozenDict

from models import CONDITIONS, ComposerModel
from models.presets import preset_config
from pipelines.config import ConfigError, config_hash, to_dict
from pipelines.data.batches import DataError, make_recipe, open_data, resolve_encoders
from pipelines.train.config import TrainConfig
from pipelines.train.data import build_dataset

RESERVED_DATA_CPUS = 1.0  # Ray Data needs CPUs of its own, or augmentation starves behind the workers


def _check_output(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--output {run_dir} is a file, not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / "train.json").is_file():
        raise ConfigError(
            f"--output {run_dir} is not empty and holds no recompose training run (no train.json); "
            "nothing there is overwritten: give a new or empty directory"
        )


def model_arguments(cfg: TrainConfig, spec) -> dict[str, Any]:
    caption, semantics = resolve_encoders(spec, cfg.model.caption_encoder, cfg.model.semantics_encoder)
    size = cfg.model.resolution or spec.resolution
    kwargs = {**spec.model_inputs(caption, semantics), "sample_size": size, **dict(cfg.model.overrides)}
    try:
        kwargs = preset_config(cfg.model.preset, **kwargs)
        with torch.device("meta"):  # checks every argument without allocating the weights
            model = ComposerModel(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    return dict(model.config)


def _fit_cpus(cfg: TrainConfig, log) -> TrainConfig:
    import ray

    total = float(ray.cluster_resources().get("CPU", 0))
    need = cfg.workers * cfg.cpus_per_worker
    if cfg.gpus_per_worker == 0 and need > total - RESERVED_DATA_CPUS:
        fit = (total - RESERVED_DATA_CPUS) / cfg.workers
        if fit < 0.1:
            raise ConfigError(
                f"{cfg.workers} CPU workers do not fit on this Ray cluster ({total:g} CPUs, "
                f"{RESERVED_DATA_CPUS:g} kept for Ray Data): use fewer --workers"
            )
        print(
            f"[train] {cfg.workers} workers × {cfg.cpus_per_worker:g} CPUs do not fit next to Ray Data on "
            f"{total:g} CPUs; using {fit:.2f} CPUs per worker",
            file=log,
        )
        return cfg.model_copy(update={"cpus_per_worker": fit})
    return cfg


def run_train(cfg: TrainConfig, log=sys.stderr) -> dict[str, Any]:
    """Train (or resume) the run in ``cfg.output``; returns a summary (steps, export, model version)."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train.loop import train_loop_per_worker

    if not cfg.data or not cfg.output:
        raise ConfigError("--data and --output are required")
    run_dir = Path(cfg.output).resolve()
    _check_output(run_dir)
    spec = open_data(cfg.data)
    conditions = cfg.loader.conditions or spec.conditions
    unknown = [c for c in conditions if c not in spec.conditions]
    if unknown:
        raise DataError(
            f"loader.conditions: the data has no {', '.join(unknown)}; it has {', '.join(spec.conditions)}"
        )
    conditions = tuple(c for c in CONDITIONS if c in conditions)
    model_kwargs = model_arguments(cfg, spec)
    chash = config_hash(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)

    from pipelines.train.tracking import open_run, summary_of

    mlflow_info = open_run(cfg, run_dir, spec, chash, model_kwargs)
    print(
        f"[train] {'resuming' if mlflow_info['resumed'] else 'starting'} run {run_dir.name}: "
        f"{spec.rows} rows in {len(spec.files)} shards, conditions {', '.join(conditions)}; "
        f"MLflow run {mlflow_info['run_id']} at {mlflow_info['tracking_uri']}",
        file=log,
        flush=True,
    )
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    # Ray Data's per-operator bars would bury the training progress lines; ours say images/s and
    # the data-wait fraction, which is what matters here.
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = _fit_cpus(cfg, log)
    recipe = make_recipe(spec, FrozenDict(model_kwargs), conditions, cfg.augment)
    dataset = build_dataset(spec, recipe, cfg.loader.shuffle_files, cfg.seed, cfg.loader.augment_cpus)
    use_gpu = cfg.gpus_per_worker > 0
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": cfg.gpus_per_worker} if use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg,
            "recipe": recipe,
            "run_dir": str(run_dir),
            "model_kwargs": model_kwargs,
            "config_hash": chash,
            "mlflow_run_id": mlflow_info["run_id"],
            "tracking_uri": mlflow_info["tracking_uri"],
            "files": list(spec.files),
            "decompose": spec.settings,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=run_dir.name,
            storage_path=str(run_dir.parent),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={"train": dataset},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
    t0 = time.time()
    try:
        result = trainer.fit()
    except Exception:
        _mark_run(mlflow_info, "FAILED")
        raise
    _mark_run(mlflow_info, "FINISHED")
    export = summary_of(run_dir)
    return {
        "run_dir": str(run_dir),
        "steps": int(result.metrics.get("step", 0)) if result.metrics else None,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "export": str(run_dir / "export"),
        "model_uri": export.get("model_uri"),
        "registered_model": cfg.mlflow.registered_model,
        "model_version": export.get("version"),
        "mlflow_run_id": mlflow_info["run_id"],
        "tracking_uri": mlflow_info["tracking_uri"],
        "seconds": round(time.time() - t0, 1),
        "config": to_dict(cfg),
    }


def _mark_run(info: dict, status: str) -> None:
    from mlflow import MlflowClient

    try:
        MlflowClient(info["tracking_uri"]).set_terminated(info["run_id"], status=status)
    except Exception as e:  # noqa: BLE001 - the training result matters more than the run's status
        print(f"[train] could not mark MLflow run {info['run_id']} {status}: {e}", file=sys.stderr)
