"""The Ray Train worker loop (Composer §3.2, "composition phase"): runs in every TorchTrainer worker.

Per optimizer step: ``grad_accum`` micro-batches from this worker's Ray Data shard, each with
condition dropout (models/dropout.py) and the ε-MSE loss (models/objective.py) under bf16
autocast on GPU; gradients all-reduced by DDP (gloo on CPU, NCCL on GPU) or sharded by FSDP;
clipping, AdamW, LR schedule, EMA. Every ``checkpoint_every`` steps a checkpoint
(pipelines/train/state.py) goes through ``ray.train.report``; on a restart or a rerun,
``ray.train.get_checkpoint()`` hands back the latest and the loop continues from its step.
Rank 0 alone talks to MLflow (pipelines/train/tracking.py).

    restore -> while step < max_steps: step -> log -> samples -> checkpoint -> finish
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from models import CONDITIONS, ComposerModel, ConditionDropout
from models.objective import diffusion_loss, noise_low_res, residual_target
from pipelines.data.batches import BatchRecipe
from pipelines.diffusion.inputs import image_to_tensor, to_conditions
from pipelines.diffusion.schedulers import default_scheduler
from pipelines.log import configure_worker
from pipelines.train import parallel
from pipelines.train import state as train_state
from pipelines.train.config import TrainConfig
from pipelines.train.metrics import LossWatch, Window, progress_line

log = logging.getLogger(__name__)

SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


@dataclasses.dataclass(frozen=True)
class TrainerArgs:
    """What every worker gets from the driver (Ray pickles it as the ``train_loop_config``)."""

    cfg: TrainConfig
    recipe: BatchRecipe
    run_dir: str
    model_kwargs: dict[str, Any]  # ComposerModel's config (pipelines/train/run.py model_arguments)
    config_hash: str
    mlflow_run_id: str
    tracking_uri: str
    files: list[str]  # the shards; the sample grids' rows come from the first
    decompose: dict[str, Any]  # the decomposition's settings, saved with the export
    init_weights: str | None = None  # cfg.init_from's UNet weights file (run.init_weights_file)
    verbosity: int = 0  # the driver's --quiet (-1) / --verbose (1), for the workers' log lines
    # The seam tests inject a worker failure through: called as on_step(rank, step) on every
    # worker before each optimizer step. Must be picklable: Ray ships it to the worker processes.
    on_step: Callable[[int, int], None] | None = None
    on_finish: Callable[[str], None] | None = None  # rank 0, at points of the export (run.finish_hook)
    base: BaseStart | None = None  # cfg.base, resolved by the driver (pipelines/train/run.py)


@dataclasses.dataclass(frozen=True)
class BaseStart:
    """A pretrained base as the workers need it: where its UNet is and what the driver read."""

    path: str  # the base pipeline directory (resolved: the workers' HF cache is not consulted)
    null_caption: Any  # (L, W) float32 numpy: the base text encoder's states for ""
    scheduler: dict[str, Any]  # the noise schedule the base was trained with (DDIMScheduler config)
    latent_scale: tuple[float, float]  # (scaling_factor, shift_factor): stored latents -> x0


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer and the EMA work on (all but a frozen base's)."""
    return [p for p in model.parameters() if p.requires_grad]


def train_scheduler(args: TrainerArgs) -> Any:
    """The noise schedule of training, samples and the export: the base's, or recompose's default."""
    spacing = args.cfg.model.timestep_spacing
    if args.base is None:
        return default_scheduler(args.cfg.model.prediction, spacing or "leading")
    from diffusers import DDIMScheduler

    changes = {} if spacing is None else {"timestep_spacing": spacing}
    return DDIMScheduler.from_config(args.base.scheduler, **changes)


