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
import inspect
import json
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
from pipelines.train.loop import BaseStart, TrainerArgs
from pipelines.train.metrics import LossNotFinite

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


# The settings of a preset that shape the condition paths; on a base, the UNet is the base's and the
# preset (with model.overrides) decides only these.
CONDITION_PATH_SETTINGS = (
    "local_channels",
    "local_hidden",
    "semantics_dim",
    "semantics_tokens",
    "palette_tokens",
)


def base_start(cfg: TrainConfig, spec: DataSpec) -> tuple[dict[str, Any], BaseStart]:
    """A base run's ComposerModel arguments and what its workers need (``BaseStart``), checked
    against the data: latents from this base's VAE at a resolution the model takes, caption
    embeddings from its text encoder. ``ConfigError`` / ``DataError`` say what does not fit."""
    import json

    import numpy as np

    from pipelines.conditions.backbone import BaseModelError, load_base, vae_identity

    assert cfg.base is not None
    try:
        parts = load_base(cfg.base, ("text_encoder", "tokenizer", "scheduler"))
        vae = vae_identity(parts.path)
        unet_config = json.loads((parts.path / "unet" / "config.json").read_text())
    except BaseModelError as e:
        raise ConfigError(str(e)) from None
    if spec.latents_vae is None:
        raise DataError(
            f"--data {spec.root}: holds no latents; decompose it with --base {cfg.base} "
            "(training on a base never runs the VAE)"
        )
    if (
        spec.latents_vae.get("sha256") != vae["sha256"]
        or spec.latents_vae.get("scaling_factor") != vae["scaling_factor"]
    ):
        raise DataError(
            f"--data {spec.root}: its latents come from another VAE than --base {cfg.base}'s "
            f"(decomposed with --base {spec.latents_base}, VAE sha256 {str(spec.latents_vae.get('sha256'))[:12]}; "
            f"this base's VAE {vae['sha256'][:12]}): decompose again with --base {cfg.base}"
        )
    f = int(vae["scale_factor"])
    size = cfg.model.resolution or spec.resolution
    if size != spec.resolution:
        raise ConfigError(
            f"model.resolution {size}: a base model trains on the stored latents, at the decomposition's "
            f"resolution ({spec.resolution}); decompose at {size} instead"
        )
    if "caption" in spec.conditions and "base" not in spec.caption_embeddings:
        raise DataError(
            f"--data {spec.root}: holds no caption embeddings of the base's text encoder "
            f"(caption.base_*); decompose it with --base {cfg.base}"
        )
    if cfg.model.caption_encoder not in ("auto", "base"):
        raise ConfigError(
            f"model.caption_encoder {cfg.model.caption_encoder}: a base model takes its own text encoder's"
        )
    augment_set = cfg.augment.model_fields_set
    if ("crop_scale" in augment_set and tuple(cfg.augment.crop_scale) != (1.0, 1.0)) or cfg.augment.flip:
        raise ConfigError(
            "augment.crop_scale / augment.flip: a base model trains on precomputed latents, which "
            "cannot be cropped or flipped; leave them unset (or crop_scale [1, 1], flip false)"
        )
    scheduler = dict(parts.scheduler.config)
    prediction = scheduler.get("prediction_type", "epsilon")
    if "prediction" in cfg.model.model_fields_set and cfg.model.prediction != prediction:
        raise ConfigError(
            f"model.prediction {cfg.model.prediction}: the base predicts {prediction}, and a base model "
            "keeps what its base predicts"
        )
    null_tokens, null_sentence = parts.encode_text([""])
    _, semantics = resolve_encoders(spec, "auto", cfg.model.semantics_encoder)
    preset = preset_config(cfg.model.preset, **dict(cfg.model.overrides))
    kwargs = {
        **{k: preset[k] for k in CONDITION_PATH_SETTINGS if k in preset},
        **spec.model_inputs("base" if "base" in spec.caption_embeddings else "trainable", semantics),
        "sample_size": size // f,
        "image_channels": unet_config["in_channels"],
        "local_downsample": f,
        "cross_attention_dim": unet_config["cross_attention_dim"],
        "caption_encoder": "base",
        "caption_sentence_dim": int(null_sentence.shape[-1]),
        "caption_token_dim": int(null_tokens.shape[-1]),
        "caption_length": int(null_tokens.shape[1]),
        "base_unet": {k: v for k, v in unet_config.items() if not k.startswith("_")},
        "lora_rank": cfg.lora_rank,
    }
    if "base" in spec.caption_embeddings:
        stored = (spec.shapes["caption.base_tokens"], spec.shapes["caption.base_sentence"])
        if stored != (
            (kwargs["caption_length"], kwargs["caption_token_dim"]),
            (kwargs["caption_sentence_dim"],),
        ):
            raise DataError(
                f"--data {spec.root}: its caption.base_* embeddings are {stored}, the base's text encoder "
                f"makes ({kwargs['caption_length']}, {kwargs['caption_token_dim']}): decompose again with --base {cfg.base}"
            )
    try:
        with torch.device("meta"):
            model = ComposerModel(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model on base {cfg.base}: {e}") from None
    start = BaseStart(
        path=str(parts.path.resolve()),
        null_caption=null_tokens[0].float().numpy().astype(np.float32),
        scheduler=scheduler | {"clip_sample": False},
        latent_scale=(float(vae["scaling_factor"]), float(vae.get("shift_factor") or 0.0)),
    )
    return dict(model.config), start


def model_arguments(cfg: TrainConfig, spec: DataSpec) -> dict[str, Any]:
    """ComposerModel's arguments: the preset, the data's inputs and encoders, ``model.overrides``."""
    caption, semantics = resolve_encoders(spec, cfg.model.caption_encoder, cfg.model.semantics_encoder)
    size = cfg.model.resolution or spec.resolution
    kwargs = {**spec.model_inputs(caption, semantics), "sample_size": size, **dict(cfg.model.overrides)}
    if cfg.stage == "upsampler":  # the model refuses a side the factor does not divide
        kwargs["upsample_factor"] = cfg.upsample_factor
    try:
        kwargs = preset_config(cfg.model.preset, **kwargs)
        with torch.device("meta"):  # checks every argument without allocating the weights
            model = ComposerModel(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    return dict(model.config)


def expert_source(expert_of: str) -> str:
    """The saved pipeline an expert starts from: a training run directory's ``export/``, or
    ``expert_of`` itself (a pipeline directory or MLflow URI)."""
    from pipelines.diffusion.ensemble import run_export
    from pipelines.train.tracking import RECORD

    run = Path(expert_of)
    if (run / RECORD).is_file() and not (run / "export" / "model_index.json").is_file():
        raise ConfigError(f"expert_of {expert_of}: this run has no export yet; let it finish first")
    return run_export(expert_of)


def expert_defaults(expert_of: str | None) -> dict[str, Any] | None:
    """What an expert of the training run ``expert_of`` inherits from it: the run's recorded config
    without its resources (steps, workers, output…) and starting point; None for a pipeline."""
    from pipelines.config import from_dict, to_dict
    from pipelines.train.tracking import RECORD

    if expert_of is None or not (Path(expert_of) / RECORD).is_file():
        return None
    record = json.loads((Path(expert_of) / RECORD).read_text())
    try:
        parent = from_dict(TrainConfig, record["config"])
    except (KeyError, ConfigError) as e:
        raise ConfigError(f"expert_of {expert_of}: its {RECORD} holds no usable config ({e})") from None
    out = to_dict(parent, outputs_only=True)
    for key in ("init_from", "expert_of", "noise_range"):
        out.pop(key, None)
    return out


def _start(cfg: TrainConfig) -> tuple[str | None, str]:
    """(the saved pipeline whose weights start this run, the config key that named it)."""
    if cfg.expert_of is not None:
        return expert_source(cfg.expert_of), "expert_of"
    return cfg.init_from, "init_from"


def check_noise_range(cfg: TrainConfig, total: int) -> None:
    """An expert's range inside the schedule's ``total`` timesteps and inside its parent's range."""
    from pipelines.diffusion.ensemble import EnsembleError, read_expert
    from pipelines.diffusion.loading import ModelError, pipeline_dir

    if cfg.noise_range is None:
        return
    lo, hi = cfg.noise_range
    if hi > total:
        raise ConfigError(f"noise_range {lo}:{hi}: the noise schedule has {total} timesteps (0:{total})")
    start, key = _start(cfg)
    if cfg.expert_of is None or start is None:
        return
    try:
        parent = read_expert(pipeline_dir(start))
    except (ModelError, EnsembleError) as e:
        raise ConfigError(f"{key}: {str(e).removeprefix('--model ')}") from None
    if parent is not None and not (parent[0] <= lo and hi <= parent[1]):
        raise ConfigError(
            f"noise_range {lo}:{hi} is not inside {cfg.expert_of}'s own {parent[0]}:{parent[1]}: "
            "an expert was trained on its interval only, so split that interval"
        )


def init_weights_file(cfg: TrainConfig, model_kwargs: dict[str, Any]) -> str | None:
    """The UNet weights file of ``cfg.init_from`` or ``cfg.expert_of`` (None when neither is set),
    checked to be the model that ``model_kwargs`` builds; ``ConfigError`` saying what differs otherwise."""
    from safetensors import safe_open

    from pipelines.diffusion.ensemble import is_ensemble
    from pipelines.diffusion.loading import ModelError, pipeline_dir
    from pipelines.train.state import WEIGHTS

    start, key = _start(cfg)
    if start is None:
        return None
    try:
        root = pipeline_dir(start)
    except ModelError as e:
        raise ConfigError(f"{key}: {str(e).removeprefix('--model ')}") from None
    if is_ensemble(root):
        raise ConfigError(f"{key} {start}: is an ensemble of experts; give one of the runs it was made from")
    unet = root / "unet"
    weights = unet / WEIGHTS
    if not (unet / "config.json").is_file() or not weights.is_file():
        raise ConfigError(f"{key} {start}: {unet} lacks config.json or {WEIGHTS}")
    # a model saved before a ComposerModel argument existed was built with that argument's default
    saved = json.loads(json.dumps(_defaults(ComposerModel))) | json.loads((unet / "config.json").read_text())
    wanted = json.loads(json.dumps(model_kwargs))  # tuples -> lists, as config.json has them
    differ = [
        f"{k} {saved.get(k)!r} there, {v!r} here"
        for k, v in wanted.items()
        if not k.startswith("_") and saved.get(k) != v
    ]
    if differ:
        raise ConfigError(
            f"{key} {start}: its UNet is not the model this config builds ({'; '.join(differ)}); "
            "use the model section (and data encoders) it was trained with"
        )
    with safe_open(str(weights), "pt") as f:  # the header only: catches a truncated or foreign file early
        keys = set(f.keys())
    with torch.device("meta"):
        missing = set(ComposerModel(**model_kwargs).state_dict()) ^ keys
    if missing:
        raise ConfigError(
            f"{key} {start}: {weights} does not hold this model's weights "
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


def _defaults(cls: type) -> dict[str, Any]:
    return {
        k: p.default
        for k, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def as_checkpointed(run_dir: Path, model_kwargs: dict[str, Any], cls: type) -> dict[str, Any]:
    """``model_kwargs`` as the run's checkpoints were built, when it has any: an argument their
    saved config lacks was added to ``cls`` (and maybe to a preset) after the run started, and the
    run resumes with that argument's default, the model it saved. A run in progress then resumes
    after an upgrade instead of failing on the weights a new default would add."""
    from pipelines.train.state import saved_model_config

    dirs = sorted(run_dir.glob("checkpoint_*"), reverse=True)  # the latest saved config decides
    config = next((c for d in dirs if (c := saved_model_config(d)) is not None), None)
    if config is None:
        return model_kwargs
    defaults = _defaults(cls)
    older = {
        k: defaults[k]
        for k in model_kwargs
        if k not in config and k in defaults and model_kwargs[k] != defaults[k]
    }
    if older:
        log.info(
            "resuming a run whose checkpoints predate %s: built with %s as they were",
            ", ".join(sorted(older)),
            ", ".join(f"{k}={v!r}" for k, v in sorted(older.items())),
        )
    return {**model_kwargs, **older}


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
    base = None
    layout = None  # the config the batches are laid out for, when it is not the trained model's
    if cfg.base is not None:
        model_kwargs, base = base_start(cfg, spec)
        model_kwargs = as_checkpointed(run_dir, model_kwargs, ComposerModel)
        init_weights = init_weights_file(cfg, model_kwargs)
    elif cfg.stage == "prior":
        from models.prior import SemanticsPrior
        from pipelines.train.prior import prior_arguments

        model_kwargs, layout, init_weights = prior_arguments(cfg, spec)  # init_weights: the image encoder's
        model_kwargs = as_checkpointed(run_dir, model_kwargs, SemanticsPrior)
        conditions = tuple(c for c in conditions if c in ("caption", "semantics"))
        if conditions != ("caption", "semantics"):
            raise DataError(
                "stage prior learns from (caption, semantics) pairs: the data (loader.conditions) needs both"
            )
    else:
        model_kwargs = as_checkpointed(run_dir, model_arguments(cfg, spec), ComposerModel)
        init_weights = init_weights_file(cfg, model_kwargs)
    if cfg.noise_range is not None:
        from pipelines.diffusion.schedulers import default_scheduler

        total = base.scheduler["num_train_timesteps"] if base is not None else None
        check_noise_range(cfg, int(total or default_scheduler().config.num_train_timesteps))
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
        recipe=make_recipe(spec, FrozenDict(layout or model_kwargs), conditions, cfg.augment),
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
        base=base,
    )
    return _fit(args, spec, info)


def _fit(args: TrainerArgs, spec: DataSpec, info: RunInfo) -> TrainResult:
    """``trainer.fit()``, the MLflow run marked FINISHED or FAILED, the result."""
    from pipelines.train.tracking import summary_of

    t0 = time.time()
    try:
        result = _trainer(args, spec).fit()
    except Exception as e:
        _mark_run(info.tracking_uri, info.run_id, "FAILED")
        diverged = _loss_not_finite(e)
        if diverged is not None:
            raise ConfigError(f"training stopped: {diverged}") from None
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


def _loss_not_finite(error: Exception) -> str | None:
    """The message of the ``LossNotFinite`` that failed the run's workers, if that is why it failed
    (``ray.train.WorkerGroupError`` holds each failed worker's exception)."""
    for failure in (getattr(error, "worker_failures", None) or {}).values():
        if isinstance(failure, LossNotFinite):
            return str(failure)
    return None


def _mark_run(uri: str, run_id: str, status: str) -> None:
    from mlflow import MlflowClient

    try:
        MlflowClient(uri).set_terminated(run_id, status=status)
    except Exception as e:  # noqa: BLE001 - the training result matters more than the run's status
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, e)
