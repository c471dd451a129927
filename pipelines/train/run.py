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

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers.configuration_utils import FrozenDict

from models import CONDITIONS, ComposerModel
from models.presets import preset_config
from pipelines.config import ConfigError, config_hash, to_dict
from pipelines.data.batches import DataError, DataSpec, make_recipe, open_data, resolve_encoders
from pipelines.files import claim_output
from pipelines.train.config import TrainConfig
from pipelines.train.data import build_dataset
from pipelines.train.loop import TrainerArgs

if TYPE_CHECKING:
    from pipelines.train.tracking import RunInfo

log = logging.getLogger(__name__)

RESERVED_DATA_CPUS = 1.0  # Ray Data needs CPUs of its own, or augmentation starves behind the workers

# The seam tests inject a worker failure through (monkeypatch it): run_train ships it to every
# worker in TrainerArgs.on_step, called as on_step(rank, step) before each optimizer step.
step_hook: Callable[[int, int], None] | None = None
# The same for the end of a run: rank 0 calls on_finish(point) at "export-written" (the new export
# complete beside the old one), "export-swapped" (in place, the old one not yet deleted) and
# "registered" (logged and registered in MLflow, not yet recorded in export/).
finish_hook: Callable[[str], None] | None = None


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What ``recompose train --json`` prints (field names are the JSON keys other tools read)."""

    run_dir: str
    steps: int | None  # optimizer steps done in all (this run and the earlier ones)
    checkpoint: str | None  # the latest checkpoint folder
    export: str  # RUN_DIR/export: the ComposerPipeline with the EMA weights
    model_uri: str | None  # the export as logged to MLflow
    registered_model: str | None
    model_version: int | str | None  # its version under registered_model; None: not registered
    mlflow_run_id: str
    tracking_uri: str
    seconds: float  # in trainer.fit
    config: dict[str, Any]


def model_arguments(cfg: TrainConfig, spec: DataSpec) -> dict[str, Any]:
    """ComposerModel's arguments: the preset, the data's inputs and encoders, ``model.overrides``."""
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


def init_weights_file(cfg: TrainConfig, model_kwargs: dict[str, Any]) -> str | None:
    """The UNet weights file of ``cfg.init_from`` (None when unset), checked to be the model that
    ``model_kwargs`` builds; ``ConfigError`` saying what differs otherwise."""
    import json

    from safetensors import safe_open

    from pipelines.diffusion.loading import ModelError, pipeline_dir
    from pipelines.train.state import WEIGHTS

    if cfg.init_from is None:
        return None
    try:
        unet = pipeline_dir(cfg.init_from) / "unet"
    except ModelError as e:
        raise ConfigError(f"init_from: {str(e).removeprefix('--model ')}") from None
    weights = unet / WEIGHTS
    if not (unet / "config.json").is_file() or not weights.is_file():
        raise ConfigError(f"init_from {cfg.init_from}: {unet} lacks config.json or {WEIGHTS}")
    saved = json.loads((unet / "config.json").read_text())
    wanted = json.loads(json.dumps(model_kwargs))  # tuples -> lists, as config.json has them
    differ = [
        f"{k} {saved.get(k)!r} there, {v!r} here"
        for k, v in wanted.items()
        if not k.startswith("_") and saved.get(k) != v
    ]
    if differ:
        raise ConfigError(
            f"init_from {cfg.init_from}: its UNet is not the model this config builds ({'; '.join(differ)}); "
            "use the model section (and data encoders) it was trained with"
        )
    with safe_open(str(weights), "pt") as f:  # the header only: catches a truncated or foreign file early
        keys = set(f.keys())
    with torch.device("meta"):
        missing = set(ComposerModel(**model_kwargs).state_dict()) ^ keys
    if missing:
        raise ConfigError(
            f"init_from {cfg.init_from}: {weights} does not hold this model's weights "
            f"({len(missing)} names differ, e.g. {sorted(missing)[0]})"
        )
    return str(weights.resolve())  # workers run in their own directories


def _conditions(cfg: TrainConfig, spec: DataSpec) -> tuple[str, ...]:
    """``loader.conditions`` (default: every one the data has), in ``CONDITIONS`` order."""
    wanted = cfg.loader.conditions or spec.conditions
    unknown = [c for c in wanted if c not in spec.conditions]
    if unknown:
        raise DataError(
            f"loader.conditions: the data has no {', '.join(unknown)}; it has {', '.join(spec.conditions)}"
        )
    return tuple(c for c in CONDITIONS if c in wanted)


def _fit_cpus(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with fewer CPUs per CPU worker where the workers would leave Ray Data none."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0))
    need = cfg.workers * cfg.cpus_per_worker
    if cfg.gpus_per_worker > 0 or need <= total - RESERVED_DATA_CPUS:
        return cfg
    fit = (total - RESERVED_DATA_CPUS) / cfg.workers
    if fit < 0.1:
        raise ConfigError(
            f"{cfg.workers} CPU workers do not fit on this Ray cluster ({total:g} CPUs, "
            f"{RESERVED_DATA_CPUS:g} kept for Ray Data): use fewer --workers"
        )
    log.info(
        "%d workers × %g CPUs do not fit next to Ray Data on %g CPUs; using %.2f CPUs per worker",
        cfg.workers,
        cfg.cpus_per_worker,
        total,
        fit,
    )
    return cfg.model_copy(update={"cpus_per_worker": fit})


def _verbosity() -> int:
    """The driver's log level as ``pipelines.log.configure``'s verbosity, for the workers."""
    level = logging.getLogger("pipelines").getEffectiveLevel()
    return -1 if level >= logging.WARNING else 1 if level <= logging.DEBUG else 0


def _trainer(args: TrainerArgs, spec: DataSpec) -> Any:
    """The TorchTrainer of ``args`` over the Ray Data pipeline of ``spec``."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.train.loop import train_loop_per_worker

    cfg, run_dir = args.cfg, Path(args.run_dir)
    dataset = build_dataset(spec, args.recipe, cfg.loader.shuffle_files, cfg.seed, cfg.loader.augment_cpus)
    use_gpu = cfg.gpus_per_worker > 0
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": cfg.gpus_per_worker} if use_gpu else {})
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=args,  # type: ignore[arg-type]  # Ray hands it over as it is
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


