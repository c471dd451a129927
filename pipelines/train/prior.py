"""``recompose train --stage prior``: the cascade's prior (caption -> semantics embedding) trained
by the same Ray Train job as the base and the upsamplers, on the decomposition's (caption,
semantics) pairs.

The prior learns the semantics representation the base model takes:

- CLIP semantics (the data has a ``semantics`` column): that embedding, as stored; the caption
  inputs are the data's caption embeddings (or text, for a trainable caption encoder).
- The embedded default (the base's trainable ``ImageEncoder``): ``prior_of`` names that base
  model; its image encoder is copied into the prior, frozen, and turns each training image into
  the target. The caption is text (the prior's own trainable text encoder).

Driver: ``prior_arguments`` (the prior's config, the batch layout and the encoder weights).
Workers: ``fresh_prior`` (a new prior: encoder weights, target normalisation from the first
shard's rows), ``prior_rows`` (one micro-batch's loss per row). Rank 0: ``PriorTracker``
(metrics, a picture of how well sampled embeddings match their captions' images, the export:
a ``PriorPipeline`` in ``RUN_DIR/export``, logged to MLflow as artifacts).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import CONDITIONS
from models.prior import SemanticsPrior, prior_loss
from pipelines.config import ConfigError
from pipelines.train.config import TrainConfig

log = logging.getLogger(__name__)

PRIOR_SIZE = {"width": 128, "layers": 4, "heads": 4}  # overridable with model.overrides
NORMALIZATION_ROWS = 256  # rows of the first shard the target mean and std are taken from


def prior_arguments(cfg: TrainConfig, spec: Any) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """(SemanticsPrior's config, the base-model config the batches are laid out for, the base's
    weights file holding its image encoder or None); ``ConfigError`` naming what is missing."""
    from pipelines.diffusion.loading import ModelError, pipeline_dir
    from pipelines.train.run import model_arguments
    from pipelines.train.state import WEIGHTS

    weights = None
    if cfg.prior_of is not None:
        try:
            unet = pipeline_dir(cfg.prior_of) / "unet"
        except ModelError as e:
            raise ConfigError(f"prior_of: {str(e).removeprefix('--model ')}") from None
        base = json.loads((unet / "config.json").read_text())
        if base.get("upsample_factor", 1) > 1 or base.get("base_unet") is not None:
            raise ConfigError(f"prior_of {cfg.prior_of}: give the cascade's pixel base model")
        weights = str((unet / WEIGHTS).resolve())
    else:
        base = model_arguments(cfg.model_copy(update={"stage": "base"}), spec)
        if base["semantics_encoder"] == "trainable":
            raise ConfigError(
                "stage prior: this data has no CLIP semantics column, so the prior learns the base "
                "model's own semantics embedding: set prior_of (--prior-of) to that base model"
            )
    if base["caption_encoder"] == "base":
        raise ConfigError("stage prior: a base on a pretrained backbone has no semantics prior here")
    known = set(PRIOR_SIZE)
    unknown = set(cfg.model.overrides) - known
    if unknown:
        raise ConfigError(
            f"model.overrides for a prior: only {', '.join(sorted(known))}, not {', '.join(sorted(unknown))}"
        )
    kwargs = {
        "embedding_dim": base["semantics_dim"],
        "caption_encoder": base["caption_encoder"],
        "caption_sentence_dim": base["caption_sentence_dim"],
        "caption_token_dim": base["caption_token_dim"],
        "caption_length": base["caption_length"],
        "text_vocab_size": base["text_vocab_size"],
        "text_layers": base["text_layers"],
        "text_heads": base["text_heads"],
        "text_kernel": base.get("text_kernel", 1),  # bases saved before the option have none
        "image_encoder_bottleneck": base["semantics_dim"] if base["semantics_encoder"] == "trainable" else 0,
        **PRIOR_SIZE,
        **dict(cfg.model.overrides),
    }
    try:
        with torch.device("meta"):
            prior = SemanticsPrior(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model (prior): {e}") from None
    return dict(prior.config), base, weights


def targets(prior: SemanticsPrior, batch: dict[str, Any]) -> torch.Tensor:
    """(B, D) raw semantics embeddings of a prepared batch: the stored CLIP vectors, or the frozen
    image encoder's of the images."""
    if prior.image_encoder is None:
        return torch.as_tensor(np.asarray(batch["semantics"], np.float32))
    from pipelines.diffusion.inputs import image_to_tensor

    with torch.no_grad():
        return prior.embed_images(image_to_tensor(np.asarray(batch["image"]))).float()


