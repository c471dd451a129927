"""MLflow for the training job: the run (driver side) and everything rank 0 logs into it.

Driver (``open_run``): the tracking URI (config, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///<RUN_DIR's parent>/mlflow.db`` with artifacts beside it), the experiment, and the
run — created once, with the flattened config as params and the config/manifest hashes as tags,
its id kept in ``RUN_DIR/train.json`` so a rerun or a restarted worker group logs into the same
run, never a second one.

Rank 0 (``RankZeroTracker``): metrics every ``log_every`` steps, MLflow's system metrics,
sample grids for fixed condition sets every ``sample_every`` steps (also saved under
``RUN_DIR/samples/``), and at the end the EMA pipeline exported to ``RUN_DIR/export/``, logged
and registered (pipelines/diffusion/mlflow_model.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from models import ComposerModel
from pipelines import tracking
from pipelines.config import flatten, to_dict
from pipelines.data.augment import AugmentConfig
from pipelines.data.batches import DataSpec, prepare_batch
from pipelines.diffusion.inputs import downsample_image
from pipelines.files import atomic_write, encode_png, replace_dir, write_bytes, write_json
from pipelines.train.config import TrainConfig
from pipelines.train.loop import TrainerArgs, train_scheduler

log = logging.getLogger(__name__)

# The fixed condition sets of the sample grids: (column label, conditions).
SAMPLE_SETS = (
    ("text only", ("caption",)),
    ("palette only", ("palette",)),
    ("sketch only", ("sketch",)),
    ("semantics only", ("semantics",)),
    ("all", None),  # every condition trained on except the mask
)
RECORD = "train.json"  # RUN_DIR's record: config hash, data, MLflow run
EXPORT_INFO = "recompose-training.json"


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """The MLflow run a training run logs into (``mlflow`` of ``train.json``, plus ``resumed``)."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    resumed: bool = False  # found again in train.json, not created


def tracking_uri(cfg: TrainConfig, run_dir: Path) -> str:
    return tracking.resolve_uri(cfg.mlflow.tracking_uri, tracking.sqlite_uri(run_dir.parent))


def open_run(
    cfg: TrainConfig,
    run_dir: Path,
    spec: DataSpec,
    config_hash: str,
    model_kwargs: dict[str, Any],
    record: dict[str, Any] | None,
) -> RunInfo:
    """Create the MLflow run of ``run_dir`` or, given its ``train.json`` ``record``, find it again."""
    from mlflow import MlflowClient

    uri = tracking_uri(cfg, run_dir)
    client = MlflowClient(uri)
    if record is not None:
        client.update_run(record["mlflow"]["run_id"], status="RUNNING")
        return RunInfo(**record["mlflow"], resumed=True)
    exp_id = tracking.experiment_id(client, cfg.mlflow.experiment, uri)
    run = client.create_run(
        exp_id,
        run_name=run_dir.name,
        tags={
            "recompose.config_hash": config_hash,
            "recompose.manifest_hash": spec.manifest_hash,
            "recompose.data": spec.root,
            "recompose.run_dir": str(run_dir.resolve()),
            "mlflow.source.name": "recompose train",
        },
    )
    tracking.log_params(client, run.info.run_id, _params(cfg, spec, model_kwargs))
    info = RunInfo(uri, exp_id, run.info.run_id)
    where = {"tracking_uri": uri, "experiment_id": exp_id, "run_id": run.info.run_id}
    record = {"config_hash": config_hash, "data": spec.root, "manifest_hash": spec.manifest_hash}
    # the output-affecting config itself: what `recompose reference` writes into the model's README
    record["config"] = to_dict(cfg, outputs_only=True)
    write_json({**record, "mlflow": where}, run_dir / RECORD)
    return info


