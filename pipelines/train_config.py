"""The training job's configuration (``recompose train``): one frozen dataclass tree.

Defaults are the embedded default: the tiny preset on CPU workers, a local SQLite MLflow store.
``configs/train-*.yaml`` hold the other setups. Fields marked ``resource()`` change how fast or
how long a run goes, never what one step computes; they stay out of the config hash, so a run
can be resumed with more steps or more workers (the hash of everything else must match).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from models import DropoutConfig
from models.presets import PRESETS
from pipelines.augment import AugmentConfig
from pipelines.config import nested, resource

Strategy = Literal["ddp", "fsdp"]
Precision = Literal["auto", "no", "bf16"]
LRSchedule = Literal["constant", "cosine", "linear"]


@dataclass(frozen=True)
class ModelSection:
    preset: str = "tiny"  # models/presets.py: tiny (CPU, tests) … base (GPU cluster)
    resolution: int | None = None  # training side length; None: the shards' resolution
    caption_encoder: Literal["auto", "trainable", "clip", "t5", "clip+t5"] = "auto"  # auto: from the shards
    semantics_encoder: Literal["auto", "trainable", "clip"] = "auto"  # auto: clip if the shards have it
    overrides: dict[str, object] = nested(
        dict
    )  # any other ComposerModel argument, e.g. {layers_per_block: 1}

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"model.preset: unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 4):
            raise ValueError(f"model.resolution must be a multiple of 4 and >= 8, got {self.resolution}")


@dataclass(frozen=True)
class OptimSection:
    batch_size: int = 16  # per worker and micro-step; global batch = workers × batch_size × grad_accum
    grad_accum: int = 1  # micro-steps per optimizer step (a larger batch without more memory)
    lr: float = 1e-4  # AdamW; the SD/GLIDE-family default for batch ~256, fine for the tiny preset too
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100  # linear warmup: Adam's early steps are large without it
    schedule: LRSchedule = "constant"  # after warmup; cosine/linear decay to 0 at train.max_steps
    clip_grad_norm: float | None = 1.0  # None: no clipping
    ema_decay: float | None = 0.9999  # None: no EMA; samples and the export use the EMA weights
    ema_warmup: bool = True  # decay grows from 0 as in diffusers' EMAModel, so short runs get useful EMA
    # eps: plain ε-MSE; v: rows weighted by min(1/ᾱ_t, max_loss_weight), the v-prediction weighting
    # of the x0 error (models/objective.py): more weight where colours and layout are decided.
    loss_weighting: Literal["eps", "v"] = "eps"
    max_loss_weight: float = 20.0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("optim.batch_size and optim.grad_accum must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.loss_weighting not in ("eps", "v"):
            raise ValueError(f"optim.loss_weighting must be 'eps' or 'v', got {self.loss_weighting!r}")
        if not self.max_loss_weight >= 1:
            raise ValueError(f"optim.max_loss_weight must be >= 1, got {self.max_loss_weight}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ValueError("optim.clip_grad_norm must be > 0 or null")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"optim.ema_decay must be in (0, 1) or null, got {self.ema_decay}")


@dataclass(frozen=True)
class DataSection:
    shuffle_files: bool = True  # a new file order every epoch (Ray Data FileShuffleConfig)
    shuffle_buffer: int = resource(256)  # rows mixed across files in iter_torch_batches
    prefetch_batches: int = resource(2)  # batches prepared ahead, so the step never waits on Ray Data
    augment_cpus: float = resource(0.5)  # CPUs per augmentation task
    conditions: tuple[str, ...] = ()  # train on these only; empty: every condition the shards have


@dataclass(frozen=True)
class MLflowSection:
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<RUN_DIR's parent>/mlflow.db
    experiment: str = "recompose"
    registered_model: str | None = (
        "recompose"  # the export is registered under this name; None: not registered
    )
    log_every: int = resource(10)  # steps between metric points
    sample_every: int = resource(500)  # steps between sample grids (and at the end); 0: only at the end
    sample_rows: int = resource(4)  # held-aside images whose conditions the grids use
    sample_steps: int = resource(25)  # DDIM steps per grid sample
    sample_guidance: float = 3.0
    system_metrics: bool = resource(True)  # MLflow's CPU/GPU/memory monitor in the rank-0 worker


@dataclass(frozen=True)
class TrainConfig:
    data: str = ""  # a `recompose decompose` output directory (manifest.json, shards/)
    output: str = resource("")  # RUN_DIR: checkpoints, export/, train.json; its name is the run name
    max_steps: int = resource(1000)  # optimizer steps; a rerun with a larger value trains on
    workers: int = resource(2)  # Ray Train workers (one per GPU on a GPU cluster)
    gpus_per_worker: float = resource(0.0)  # 0: CPU workers with gloo; >0: CUDA + NCCL
    cpus_per_worker: float = resource(1.0)
    strategy: Strategy = resource("ddp")  # fsdp shards parameters and optimizer state (large presets)
    precision: Precision = resource("auto")  # auto: bf16 autocast on GPU, float32 on CPU
    seed: int = 0
    checkpoint_every: int = resource(200)  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = resource(2)
    max_failures: int = resource(2)  # worker-group restarts from the latest checkpoint
    fail_at_step: int | None = resource(None)  # testing only: rank 0 raises once when reaching this step
    progress: bool = resource(True)
    model: ModelSection = nested(ModelSection)
    optim: OptimSection = nested(OptimSection)
    dropout: DropoutConfig = nested(DropoutConfig)
    augment: AugmentConfig = nested(AugmentConfig)
    loader: DataSection = nested(DataSection)
    mlflow: MLflowSection = nested(MLflowSection)

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ValueError("gpus_per_worker must be >= 0 and cpus_per_worker > 0")
        if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
            raise ValueError("checkpoint_every and keep_checkpoints must be >= 1")
        if self.max_failures < 0:
            raise ValueError(f"max_failures must be >= 0, got {self.max_failures}")
        if self.strategy == "fsdp" and self.workers < 2:
            raise ValueError("strategy fsdp shards over workers: it needs workers >= 2")