def batch_inputs(
    model: ComposerModel,
    batch: dict[str, torch.Tensor],
    recipe: BatchRecipe,
    latent_scale: tuple[float, float] | None = None,
):
    """A prepared batch (pipelines/train/data.py) -> x0, Conditions, available (B, 8).

    x0 is (B, 3, S, S) in [-1, 1]; with ``latent_scale`` (a base model's VAE scaling and shift
    factors) it is the stored ``latents`` (B, C, S, S), scaled as the VAE's users do.

    Every condition the recipe trains on is always given (zeros in rows where it is absent), so
    DDP sees every parameter used in every step.
    """
    skip = ("text_ids", "has_caption", "latents")
    rows: dict[str, Any] = {k: v.numpy() for k, v in batch.items() if k not in skip}
    if "mask" in recipe.conditions:
        rows["mask.image"] = rows["image"]
    cond = to_conditions(model, rows)
    pixels = image_to_tensor(rows["image"])
    if "semantics" in recipe.conditions and recipe.semantics_encoder == "trainable":
        cond.semantics_image = pixels  # the trainable semantics encoder sees the image itself
    x0 = pixels
    if latent_scale is not None:
        scale, shift = latent_scale
        x0 = (batch["latents"].float() - shift) * scale
    if "text_ids" in batch:
        cond.text_ids = batch["text_ids"]
    b = x0.shape[0]
    available = torch.zeros(b, len(CONDITIONS), dtype=torch.bool)
    for i, name in enumerate(CONDITIONS):
        if name in recipe.conditions:
            available[:, i] = True
    if "caption" in recipe.conditions and "has_caption" in batch:
        available[:, CONDITIONS.index("caption")] = batch["has_caption"].bool()
    return x0, cond, available


def _resolve_precision(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@dataclasses.dataclass
class Training:
    """One worker's training state: what a checkpoint holds, fresh or restored."""

    model: ComposerModel
    wrapped: torch.nn.Module  # the model under DDP / FSDP
    ema: Any  # diffusers EMAModel, None without an EMA
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    generator: torch.Generator  # this rank's noise, timesteps and dropout
    progress: train_state.Progress


def restore(args: TrainerArgs, rank: int, device: torch.device) -> Training:
    """The latest checkpoint's state (``ray.train.get_checkpoint``), or a fresh one from the seed."""
    import ray.train

    torch.manual_seed(args.cfg.seed)  # identical initial weights on every rank
    prior = args.cfg.stage == "prior"
    checkpoint = ray.train.get_checkpoint()
    if prior:
        from models.prior import SemanticsPrior
        from pipelines.train.prior import fresh_prior

        model = fresh_prior(args) if checkpoint is None else SemanticsPrior(**args.model_kwargs)
    else:
        model = ComposerModel(**args.model_kwargs)
    if checkpoint is None:
        if args.base is not None:  # step 0 is exactly the base (models/backbone.py)
            _load_base(model, args.base)
        return _build(args, model, rank, device, None)
    damaged = []
    for candidate in _latest_first(checkpoint):
        with candidate.as_directory() as ckpt_dir:
            problems = train_state.verify(Path(ckpt_dir))
            if not problems:
                if damaged and rank == 0:
                    log.warning(
                        "resuming from %s: the later checkpoints are damaged (%s)",
                        candidate.path,
                        "; ".join(damaged),
                    )
                return _build(args, model, rank, device, Path(ckpt_dir))
        damaged.append(f"{candidate.path}: {', '.join(problems)}")
    raise RuntimeError(
        "every kept checkpoint is damaged, so the run cannot resume: "
        + "; ".join(damaged)
        + " (move them away to start over in the same --output, or use a new --output)"
    )


def _load_base(model: ComposerModel, base: BaseStart) -> None:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(Path(base.path) / "unet"), use_safetensors=True)
    model.load_base(unet, torch.as_tensor(base.null_caption))
    del unet


def _prepare(model: ComposerModel, cfg: TrainConfig) -> None:
    """What a base run's mode trains (adapter: only the new paths and LoRA), and gradient checkpointing."""
    if cfg.base is not None and cfg.mode == "adapter":
        from models.backbone import is_new_parameter

        for name, p in model.named_parameters():
            p.requires_grad_(is_new_parameter(name))
    if cfg.gradient_checkpointing and hasattr(model, "unet"):
        model.unet.enable_gradient_checkpointing()


def _latest_first(latest: Any) -> list[Any]:
    """``latest`` (Ray's latest recorded checkpoint), then the older checkpoints kept beside it,
    newest first. Folders named later than ``latest`` were never recorded (a write cut short)."""
    import pyarrow.fs
    import ray.train

    parent, _, name = latest.path.rstrip("/").rpartition("/")
    infos = latest.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    older = sorted(
        (i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory),
        reverse=True,
    )
    older = [n for n in older if n.startswith("checkpoint_") and n < name]
    return [latest] + [ray.train.Checkpoint(f"{parent}/{n}", latest.filesystem) for n in older]