def _params(cfg: TrainConfig, spec: DataSpec, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The flattened config, the model's resolved arguments and the data's size."""
    params: dict[str, Any] = dict(flatten(cfg))
    # str(), not JSON, for these: tuples read "(32, 64)" and lists "['a']" in every run's params,
    # so runs compare param for param.
    params.update({f"model.resolved.{k}": str(v) for k, v in model_kwargs.items()})
    params.update(
        {"data.rows": spec.rows, "data.shards": len(spec.files), "data.conditions": ",".join(spec.conditions)}
    )
    return params


def sample_batch(args: TrainerArgs, n: int) -> dict[str, Any]:
    """The first ``n`` rows of the first shard's first row group, prepared without random crops,
    with their captions as ``text``."""
    pf = pq.ParquetFile(args.files[0])
    cols = list(dict.fromkeys([*args.recipe.columns, "text"]))
    table = pf.read_row_group(0, columns=cols).slice(0, n)
    plain = AugmentConfig(crop_scale=(1.0, 1.0), flip=False, random_intensity=False)
    batch = prepare_batch(table, dataclasses.replace(args.recipe, augment=plain))
    batch["text"] = np.array(table.column("text").to_pylist(), object)
    return batch


class RankZeroTracker:
    """Everything rank 0 logs; see the module docstring."""

    def __init__(self, args: TrainerArgs, device: Any):
        self.args, self.cfg, self.recipe, self.device = args, args.cfg, args.recipe, device
        self.run_dir = Path(args.run_dir)
        self.run_id = args.mlflow_run_id
        self._rows: dict[str, Any] | None = None
        self._base: dict[str, Any] | None = None
        self._parent_model: ComposerModel | None = None

    def start(self, step: int) -> None:
        import mlflow

        self.client = mlflow.MlflowClient(self.args.tracking_uri)
        mlflow.set_tracking_uri(self.args.tracking_uri)
        if self.cfg.mlflow.system_metrics:
            mlflow.set_system_metrics_sampling_interval(5)
        mlflow.start_run(run_id=self.run_id, log_system_metrics=self.cfg.mlflow.system_metrics)
        if step:
            log.info("resumed at step %d (MLflow run %s)", step, self.run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        tracking.log_metrics(self.client, self.run_id, metrics, step)

    def flag(self, tag: str, message: str) -> None:
        """A warning about the run, as a tag on its MLflow run (seen in the dashboard's run page)."""
        self.client.set_tag(self.run_id, tag, message)

    # -- samples ---------------------------------------------------------------------------------
    def _sample_rows(self) -> dict[str, Any]:
        """The held-aside rows (first rows of the first shard), prepared without random crops."""
        if self._rows is None:
            batch = sample_batch(self.args, self.cfg.mlflow.sample_rows)
            f = self.args.model_kwargs.get("upsample_factor", 1)
            if f > 1:  # an upsampler's input: each row's image at 1/f, clean
                batch["low_res"] = downsample_image(batch["image"], f)
            self._rows = batch
        return self._rows

    def _conditions(self, row: int, names: tuple[str, ...]) -> dict[str, Any]:
        b, r = self._sample_rows(), self.recipe
        out: dict[str, Any] = {"low_res": b["low_res"][row]} if "low_res" in b else {}
        for name in names:
            if name == "caption":
                if r.caption_encoder == "trainable":
                    out["text"] = str(b["text"][row])
                else:
                    out.update({k: b[k][row].astype(np.float32) for k in b if k.startswith("caption.")})
            elif name == "semantics":
                if r.semantics_encoder == "trainable":
                    out["semantics.image"] = b["image"][row]
                else:
                    out["semantics"] = b["semantics"][row].astype(np.float32)
            elif name == "palette":
                out["palette"] = b["palette"][row].astype(np.float32)
            else:
                out[name] = b[name][row]
        return out

    def _base_parts(self) -> dict[str, Any]:
        """A base model's VAE, text encoder and tokenizer (loaded once): the grids decode latents
        and the export carries them, so it generates from a caption's text."""
        if self.args.base is None:
            return {}
        if self._base is None:
            from pipelines.conditions.backbone import load_base

            b = load_base(self.args.base.path, ("vae", "text_encoder", "tokenizer"), device=str(self.device))
            self._base = {"vae": b.vae, "text_encoder": b.text_encoder, "tokenizer": b.tokenizer}
        return self._base

    def _export_model(self, weights: dict[str, Any]) -> ComposerModel:
        """A plain model (on this worker's device) holding ``weights``, the EMA weights."""
        m = ComposerModel.from_config(self.args.model_kwargs)
        m.load_state_dict(weights)
        return m.to(self.device).eval()

    def _parent(self) -> ComposerModel:
        """The model an expert was fine-tuned from (``init_weights``), loaded once."""
        if self._parent_model is None:
            from safetensors.torch import load_file

            m = ComposerModel.from_config(self.args.model_kwargs)
            m.load_state_dict({k: v.float() for k, v in load_file(str(self.args.init_weights)).items()})
            self._parent_model = m.to(self.device).eval()
        return self._parent_model

    def sample_grid(self, weights: dict[str, Any], step: int) -> np.ndarray:
        from pipelines.conditions.palette import render_palette
        from pipelines.diffusion.pictures import layout, text_tile
        from pipelines.diffusion.pipeline import ComposerPipeline

        trained = tuple(c for c in self.recipe.conditions if c != "mask")
        b = self._sample_rows()
        choices = ((("low-res only", ()),) if "low_res" in b else ()) + SAMPLE_SETS
        sets = [
            (label, trained if names is None else names)
            for label, names in choices
            if all(c in trained for c in (names or ()))
        ]
        pipe = ComposerPipeline(self._export_model(weights), train_scheduler(self.args), **self._base_parts())
        if self.cfg.noise_range is not None and self.args.init_weights is not None:
            # an expert denoises its own noise range only: the grids run its parent for the rest
            from pipelines.diffusion.ensemble import ExpertEnsemble

            total = pipe.scheduler.config.num_train_timesteps
            pipe.ensemble = ExpertEnsemble([pipe.unet, self._parent()], [self.cfg.noise_range, (0, total)])
        pipe.set_progress_bar_config(disable=True)
        size = max(self.recipe.size, 96)
        rows = []
        for i in range(len(b["image"])):
            row = [("image", b["image"][i])]
            if "low_res" in b:
                row.append(("low-res", b["low_res"][i]))
            if "caption" in trained:
                row.append(("caption", text_tile(str(b["text"][i]), size)))
            if "palette" in trained:
                row.append(("palette", render_palette(b["palette"][i].astype(np.float32), size, size)))
            if "sketch" in trained:
                row.append(("sketch", b["sketch"][i]))
            for label, names in sets:
                out = pipe(
                    conditions=self._conditions(i, names),
                    guidance=self.cfg.mlflow.sample_guidance,
                    num_inference_steps=self.cfg.mlflow.sample_steps,
                    seed=i,
                )
                row.append((label, out.images[0]))
            rows.append(row)
        del pipe
        return layout(rows, size)

    def log_samples(self, weights: dict[str, Any], step: int) -> None:
        import mlflow

        path = self.run_dir / "samples" / f"step-{step:07d}.png"
        write_bytes(encode_png(self.sample_grid(weights, step)), path)
        mlflow.log_artifact(str(path), artifact_path="samples")

    # -- the end ---------------------------------------------------------------------------------
    def finish(self, weights: dict[str, Any], step: int) -> None:
        import mlflow

        export = self.run_dir / "export"
        info_path = export / EXPORT_INFO
        done = json.loads(info_path.read_text()) if info_path.is_file() else {}
        if done.get("step") == step and done.get("run_id") == self.run_id:
            log.info("export of step %d already logged (version %s)", step, done.get("version"))
        else:
            self._export(weights, export)
            from pipelines.diffusion.mlflow_model import log_pipeline, registered_version

            name = self.cfg.mlflow.registered_model
            # A crash after registering and before the record below must not register it twice.
            found = registered_version(name, self.run_id, step) if name else None
            if found is not None:
                uri, version = found
                log.info("export of step %d was already registered as version %s", step, version)
            else:
                uri, version = log_pipeline(export, name, run_id=self.run_id, step=step)
            self._point("registered")
            write_json({"step": step, "run_id": self.run_id, "model_uri": uri, "version": version}, info_path)
            where = f"models:/{self.cfg.mlflow.registered_model}/{version}" if version is not None else uri
            log.info("exported %s and logged it as %s", export, where)
        plot = self.run_dir / "metrics.png"
        plot_metrics(self.args.tracking_uri, self.run_id, plot)
        mlflow.log_artifact(str(plot))
        mlflow.end_run()

    def _export(self, weights: dict[str, Any], export: Path) -> None:
        """RUN_DIR/export: the pipeline with EMA weights, swapped in atomically (``replace_dir``):
        whenever the run is killed, ``export/`` is a whole pipeline, the old one or the new."""
        from pipelines.diffusion.pipeline import ComposerPipeline

        pipe = ComposerPipeline(
            self._export_model(weights),
            train_scheduler(self.args),
            decompose=self.args.decompose,
            **self._base_parts(),
        )
        tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=self.run_dir))
        pipe.save_pretrained(str(tmp))
        if self.cfg.noise_range is not None:
            from pipelines.diffusion.ensemble import write_expert

            write_expert(tmp, self.cfg.noise_range, self.cfg.expert_of)
        self._point("export-written")
        replace_dir(tmp, export, between=lambda: self._point("export-swapped"))

    def _point(self, name: str) -> None:
        if self.args.on_finish is not None:
            self.args.on_finish(name)


PLOTTED = (("loss", "loss/none", "loss/all"), ("images_per_s",), ("data_wait_fraction",), ("lr",))


def plot_metrics(uri: str, run_id: str, path: Path) -> None:
    """The run's loss curves, throughput, data wait and LR as one picture (the whole run's
    history from MLflow, so restarts and resumed runs are included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4.2 * len(PLOTTED), 3.2))
    for ax, keys in zip(axes, PLOTTED, strict=True):
        for key in keys:
            points = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            if points:
                ax.plot(*zip(*points, strict=True), label=key, lw=1)
        ax.set_xlabel("step")
        ax.set_title(", ".join(keys), fontsize=9)
        if keys[0] == "loss":
            ax.set_yscale("log")
            ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)


def summary_of(run_dir: Path) -> dict[str, Any]:
    """What the driver prints at the end: the export and its registered version."""
    info_path = run_dir / "export" / EXPORT_INFO
    return json.loads(info_path.read_text()) if info_path.is_file() else {}
