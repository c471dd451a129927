"""Training checkpoints: what one holds, and writing/reading it.

    model/   as ComposerModel.save_pretrained: config.json + diffusion_pytorch_model.safetensors
    ema/     as diffusers EMAModel.save_pretrained: the EMA weights (safetensors), counters in config.json
    state.pt optimizer, LR scheduler and every rank's RNG states (torch.save of tensors and plain
             data only: read back with ``weights_only=True``, so a planted pickle cannot run code)
    state.json  step, epoch, images seen, config hash, MLflow run id, and the SHA-256 of every
             other file; written last

Ray Train copies the folder into ``RUN_DIR/checkpoint_<time>/`` and records it as the latest
only once the copy is complete (its checkpoint-manager snapshot is written after the upload), so
a kill during a write leaves the previous checkpoint as the latest. ``read_progress`` still
refuses a folder without ``state.json``, the file written last, in case one is given by hand.
``verify`` checks a folder against the digests in its ``state.json``: a resume skips a damaged
latest checkpoint (a disk error, a partial copy, a file edited by hand) for the one before it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models import ComposerModel
from pipelines.files import sha256_file

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
    files: dict[str, str] = field(default_factory=dict)  # path in the folder -> SHA-256 (written by save)


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
    record = {**asdict(progress), "files": _digests(directory)}
    (directory / STATE_JSON).write_text(json.dumps(record, indent=2) + "\n")


def _digests(directory: Path) -> dict[str, str]:
    """SHA-256 of every file in the folder but ``state.json``, by path relative to it."""
    return {
        p.relative_to(directory).as_posix(): sha256_file(p)
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != STATE_JSON
    }


def verify(directory: Path) -> list[str]:
    """What is wrong with a checkpoint folder (empty: it is whole): no or an unreadable
    ``state.json``, a file it lists missing or with other contents. A folder written before the
    digests were recorded is checked for its files only."""
    try:
        recorded = read_progress(directory).files
    except (RuntimeError, ValueError, TypeError) as e:  # missing, not JSON, unknown fields
        return [f"{STATE_JSON}: {e}"]
    if not recorded:
        needed = [f"model/{WEIGHTS}", "state.pt"]
        return [f"{name} is missing" for name in needed if not (directory / name).is_file()]
    problems = []
    for name, digest in recorded.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name} does not match its recorded SHA-256")
    return problems


def saved_model_config(directory: Path) -> dict[str, Any] | None:
    """The model config a checkpoint folder was saved with (``save``), None when it has none."""
    path = directory / "model" / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


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


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint file holds something other than tensors and plain data: it is not unpickled."""


def read_state(directory: Path) -> dict[str, Any]:
    """``optimizer``, ``lr_scheduler`` and ``rng`` (every rank's generator state).

    Loaded with ``weights_only=True``: tensors, numbers, strings, lists and dicts only. The
    checkpoint storage is shared by every worker, so a pickle there that would import or call
    anything is refused (``UnsafeCheckpoint``) instead of run."""
    import pickle

    path = directory / "state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(
            f"{path} holds objects other than tensors and plain data, so it is not loaded (loading "
            f"it could run code planted in the checkpoint storage): {str(e).splitlines()[0]}"
        ) from None