def _build(
    args: TrainerArgs, model: ComposerModel, rank: int, device: torch.device, ckpt: Path | None
) -> Training:
    """``model`` wrapped, its EMA, optimizer, LR schedule and generator: from ``ckpt`` when given."""
    from diffusers.optimization import get_scheduler

    cfg = args.cfg
    progress = train_state.Progress(config_hash=args.config_hash, mlflow_run_id=args.mlflow_run_id)
    weights = None
    if ckpt is not None:
        progress = train_state.read_progress(ckpt)
        if progress.config_hash != args.config_hash:
            raise RuntimeError(
                f"the latest checkpoint was written with config hash {progress.config_hash}, this run "
                f"has {args.config_hash}: resume with the same config or use a new --output"
            )
        weights = train_state.read_weights(ckpt)
        model.load_state_dict(weights)
    elif args.init_weights is not None and cfg.stage != "prior":  # fine-tuning: start from these weights
        from safetensors.torch import load_file

        model.load_state_dict({k: v.float() for k, v in load_file(args.init_weights).items()})
    _prepare(model, cfg)
    # the paths of conditions the data lacks (e.g. no instances stored) get no gradient
    some_unused = set(args.recipe.conditions) != set(CONDITIONS)
    wrapped = parallel.wrap(model, cfg.strategy, device, some_unused)  # FSDP: parameters become shards here
    ema = _ema(cfg, model, ckpt, weights)
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        trainable(model), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay
    )
    lr_scheduler = get_scheduler(
        SCHEDULES[o.schedule], optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=cfg.max_steps
    )
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank)
    if ckpt is not None:
        state = train_state.read_state(ckpt)
        parallel.load_optimizer_state(model, optimizer, state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if rank < len(state["rng"]):  # more workers than the checkpoint had: the new ones keep their seed
            generator.set_state(state["rng"][rank])
    return Training(model, wrapped, ema, optimizer, lr_scheduler, generator, progress)


def _ema(cfg: TrainConfig, model: ComposerModel, ckpt: Path | None, weights: dict | None) -> Any:
    """diffusers' EMAModel of ``model``'s parameters, the checkpoint's when it has one (None: no EMA)."""
    from diffusers.training_utils import EMAModel

    if cfg.optim.ema_decay is None:
        return None
    ema_weights = train_state.read_weights(ckpt, "ema") if ckpt is not None else None
    # The EMA tracks the (possibly sharded) parameters: load its weights into them, copy, reload.
    if ema_weights is not None:
        parallel.load_weights(model, ema_weights)
    ema = EMAModel(trainable(model), decay=cfg.optim.ema_decay, use_ema_warmup=cfg.optim.ema_warmup)
    if ema_weights is not None:
        ema.load_state_dict(train_state.read_ema_counters(ckpt))
        parallel.load_weights(model, weights)
    return ema


def batches(
    shard: Any, cfg: TrainConfig, progress: train_state.Progress
) -> Iterator[dict[str, torch.Tensor]]:
    """This worker's batches from its Ray Data shard, epoch after epoch (counted in ``progress``)."""
    while True:
        progress.epoch += 1
        yield from shard.iter_torch_batches(
            batch_size=cfg.optim.batch_size,
            prefetch_batches=cfg.loader.prefetch_batches,
            local_shuffle_buffer_size=cfg.loader.shuffle_buffer or None,
            drop_last=True,
            device="cpu",
        )


@dataclasses.dataclass(frozen=True)
class Step:
    """What every optimizer step uses and none changes."""

    cfg: TrainConfig
    recipe: BatchRecipe
    device: torch.device
    global_batch: int  # images per optimizer step over all workers
    scheduler: Any  # the diffusion noise schedule (pipelines/diffusion/pipeline.py)
    dropout: ConditionDropout
    amp_dtype: torch.dtype | None  # autocast dtype; None: float32
    latent_scale: tuple[float, float] | None = None  # base models: x0 from the stored latents
    prior_scheduler: Any = None  # stage prior: its x_0-predicting schedule

    @classmethod
    def of(cls, args: TrainerArgs, device: torch.device, world: int) -> Step:
        cfg = args.cfg
        global_batch = cfg.optim.batch_size * cfg.optim.grad_accum * world
        dropout = ConditionDropout(cfg.dropout)
        amp = _resolve_precision(cfg, device)
        latent_scale = args.base.latent_scale if args.base is not None else None
        prior = None
        if cfg.stage == "prior":
            from pipelines.diffusion.prior import prior_scheduler

            prior = prior_scheduler()
        scheduler = train_scheduler(args)
        return cls(cfg, args.recipe, device, global_batch, scheduler, dropout, amp, latent_scale, prior)

    def low_res(
        self, model: ComposerModel, x0: torch.Tensor, cond: Any, generator: torch.Generator
    ) -> torch.Tensor:
        """An upsampler's input, drawn into ``cond`` from x0: downsampled, then noise-augmented;
        returns the x_0 the model learns (a residual upsampler's: over the bicubic upsampling)."""
        if model.config.upsample_factor > 1:
            cond.low_res, cond.low_res_level = noise_low_res(
                self.scheduler, x0, model.config.upsample_factor, self.cfg.low_res_max_level, generator
            )
            return residual_target(model, x0)
        return x0


def train_step(t: Training, s: Step, stream: Iterator[dict], window: Window) -> None:
    """One optimizer step over ``grad_accum`` micro-batches; losses and timings go to ``window``."""
    cfg, t0 = s.cfg, time.perf_counter()
    t.optimizer.zero_grad(set_to_none=True)
    for micro in range(cfg.optim.grad_accum):
        tw = time.perf_counter()
        batch = next(stream)
        window.wait += time.perf_counter() - tw
        if cfg.stage == "prior":
            _prior_micro(t, s, batch, window, micro == cfg.optim.grad_accum - 1)
            continue
        x0, cond, available = batch_inputs(t.model, batch, s.recipe, s.latent_scale)
        x0 = s.low_res(t.model, x0, cond, t.generator)
        presence = s.dropout(available, t.generator)
        last = micro == cfg.optim.grad_accum - 1
        sync = contextlib.nullcontext() if last else parallel.no_sync(t.wrapped, cfg.strategy)
        with sync:
            with torch.autocast(s.device.type, dtype=s.amp_dtype, enabled=s.amp_dtype is not None):
                # (B,) per-row losses: the per-subset metrics need the rows
                per_row = diffusion_loss(
                    t.wrapped,
                    s.scheduler,
                    x0.to(s.device),
                    cond.to(s.device),
                    presence.to(s.device),
                    t.generator,
                    reduction="none",
                    weighting=cfg.optim.loss_weighting,
                    max_weight=cfg.optim.max_loss_weight,
                    min_snr_gamma=cfg.optim.min_snr_gamma,
                    timesteps=cfg.noise_range,
                )
            (per_row.mean() / cfg.optim.grad_accum).backward()
        window.add(per_row.detach().float(), presence, available)
    if cfg.optim.clip_grad_norm is not None:
        window.grad_norm += parallel.clip_grad_norm(t.wrapped, cfg.optim.clip_grad_norm)
    t.optimizer.step()
    t.lr_scheduler.step()
    if t.ema is not None:
        t.ema.step(trainable(t.model))
    t.progress.step += 1
    t.progress.images += s.global_batch
    window.steps += 1
    window.time += time.perf_counter() - t0


def _prior_micro(t: Training, s: Step, batch: dict, window: Window, last: bool) -> None:
    """One micro-batch of a prior (pipelines/train/prior.py): its loss, backward, the window."""
    from pipelines.train.prior import prior_rows

    cfg = s.cfg
    sync = contextlib.nullcontext() if last else parallel.no_sync(t.wrapped, cfg.strategy)
    with sync:
        with torch.autocast(s.device.type, dtype=s.amp_dtype, enabled=s.amp_dtype is not None):
            per_row, presence, available = prior_rows(
                t.wrapped, t.model, s.prior_scheduler, batch, cfg.prior_caption_dropout, s.device, t.generator
            )
        (per_row.mean() / cfg.optim.grad_accum).backward()
    window.add(per_row.detach().float(), presence, available)


def log_window(t: Training, s: Step, window: Window, world: int, tracker: Any, watch: LossWatch) -> None:
    """The window's metrics over all workers (collective), logged by rank 0 (``tracker``); the
    loss read by ``watch`` on every worker (a loss that is not a number raises on all of them)."""
    metrics = window.reduce(world, s.global_batch)
    metrics["lr"] = t.lr_scheduler.get_last_lr()[0]
    metrics["epoch"] = t.progress.epoch
    if tracker is not None:
        tracker.log_metrics(metrics, t.progress.step)
        if s.cfg.progress:
            log.info(progress_line(t.progress.step, s.cfg.max_steps, metrics))
    warning = watch.check(t.progress.step, metrics.get("loss"))
    if warning is not None and tracker is not None:
        log.warning(warning)
        tracker.flag("recompose.loss_blowup", f"step {t.progress.step}: {warning}")


def checkpoint(t: Training, rank: int) -> None:
    """A checkpoint through ray.train.report: states gathered on every rank, written by rank 0,
    reported by every rank (Ray Train needs all of them)."""
    import ray.train
    import torch.distributed as dist

    states = [t.generator.get_state()]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, t.generator.get_state())
        states = gathered
    weights = parallel.full_weights(t.model)
    ema_weights = parallel.full_ema_weights(t.model, t.ema) if t.ema is not None else None
    optim = parallel.optimizer_state(t.model, t.optimizer)
    p = t.progress
    metrics = {"step": p.step, "epoch": p.epoch, "images": p.images}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    counters = None
    if t.ema is not None:
        counters = {k: v for k, v in t.ema.state_dict().items() if k != "shadow_params"}
    tmp = Path(tempfile.mkdtemp(prefix="recompose-ckpt-"))
    try:
        sched = t.lr_scheduler.state_dict()
        train_state.save(tmp, dict(t.model.config), weights, ema_weights, counters, optim, sched, states, p)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train_loop_per_worker(args: TrainerArgs) -> None:
    """Entry point of each Ray Train worker; ``args`` as built by pipelines/train/run.py."""
    import ray.train
    import ray.train.torch

    configure_worker(args.verbosity)
    cfg = args.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    t = restore(args, rank, device)
    s = Step.of(args, device, world)
    tracker = _tracker(args, rank, device, t.progress.step)
    stream = batches(ray.train.get_dataset_shard("train"), cfg, t.progress)
    window, start, watch = Window(device), t.progress.step, LossWatch()
    while t.progress.step < cfg.max_steps:
        if args.on_step is not None:
            args.on_step(rank, t.progress.step)
        train_step(t, s, stream, window)
        step, final = t.progress.step, t.progress.step >= cfg.max_steps
        if step % cfg.mlflow.log_every == 0 or final:
            log_window(t, s, window, world, tracker, watch)
            window = Window(device)
        if not final and cfg.mlflow.sample_every > 0 and step % cfg.mlflow.sample_every == 0:
            weights = parallel.full_ema_weights(t.model, t.ema)  # collective under FSDP
            if tracker is not None:
                tracker.log_samples(weights, step)
        if step % cfg.checkpoint_every == 0 or final:
            checkpoint(t, rank)
    if t.progress.step == start:  # resumed a finished run: nothing trained, still report
        checkpoint(t, rank)
    weights = parallel.full_ema_weights(t.model, t.ema)  # gathered once for the last grid and the export
    if tracker is not None:
        if t.progress.step > start:
            tracker.log_samples(weights, t.progress.step)
        tracker.finish(weights, t.progress.step)


def _tracker(args: TrainerArgs, rank: int, device: torch.device, step: int) -> Any:
    """Rank 0's MLflow logger, started at ``step``; None on the other ranks."""
    if rank != 0:
        return None
    from pipelines.train.tracking import RankZeroTracker

    if args.cfg.stage == "prior":
        from pipelines.train.prior import PriorTracker

        tracker: Any = PriorTracker(args, device)
    else:
        tracker = RankZeroTracker(args, device)
    tracker.start(step)
    return tracker
