"""The Ray Train worker loop (Composer §3.2, "composition phase"): runs in every TorchTrainer worker.

Per optimizer step: ``grad_accum`` micro-batches from this worker's Ray Data shard, each with
condition dropout (models/dropout.py) and the ε-MSE loss (models/objective.py) under bf16
autocast on GPU; gradients all-reduced by DDP (gloo on CPU, NCCL on GPU) or sharded by FSDP;
clipping, AdamW, LR schedule, EMA. Every ``checkpoint_every`` steps a checkpoint
(pipelines/train/state.py) goes through ``ray.train.report``; on a restart or a rerun,
``ray.train.get_checkpoint()`` hands back the latest and the loop continues from its step.
Rank 0 alone talks to MLflow (pipelines/train/tracking.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from models import CONDITIONS, ComposerModel, ConditionDropout
from models.objective import diffusion_loss
from pipelines.data.batches import BatchRecipe
from pipelines.diffusion.inputs import image_to_tensor, to_conditions
from pipelines.diffusion.pipeline import default_scheduler
from pipelines.log import WORKER_LOG
from pipelines.train import parallel
from pipelines.train import state as train_state
from pipelines.train.config import TrainConfig

SCHEDULES = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}


def batch_inputs(model: ComposerModel, batch: dict[str, torch.Tensor], recipe: BatchRecipe):
    """A prepared batch (pipelines/train/data.py) -> x0 (B, 3, S, S) in [-1, 1], Conditions, available (B, 8).

    Every condition the recipe trains on is always given (zeros in rows where it is absent), so
    DDP sees every parameter used in every step.
    """
    rows: dict[str, Any] = {k: v.numpy() for k, v in batch.items() if k not in ("text_ids", "has_caption")}
    if "mask" in recipe.conditions:
        rows["mask.image"] = rows["image"]
    cond = to_conditions(model, rows)
    x0 = image_to_tensor(rows["image"])
    if "semantics" in recipe.conditions and recipe.semantics_encoder == "trainable":
        cond.semantics_image = x0  # the trainable semantics encoder sees the image itself
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


def _subset_losses(per_row: torch.Tensor, presence: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """(sum, count) pairs per loss group (``loss_group_names``), flattened."""
    every = torch.ones_like(presence[:, 0])
    groups = [every, ~presence.any(1), (presence == available).all(1) & available.any(1)]
    groups += [presence[:, i] for i in range(presence.shape[1])]
    out = []
    for g in groups:
        g = g.to(per_row.device)
        out += [(per_row * g).sum(), g.sum().to(per_row.dtype)]
    return torch.stack(out)


def loss_group_names() -> list[str]:
    """MLflow names: ``loss`` over every row; ``loss/none`` rows with every condition dropped
    (the unconditional model), ``loss/all`` rows with every available one kept, and
    ``loss/with_<name>`` rows where that condition was kept."""
    return ["loss", "loss/none", "loss/all"] + [f"loss/with_{c}" for c in CONDITIONS]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker; ``config`` as built by pipelines/train/run.py."""
    import ray.train
    import ray.train.torch
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    cfg: TrainConfig = config["cfg"]
    recipe: BatchRecipe = config["recipe"]
    run_dir = Path(config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = ComposerModel(**config["model_kwargs"])
    checkpoint = ray.train.get_checkpoint()
    progress = train_state.Progress(config_hash=config["config_hash"], mlflow_run_id=config["mlflow_run_id"])
    ckpt_ctx = checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None)
    with ckpt_ctx as ckpt_dir:
        ckpt_dir = Path(ckpt_dir) if ckpt_dir else None
        if ckpt_dir is not None:
            progress = train_state.read_progress(ckpt_dir)
            if progress.config_hash != config["config_hash"]:
                raise RuntimeError(
                    f"the latest checkpoint was written with config hash {progress.config_hash}, this run "
                    f"has {config['config_hash']}: resume with the same config or use a new --output"
                )
            weights = train_state.read_weights(ckpt_dir)
            model.load_state_dict(weights)
        wrapped = parallel.wrap(model, cfg.strategy, device)  # FSDP: parameters become shards here
        ema = None
        if cfg.optim.ema_decay is not None:
            ema_weights = train_state.read_weights(ckpt_dir, "ema") if ckpt_dir is not None else None
            # The EMA tracks the (possibly sharded) parameters: load its weights into them, copy, reload.
            if ema_weights is not None:
                parallel.load_weights(model, ema_weights)
            ema = EMAModel(model.parameters(), decay=cfg.optim.ema_decay, use_ema_warmup=cfg.optim.ema_warmup)
            if ema_weights is not None:
                ema.load_state_dict(train_state.read_ema_counters(ckpt_dir))
                parallel.load_weights(model, weights)
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=cfg.optim.lr,
            betas=tuple(cfg.optim.betas),
            weight_decay=cfg.optim.weight_decay,
        )
        lr_scheduler = get_scheduler(
            SCHEDULES[cfg.optim.schedule],
            optimizer,
            num_warmup_steps=cfg.optim.warmup_steps,
            num_training_steps=cfg.max_steps,
        )
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + rank)
        if ckpt_dir is not None:
            state = train_state.read_state(ckpt_dir)
            parallel.load_optimizer_state(model, optimizer, state["optimizer"])
            lr_scheduler.load_state_dict(state["lr_scheduler"])
            if rank < len(state["rng"]):  # more workers than the checkpoint had: the new ones keep their seed
                generator.set_state(state["rng"][rank])
    scheduler = default_scheduler()
    dropout = ConditionDropout(cfg.dropout)
    amp_dtype = _resolve_precision(cfg, device)

    tracker = None
    if rank == 0:
        from pipelines.train.tracking import RankZeroTracker

        tracker = RankZeroTracker(cfg, config, run_dir, recipe, device)
        tracker.start(progress.step)

    shard = ray.train.get_dataset_shard("train")
    global_batch = cfg.optim.batch_size * cfg.optim.grad_accum * world
    window = _Window(len(loss_group_names()), device)
    start_step = progress.step

    def batches():
        while True:
            progress.epoch += 1
            yield from shard.iter_torch_batches(
                batch_size=cfg.optim.batch_size,
                prefetch_batches=cfg.loader.prefetch_batches,
                local_shuffle_buffer_size=cfg.loader.shuffle_buffer or None,
                drop_last=True,
                device="cpu",
            )

    stream = batches()
    while progress.step < cfg.max_steps:
        if cfg.fail_at_step is not None and rank == 0 and progress.step == cfg.fail_at_step:
            marker = run_dir / ".recompose" / f"failed-at-{cfg.fail_at_step}"
            if not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
                raise RuntimeError(f"fail_at_step={cfg.fail_at_step}: failing once on purpose (testing)")
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        for micro in range(cfg.optim.grad_accum):
            tw = time.perf_counter()
            batch = next(stream)
            window.wait += time.perf_counter() - tw
            x0, cond, available = batch_inputs(model, batch, recipe)
            presence = dropout(available, generator)
            last = micro == cfg.optim.grad_accum - 1
            sync = contextlib.nullcontext() if last else parallel.no_sync(wrapped, cfg.strategy)
            with sync:
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    # (B,) per-row losses: the per-subset metrics need the rows
                    per_row = diffusion_loss(
                        wrapped,
                        scheduler,
                        x0.to(device),
                        cond.to(device),
                        presence.to(device),
                        generator,
                        reduction="none",
                        weighting=cfg.optim.loss_weighting,
                        max_weight=cfg.optim.max_loss_weight,
                    )
                (per_row.mean() / cfg.optim.grad_accum).backward()
            window.add(per_row.detach().float(), presence, available)
        if cfg.optim.clip_grad_norm is not None:
            window.grad_norm += parallel.clip_grad_norm(wrapped, cfg.optim.clip_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        if ema is not None:
            ema.step(model.parameters())
        progress.step += 1
        progress.images += global_batch
        window.steps += 1
        window.time += time.perf_counter() - t0

        final = progress.step >= cfg.max_steps
        if progress.step % cfg.mlflow.log_every == 0 or final:
            metrics = window.reduce(world, global_batch)
            metrics["lr"] = lr_scheduler.get_last_lr()[0]
            metrics["epoch"] = progress.epoch
            window = _Window(len(loss_group_names()), device)
            if tracker is not None:
                tracker.log_metrics(metrics, progress.step)
                _say(progress.step, cfg.max_steps, metrics, cfg.progress)
        if not final and cfg.mlflow.sample_every > 0 and progress.step % cfg.mlflow.sample_every == 0:
            weights = parallel.full_ema_weights(model, ema)  # collective under FSDP
            if tracker is not None:
                tracker.log_samples(weights, progress.step)
        if progress.step % cfg.checkpoint_every == 0 or final:
            _report(model, ema, optimizer, lr_scheduler, generator, progress, rank)
    if progress.step == start_step:  # resumed a finished run: nothing trained, still report
        _report(model, ema, optimizer, lr_scheduler, generator, progress, rank)
    weights = parallel.full_ema_weights(model, ema)  # gathered once for the last grid and the export
    if tracker is not None:
        if progress.step > start_step:
            tracker.log_samples(weights, progress.step)
        tracker.finish(weights, progress.step)


@dataclasses.dataclass
class _Window:
    """Sums since the last metric point, kept on the device (no host sync per step) and reduced
    over all workers in one all-reduce."""

    groups: int
    device: torch.device
    steps: int = 0
    time: float = 0.0
    wait: float = 0.0

    def __post_init__(self) -> None:
        self.sums = torch.zeros(2 * self.groups, dtype=torch.float64, device=self.device)
        self.grad_norm = torch.zeros((), dtype=torch.float64, device=self.device)

    def add(self, per_row: torch.Tensor, presence: torch.Tensor, available: torch.Tensor) -> None:
        self.sums += _subset_losses(per_row.double(), presence, available)

    def reduce(self, world: int, global_batch: int) -> dict[str, float]:
        times = torch.tensor([self.time, self.wait], dtype=torch.float64, device=self.device)
        vec = torch.cat([self.sums, times, self.grad_norm[None]])
        if world > 1:
            import torch.distributed as dist

            t = vec if dist.get_backend() == "nccl" else vec.cpu()  # gloo reduces CPU tensors
            dist.all_reduce(t)
            vec = t
        vec = vec.cpu()
        sums, (time_sum, wait_sum, norm_sum) = vec[:-3], vec[-3:].tolist()
        out: dict[str, float] = {}
        for i, name in enumerate(loss_group_names()):
            s, n = float(sums[2 * i]), float(sums[2 * i + 1])
            if n > 0:
                out[name] = s / n
        step_time = time_sum / world  # mean over workers of the window's wall time
        out["images_per_s"] = global_batch * self.steps / max(step_time, 1e-9)
        out["data_wait_fraction"] = wait_sum / max(time_sum, 1e-9)
        out["step_time_s"] = step_time / max(self.steps, 1)
        if self.steps and norm_sum:
            out["grad_norm"] = norm_sum / world / self.steps
        return out


def _say(step: int, total: int, m: dict[str, float], enabled: bool) -> None:
    if not enabled:
        return
    print(
        f"[train] step {step}/{total}  loss {m.get('loss', float('nan')):.4f}  "
        f"{m['images_per_s']:.1f} img/s  data wait {100 * m['data_wait_fraction']:.1f}%",
        file=WORKER_LOG,
        flush=True,
    )


def _report(model, ema, optimizer, lr_scheduler, generator, progress, rank) -> None:
    """A checkpoint through ray.train.report: states gathered on every rank, written by rank 0,
    reported by every rank (Ray Train needs all of them)."""
    import ray.train
    import torch.distributed as dist

    states = [generator.get_state()]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, generator.get_state())
        states = gathered
    weights = parallel.full_weights(model)
    ema_weights = parallel.full_ema_weights(model, ema) if ema is not None else None
    optim = parallel.optimizer_state(model, optimizer)
    metrics = {"step": progress.step, "epoch": progress.epoch, "images": progress.images}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    counters = (
        {k: v for k, v in ema.state_dict().items() if k != "shadow_params"} if ema is not None else None
    )
    tmp = Path(tempfile.mkdtemp(prefix="recompose-ckpt-"))
    try:
        train_state.save(
            tmp,
            dict(model.config),
            weights,
            ema_weights,
            counters,
            optim,
            lr_scheduler.state_dict(),
            states,
            progress,
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
