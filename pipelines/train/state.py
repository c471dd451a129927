"""Training checkpoints: what one holds, and writing/reading it.

    model/   as ComposerModel.save_pretrained: config.json + diffusion_pytorch_model.safetensors
    ema/     as diffusers EMAModel.save_pretrained: the EMA weights (safetensors), counters in config.json
    state.pt optimizer, LR scheduler and every rank's RNG states (torch.save: these are not tensors-only)
    state.json  step, epoch, images seen, config hash, MLflow run id; written last

Ray Train copies the folder into ``RUN_DIR/checkpoint_<time>/`` and records it as the latest
only once the copy is complete (its checkpoint-manager snapshot is written after the upload), so
a kill during a write leaves the previous checkpoint as the latest. ``read_progress`` still
refuses a folder without ``state.json``, the file written last, in case one is given by hand.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models import ComposerModel

STATE_JSON = "state.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
# diffusers EMAModel.state_dict() entries besides the weights.
EMA_COUNTERS = (
    "decay",
    "min_decay",
    "optimization_step",
    "update_after_step",
    "use_ema_warmup",
    "inv_gamma",
    "power",
)


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # passes over the data started
    images: int = 0  # training images seen (all workers)
    config_hash: str = ""
    mlflow_run_id: str = ""


def _write_weights(directory: Path, config: dict, weights: dict[str, torch.Tensor]) -> None:
    """A ``ComposerModel.from_pretrained`` folder from a full state dict, without building a model."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=list) + "\n")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(directory / WEIGHTS))


def save(
    directory: Path,
    model_config: dict,
    weights: dict[str, torch.Tensor],
    ema_weights: dict[str, torch.Tensor] | None,
    ema_counters: dict[str, Any] | None,
    optimizer: dict,
    lr_scheduler: dict,
    rng_states: list[torch.Tensor],
    progress: Progress,
) -> None:
    """Write a checkpoint folder from full (gathered) states; ``state.json`` last."""
    config = {"_class_name": ComposerModel.__name__, **dict(model_config)}
    _write_weights(directory / "model", config, weights)
    if ema_weights is not None:
        # diffusers' EMAModel.save_pretrained layout: the counters ride in config.json.
        _write_weights(directory / "ema", {**config, **(ema_counters or {})}, ema_weights)
    torch.save(
        {"optimizer": optimizer, "lr_scheduler": lr_scheduler, "rng": rng_states}, directory / "state.pt"
    )
    (directory / STATE_JSON).write_text(json.dumps(asdict(progress), indent=2) + "\n")


def read_progress(directory: Path) -> Progress:
    path = directory / STATE_JSON
    if not path.is_file():
        raise RuntimeError(f"checkpoint {directory} is incomplete (no {STATE_JSON}); it cannot be resumed")
    return Progress(**json.loads(path.read_text()))


def read_weights(directory: Path, which: str = "model") -> dict[str, torch.Tensor] | None:
    """The full state dict of ``model`` or ``ema`` (None if the checkpoint has no EMA)."""
    path = directory / which / WEIGHTS
    return load_file(str(path)) if path.is_file() else None


def read_ema_counters(directory: Path) -> dict[str, Any]:
    config = json.loads((directory / "ema" / "config.json").read_text())
    return {k: config[k] for k in EMA_COUNTERS if k in config}


def read_state(directory: Path) -> dict[str, Any]:
    """``optimizer``, ``lr_scheduler`` and ``rng`` (every rank's generator state)."""
    return torch.load(directory / "state.pt", map_location="cpu", weights_only=False)