def caption_inputs(prior: SemanticsPrior, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``encode_caption``'s keyword arguments from a prepared batch."""
    if prior.config.caption_encoder == "trainable":
        return {"text_ids": torch.as_tensor(batch["text_ids"])}
    from pipelines.diffusion.inputs import join_tokens

    keys = prior.config.caption_encoder.split("+")
    sentence = np.concatenate([np.asarray(batch[f"caption.{k}_sentence"], np.float32) for k in keys], -1)
    tokens = join_tokens([np.asarray(batch[f"caption.{k}_tokens"], np.float32) for k in keys])
    return {"sentence": torch.from_numpy(sentence), "tokens": torch.from_numpy(tokens)}


def fresh_prior(args: Any) -> SemanticsPrior:
    """A new prior for step 0: the base's image encoder (frozen) and the targets' normalisation
    from the first shard's first rows (the same on every rank)."""
    from safetensors.torch import load_file

    from pipelines.train.tracking import sample_batch

    prior = SemanticsPrior(**args.model_kwargs)
    if prior.image_encoder is not None:
        weights = load_file(args.init_weights)
        encoder = {
            k.removeprefix("image_encoder."): v.float()
            for k, v in weights.items()
            if k.startswith("image_encoder.")
        }
        prior.image_encoder.load_state_dict(encoder)
    batch = sample_batch(args, NORMALIZATION_ROWS)
    raw = targets(prior, batch)
    prior.set_normalization(raw.mean(0), raw.std(0) if len(raw) > 1 else torch.ones(raw.shape[1]))
    return prior


def prior_rows(
    wrapped: torch.nn.Module,
    prior: SemanticsPrior,
    scheduler: Any,
    batch: dict[str, torch.Tensor],
    dropout: float,
    device: torch.device,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-row losses (B,), presence (B, 8), available (B, 8)) of one micro-batch; the caption is
    dropped with probability ``dropout`` (and where the row has none) for guidance."""
    arrays = {k: batch[k].numpy() for k in ("image", "semantics") if k in batch}
    target = prior.normalize(targets(prior, arrays).to(device))
    b = target.shape[0]
    has = batch["has_caption"].bool() if "has_caption" in batch else torch.ones(b, dtype=torch.bool)
    keep = has & (torch.rand(b, generator=generator) >= dropout)
    caption = prior.encode_caption(**{k: v.to(device) for k, v in caption_inputs(prior, batch).items()})
    per_row = prior_loss(wrapped, scheduler, target, caption, keep.to(device), generator)
    i = CONDITIONS.index("caption")
    presence = torch.zeros(b, len(CONDITIONS), dtype=torch.bool)
    available = torch.zeros_like(presence)
    presence[:, i], available[:, i] = keep, has
    return per_row, presence, available


class PriorTracker:
    """Rank 0 of a prior run: the base tracker's metrics and run, a prior's picture and export."""

    def __init__(self, args: Any, device: Any):
        from pipelines.train.tracking import RankZeroTracker

        self.base = RankZeroTracker(args, device)
        self.args, self.device = args, device
        self.run_dir = Path(args.run_dir)

    def start(self, step: int) -> None:
        self.base.start(step)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.base.log_metrics(metrics, step)

    def flag(self, tag: str, message: str) -> None:
        self.base.flag(tag, message)

    def _pipeline(self, weights: dict[str, Any]) -> Any:
        from pipelines.diffusion.prior import PriorPipeline, prior_scheduler

        prior = SemanticsPrior.from_config(self.args.model_kwargs)
        prior.load_state_dict(weights)
        pipe = PriorPipeline(prior.to(self.device).eval(), prior_scheduler())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def match(self, weights: dict[str, Any]) -> tuple[dict[str, float], np.ndarray, list[str]]:
        """How well the prior's samples match their captions' images on the held-aside rows:
        cosine similarity of every sample to every row's true embedding (rows × rows), its
        diagonal's mean, and how often a sample is closest to its own row's embedding."""
        from pipelines.train.tracking import sample_batch

        pipe = self._pipeline(weights)
        n = max(2, self.args.cfg.mlflow.sample_rows * 2)
        batch = sample_batch(self.args, n)
        truth = torch.nn.functional.normalize(targets(pipe.prior, batch), dim=-1).cpu().numpy()
        texts = [str(t) for t in batch["text"]]
        captions = (
            texts
            if pipe.prior.config.caption_encoder == "trainable"
            else {k: batch[k] for k in batch if k.startswith("caption.")}
        )
        sampled = pipe(
            captions,
            guidance=self.args.cfg.mlflow.sample_guidance,
            num_inference_steps=self.args.cfg.mlflow.sample_steps,
        )
        sampled = sampled / np.linalg.norm(sampled, axis=-1, keepdims=True).clip(1e-8)
        sim = sampled @ truth.T
        metrics = {
            "prior/cosine": float(np.diag(sim).mean()),
            "prior/top1": float((sim.argmax(1) == np.arange(len(sim))).mean()),
        }
        return metrics, sim, texts

    def log_samples(self, weights: dict[str, Any], step: int) -> None:
        import mlflow

        from pipelines.files import write_bytes

        metrics, sim, texts = self.match(weights)
        self.log_metrics(metrics, step)
        path = self.run_dir / "samples" / f"step-{step:07d}.png"
        write_bytes(similarity_picture(sim, texts, metrics, step), path)
        mlflow.log_artifact(str(path), artifact_path="samples")

    def finish(self, weights: dict[str, Any], step: int) -> None:
        import mlflow

        from pipelines.files import replace_dir, write_json
        from pipelines.train.tracking import EXPORT_INFO, plot_metrics

        export = self.run_dir / "export"
        info_path = export / EXPORT_INFO
        done = json.loads(info_path.read_text()) if info_path.is_file() else {}
        if not (done.get("step") == step and done.get("run_id") == self.args.mlflow_run_id):
            tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=self.run_dir))
            self._pipeline(weights).save_pretrained(str(tmp))
            replace_dir(tmp, export)
            mlflow.log_artifacts(str(export), artifact_path="prior")
            uri = f"runs:/{self.args.mlflow_run_id}/prior"
            write_json(
                {"step": step, "run_id": self.args.mlflow_run_id, "model_uri": uri, "version": None},
                info_path,
            )
            log.info("exported the prior to %s and logged it as %s", export, uri)
        plot = self.run_dir / "metrics.png"
        plot_metrics(self.args.tracking_uri, self.args.mlflow_run_id, plot)
        mlflow.log_artifact(str(plot))
        mlflow.end_run()


def similarity_picture(sim: np.ndarray, texts: list[str], metrics: dict[str, float], step: int) -> bytes:
    """The rows × rows cosine similarities as a heat map, captions on the rows: a prior that
    works has a bright diagonal."""
    import io
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(sim)
    fig, ax = plt.subplots(figsize=(4 + 0.35 * n, 1.5 + 0.35 * n), dpi=100)
    im = ax.imshow(sim, vmin=-1, vmax=1, cmap="viridis")
    ax.set_yticks(range(n), [textwrap.shorten(t, 40) for t in texts], fontsize=7)
    ax.set_xticks(range(n), [str(i) for i in range(n)], fontsize=7)
    ax.set_xlabel("true semantics of row (image)")
    ax.set_ylabel("prior sample from row's caption")
    ax.set_title(
        f"step {step}: cosine {metrics['prior/cosine']:.2f}, top-1 {metrics['prior/top1']:.2f}", fontsize=9
    )
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
