"""The training job's configuration (``recompose train``): one frozen config tree.

Defaults are the embedded default: the tiny preset on CPU workers, a local SQLite MLflow store.
``configs/train-*.yaml`` hold the other setups. Fields marked ``resource()`` change how fast or
how long a run goes, never what one step computes; they stay out of the config hash, so a run
can be resumed with more steps or more workers (the hash of everything else must match).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from models import DropoutConfig
from models.presets import PRESETS
from pipelines.config import Config, added, nested, resource
from pipelines.data.augment import AugmentConfig

Strategy = Literal["ddp", "fsdp"]
Precision = Literal["auto", "no", "bf16"]
LRSchedule = Literal["constant", "cosine", "linear"]


class ModelSection(Config):
    preset: str = "tiny"  # models/presets.py: tiny (CPU, tests) … base (GPU cluster)
    # training side length; None: the shards' resolution
    resolution: int | None = Field(None, ge=8, multiple_of=4)
    caption_encoder: Literal["auto", "trainable", "clip", "t5", "clip+t5"] = "auto"  # auto: from the shards
    semantics_encoder: Literal["auto", "trainable", "clip"] = "auto"  # auto: clip if the shards have it
    # what the network predicts, saved as the pipeline scheduler's prediction_type (models/objective.py)
    prediction: Literal["epsilon", "v_prediction"] = added("epsilon")
    # the timesteps sampling visits, saved as the scheduler's timestep_spacing
    # (pipelines/diffusion/schedulers.py): leading (DDIM's) or trailing (the first step from pure
    # noise at t = T - 1, also for one step: an upsampler's posterior mean); None: leading, or a
    # pretrained base's own
    timestep_spacing: Literal["leading", "trailing"] | None = added(None)
    overrides: dict[str, object] = nested(
        dict
    )  # any other ComposerModel argument, e.g. {layers_per_block: 1}

    @model_validator(mode="after")
    def _check(self) -> ModelSection:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        return self


class OptimSection(Config):
    batch_size: int = Field(
        16, ge=1
    )  # per worker and micro-step; global batch = workers × batch_size × grad_accum
    grad_accum: int = Field(1, ge=1)  # micro-steps per optimizer step (a larger batch without more memory)
    lr: float = Field(
        1e-4, gt=0
    )  # AdamW; the SD/GLIDE-family default for batch ~256, fine for the tiny preset too
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = Field(100, ge=0)  # linear warmup: Adam's early steps are large without it
    schedule: LRSchedule = "constant"  # after warmup; cosine/linear decay to 0 at train.max_steps
    clip_grad_norm: float | None = Field(1.0, gt=0)  # None: no clipping
    ema_decay: float | None = Field(
        0.9999, gt=0, lt=1
    )  # None: no EMA; samples and the export use the EMA weights
    ema_warmup: bool = True  # decay grows from 0 as in diffusers' EMAModel, so short runs get useful EMA
    # eps: the plain MSE; v: ε-MSE rows weighted by min(1/ᾱ_t, max_loss_weight), the v-prediction
    # weighting of the x0 error; min_snr: Min-SNR-γ with γ = min_snr_gamma (models/objective.py).
    loss_weighting: Literal["eps", "v", "min_snr"] = "eps"
    max_loss_weight: float = Field(20.0, ge=1)
    min_snr_gamma: float = added(5.0, gt=0)


class DataSection(Config):
    shuffle_files: bool = True  # a new file order every epoch (Ray Data FileShuffleConfig)
    shuffle_buffer: int = resource(256, ge=0)  # rows mixed across files in iter_torch_batches
    prefetch_batches: int = resource(2, ge=0)  # batches prepared ahead, so the step never waits on Ray Data
    augment_cpus: float = resource(0.5, gt=0)  # CPUs per augmentation task
    conditions: tuple[str, ...] = ()  # train on these only; empty: every condition the shards have


class MLflowSection(Config):
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///<RUN_DIR's parent>/mlflow.db
    experiment: str = "recompose"
    registered_model: str | None = (
        "recompose"  # the export is registered under this name; None: not registered
    )
    log_every: int = resource(10, ge=1)  # steps between metric points
    sample_every: int = resource(500, ge=0)  # steps between sample grids (and at the end); 0: only at the end
    sample_rows: int = resource(4, ge=1)  # held-aside images whose conditions the grids use
    sample_steps: int = resource(25, ge=1)  # DDIM steps per grid sample
    sample_guidance: float = 3.0
    system_metrics: bool = resource(True)  # MLflow's CPU/GPU/memory monitor in the rank-0 worker


class TrainConfig(Config):
    data: str = ""  # a `recompose decompose` output directory (manifest.json, shards/)
    output: str = resource("")  # RUN_DIR: checkpoints, export/, train.json; its name is the run name
    max_steps: int = resource(1000, ge=1)  # optimizer steps; a rerun with a larger value trains on
    workers: int = resource(2, ge=1)  # Ray Train workers (one per GPU on a GPU cluster)
    gpus_per_worker: float = resource(0.0, ge=0)  # 0: CPU workers with gloo; >0: CUDA + NCCL
    cpus_per_worker: float = resource(1.0, gt=0)
    strategy: Strategy = resource("ddp")  # fsdp shards parameters and optimizer state (large presets)
    precision: Precision = resource("auto")  # auto: bf16 autocast on GPU, float32 on CPU
    seed: int = 0
    # Fine-tuning: a saved pipeline (a run's export/, a models:/ URI, or recompose:reference) whose
    # UNet weights start this run instead of the seed's random ones; steps, optimizer, LR warm-up and
    # EMA start afresh. Its model must be the one the model section builds. None: from scratch.
    init_from: str | None = added(None)
    # A pretrained Stable Diffusion-family pipeline (a diffusers directory, or a repo id in the local
    # Hugging Face cache) whose UNet becomes the Composer UNet (models/backbone.py); the data must
    # hold `latents` from its VAE (`recompose decompose --base`). None: a pixel model from scratch.
    base: str | None = added(None)
    # with a base: "full" trains the whole UNet (as Composer); "adapter" freezes the base and trains
    # only the new condition paths (and LoRA on its attention projections when lora_rank > 0)
    mode: Literal["full", "adapter"] = added("full")
    lora_rank: int = added(0, ge=0)  # peft LoRA rank on the base's attention layers (adapter mode)
    # Composer's cascade (issue 19): "base" trains the base model; "upsampler" a super-resolution
    # model of the same data, its low-resolution input derived from each image on the fly
    # (downsampled by upsample_factor, then noised to a level in 0..low_res_max_level: Imagen's
    # noise-conditioning augmentation, models/objective.py)
    # "prior": the caption -> semantics-embedding prior of the cascade (pipelines/train/prior.py)
    stage: Literal["base", "upsampler", "prior"] = added("base")
    upsample_factor: int = added(4, ge=2, le=4)
    low_res_max_level: int = added(250, ge=0, le=999)  # timesteps of the noise schedule
    # stage prior: the base model (pipeline directory or models:/ URI) whose trainable semantics
    # embedding the prior learns to sample (not needed on data with CLIP semantics)
    prior_of: str | None = added(None)
    prior_caption_dropout: float = added(0.1, ge=0, le=1)  # for the prior's guidance
    # eDiffi's ensemble of expert denoisers (docs/training.md "Experts"): train on the timesteps
    # [lo, hi) of the noise schedule only; None: every timestep
    noise_range: tuple[int, int] | None = added(None)
    # the trained run (RUN_DIR, whose export and config it starts from) or saved pipeline an expert
    # is fine-tuned from, as init_from; its range must lie in that model's own noise_range
    expert_of: str | None = added(None)
    gradient_checkpointing: bool = resource(
        False
    )  # recompute activations in backward: less memory, ~30% slower
    checkpoint_every: int = resource(200, ge=1)  # optimizer steps between checkpoints (and one at the end)
    keep_checkpoints: int = resource(2, ge=1)
    max_failures: int = resource(2, ge=0)  # worker-group restarts from the latest checkpoint
    progress: bool = resource(True)
    model: ModelSection = nested(ModelSection)
    optim: OptimSection = nested(OptimSection)
    dropout: DropoutConfig = nested(DropoutConfig)
    augment: AugmentConfig = nested(AugmentConfig)
    loader: DataSection = nested(DataSection)
    mlflow: MLflowSection = nested(MLflowSection)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.strategy == "fsdp" and self.workers < 2:
            raise ValueError("strategy fsdp shards over workers: it needs workers >= 2")
        if self.base is None and (self.mode != "full" or self.lora_rank):
            raise ValueError("mode and lora_rank are for a pretrained base: set base (--base) too")
        if self.lora_rank and self.mode != "adapter":
            raise ValueError("lora_rank trains LoRA beside a frozen base: set mode adapter (--mode adapter)")
        if self.base is not None and self.strategy == "fsdp" and self.mode == "adapter":
            raise ValueError("strategy fsdp is for mode full; the adapter mode trains few weights: use ddp")
        if self.base is not None and self.init_from is not None:
            raise ValueError("base and init_from both choose the starting weights; give one")
        if self.stage == "upsampler" and self.base is not None:
            raise ValueError("an upsampler is a pixel-space model of the cascade: it takes no base")
        if self.stage == "prior" and (self.base is not None or self.init_from is not None):
            raise ValueError("a prior starts from scratch: no base or init_from with stage prior")
        if self.stage == "prior" and self.strategy == "fsdp":
            raise ValueError("a prior is small: train it with strategy ddp")
        if self.prior_of is not None and self.stage != "prior":
            raise ValueError("prior_of is for stage prior")
        if self.noise_range is not None:
            lo, hi = self.noise_range
            if not 0 <= lo < hi:
                raise ValueError(
                    f"noise_range {lo}:{hi}: need 0 <= LO < HI (timesteps of the noise schedule)"
                )
            if self.stage == "prior":
                raise ValueError("noise_range trains an expert denoiser; a prior takes none")
        if self.expert_of is not None:
            if self.noise_range is None:
                raise ValueError("expert_of fine-tunes an expert: give its noise_range (--noise-range LO:HI)")
            if self.init_from is not None:
                raise ValueError("expert_of and init_from both choose the starting weights; give one")
        if "upsample_factor" in self.model.overrides:
            raise ValueError(
                "set upsample_factor (with stage: upsampler), not model.overrides.upsample_factor"
            )
        return self