def run_train(cfg: TrainConfig) -> TrainResult:
    """Train (or resume) the run in ``cfg.output``; returns the steps, export and model version."""
    import ray
    import ray.data

    from pipelines.train.tracking import RECORD, open_run

    if not cfg.data or not cfg.output:
        raise ConfigError("--data and --output are required")
    run_dir = Path(cfg.output).resolve()
    spec = open_data(cfg.data)
    conditions = _conditions(cfg, spec)
    model_kwargs = model_arguments(cfg, spec)
    init_weights = init_weights_file(cfg, model_kwargs)
    chash = config_hash(cfg)
    identity = {"config_hash": chash, "data": spec.root, "manifest_hash": spec.manifest_hash}
    record = claim_output(run_dir, RECORD, "training run", identity=identity)
    run_dir.mkdir(parents=True, exist_ok=True)
    info = open_run(cfg, run_dir, spec, chash, model_kwargs, record)
    log.info(
        "%s run %s: %d rows in %d shards, conditions %s; MLflow run %s at %s",
        "resuming" if info.resumed else "starting",
        run_dir.name,
        spec.rows,
        len(spec.files),
        ", ".join(conditions),
        info.run_id,
        info.tracking_uri,
    )
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    # Ray Data's per-operator bars would bury the training progress lines; ours say images/s and
    # the data-wait fraction, which is what matters here.
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = _fit_cpus(cfg)
    args = TrainerArgs(
        cfg=cfg,
        recipe=make_recipe(spec, FrozenDict(model_kwargs), conditions, cfg.augment),
        run_dir=str(run_dir),
        model_kwargs=model_kwargs,
        config_hash=chash,
        mlflow_run_id=info.run_id,
        tracking_uri=info.tracking_uri,
        files=list(spec.files),
        decompose=spec.settings,
        init_weights=init_weights,
        verbosity=_verbosity(),
        on_step=step_hook,
        on_finish=finish_hook,
    )
    return _fit(args, spec, info)


def _fit(args: TrainerArgs, spec: DataSpec, info: RunInfo) -> TrainResult:
    """``trainer.fit()``, the MLflow run marked FINISHED or FAILED, the result."""
    from pipelines.train.tracking import summary_of

    t0 = time.time()
    try:
        result = _trainer(args, spec).fit()
    except Exception:
        _mark_run(info.tracking_uri, info.run_id, "FAILED")
        raise
    _mark_run(info.tracking_uri, info.run_id, "FINISHED")
    export = summary_of(Path(args.run_dir))
    out = TrainResult(
        run_dir=args.run_dir,
        steps=int(result.metrics.get("step", 0)) if result.metrics else None,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        export=str(Path(args.run_dir) / "export"),
        model_uri=export.get("model_uri"),
        registered_model=args.cfg.mlflow.registered_model,
        model_version=export.get("version"),
        mlflow_run_id=info.run_id,
        tracking_uri=info.tracking_uri,
        seconds=round(time.time() - t0, 1),
        config=to_dict(args.cfg),
    )
    registered = f" = models:/{out.registered_model}/{out.model_version}" if out.model_version else ""
    log.info("done: %s steps; pipeline %s%s", out.steps, out.export, registered)
    return out


def _mark_run(uri: str, run_id: str, status: str) -> None:
    from mlflow import MlflowClient

    try:
        MlflowClient(uri).set_terminated(run_id, status=status)
    except Exception as e:  # noqa: BLE001 - the training result matters more than the run's status
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, e)
