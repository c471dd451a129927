"""eDiffi's ensemble of expert denoisers (Balaji et al. 2022, arXiv 2211.01324, §3.2).

One model is first trained on every noise level; copies of it are then fine-tuned on intervals of
the noise schedule (``recompose train --expert-of RUN_DIR --noise-range LO:HI``: timesteps
[LO, HI)), eDiffi's binary split — a high-noise and a low-noise expert, each split again if
wanted. At sampling time each step runs the one expert whose interval holds its timestep, so a
step costs what one model's step costs.

An expert's export records its interval in ``expert.json``::

    {"format": "recompose.expert/1", "noise_range": [0, 500], "expert_of": "runs/base"}

An **ensemble pipeline directory** is a saved ``ComposerPipeline`` — the first expert's: its
``model_index.json``, ``scheduler/``, ``unet/`` and any ``vae/`` / ``text_encoder/`` — plus the
other experts' UNets and ``ensemble.json``::

    ensemble.json       {"format": "recompose.ensemble/1", "num_train_timesteps": 1000,
                         "experts": [{"name": "expert-0", "unet": "unet", "noise_range": [500, 1000]},
                                     {"name": "expert-1", "unet": "experts/expert-1/unet",
                                      "noise_range": [0, 500]}],
                         "from": {"expert-0": "runs/high", "expert-1": "runs/low"}}
    experts/expert-1/unet/

The intervals tile [0, num_train_timesteps) exactly. Whatever reads a saved pipeline reads an
ensemble directory (``load_pipeline`` adds the experts), so ``generate``, ``serve``, ``evaluate``
and a cascade's stages take one as any pipeline; a pipeline without ``ensemble.json`` is an
ensemble of one expert. ``recompose ensemble`` (``assemble``) writes one.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import ComposerModel, EncodedConditions
from pipelines.errors import UserError

ENSEMBLE_FILE = "ensemble.json"
EXPERT_FILE = "expert.json"
FORMAT = "recompose.ensemble/1"
EXPERT_FORMAT = "recompose.expert/1"

NoiseRange = tuple[int, int]


class EnsembleError(UserError):
    """An ensemble that cannot be assembled or loaded; the message says which expert and why."""


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def write_expert(directory: str | Path, noise_range: NoiseRange, expert_of: str | None) -> None:
    """Record in a saved pipeline that it is an expert of the timesteps ``noise_range``."""
    record = {"format": EXPERT_FORMAT, "noise_range": list(noise_range), "expert_of": expert_of}
    (Path(directory) / EXPERT_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_expert(directory: str | Path) -> NoiseRange | None:
    """The noise range a saved pipeline was trained on (``expert.json``); None: every timestep."""
    path = Path(directory) / EXPERT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        lo, hi = (int(v) for v in record["noise_range"])
    except (ValueError, KeyError, TypeError) as e:
        raise EnsembleError(f"{path}: not an expert record ({type(e).__name__}: {e})") from None
    return lo, hi


def run_export(spec: str) -> str:
    """A training run directory (``recompose train --output``) stands for its ``export/``; any
    other model (a pipeline directory, an MLflow URI) for itself."""
    p = Path(spec)
    if not (p / "model_index.json").is_file() and (p / "export" / "model_index.json").is_file():
        return str(p / "export")
    return spec


def parse_expert(text: str) -> tuple[str, NoiseRange | None]:
    """``MODEL`` or ``MODEL=LO:HI`` (``recompose ensemble --expert``)."""
    model, sep, spec = text.rpartition("=")
    if not sep:
        return text, None
    return model, parse_range(spec, f"--expert {text}:")


def parse_range(text: str, what: str = "--noise-range") -> NoiseRange:
    """``"LO:HI"`` -> (LO, HI), timesteps with 0 <= LO < HI."""
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            raise ValueError
        out = int(lo), int(hi)
    except ValueError:
        raise EnsembleError(f"{what} {text!r}: expected LO:HI, two whole timesteps (e.g. 0:500)") from None
    if not 0 <= out[0] < out[1]:
        raise EnsembleError(f"{what} {text!r}: need 0 <= LO < HI")
    return out


def plan(ranges: Sequence[NoiseRange | None], total: int, names: Sequence[str]) -> list[NoiseRange]:
    """Each expert's interval: the given ones, and the one left out (at most one, ``None``) takes
    the single gap the others leave. They must tile [0, total) without overlap."""
    missing = [i for i, r in enumerate(ranges) if r is None]
    if len(missing) > 1:
        raise EnsembleError(
            f"experts {', '.join(names[i] for i in missing)} have no noise range (no expert.json); "
            "give each but one its range (EXPERT=LO:HI)"
        )
    given = sorted((r, names[i]) for i, r in enumerate(ranges) if r is not None)
    for (r, n), (r2, n2) in zip(given, given[1:], strict=False):
        if r2[0] < r[1]:
            raise EnsembleError(f"the noise ranges of {n} ({r[0]}:{r[1]}) and {n2} ({r2[0]}:{r2[1]}) overlap")
    for r, n in given:
        if r[1] > total:
            raise EnsembleError(f"{n}: noise range {r[0]}:{r[1]} goes past the schedule's {total} timesteps")
    edges = [0, *(x for r, _ in given for x in r), total]
    gaps = [(a, b) for a, b in zip(edges[::2], edges[1::2], strict=True) if a < b]
    out = list(ranges)
    if missing:
        if len(gaps) != 1:
            raise EnsembleError(
                f"{names[missing[0]]} has no noise range and the others leave "
                f"{len(gaps)} gaps ({', '.join(f'{a}:{b}' for a, b in gaps) or 'none'}); give its range"
            )
        out[missing[0]] = gaps[0]
    elif gaps:
        raise EnsembleError(
            f"the experts leave timesteps {', '.join(f'{a}:{b}' for a, b in gaps)} without an expert; "
            f"their ranges must cover 0:{total}"
        )
    return [tuple(r) for r in out]  # type: ignore[misc]


def _schedule(directory: Path) -> dict[str, Any]:
    path = directory / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise EnsembleError(f"{directory}: not a saved pipeline (no scheduler/scheduler_config.json)")
    # the timesteps a sampler visits are not the noise schedule: an ensemble samples with those of
    # its highest-noise expert, the directory it is written from
    return {
        k: v
        for k, v in json.loads(path.read_text()).items()
        if not k.startswith("_") and k != "timestep_spacing"
    }


def _unet_config(directory: Path) -> dict[str, Any]:
    return {
        k: v
        for k, v in json.loads((directory / "unet" / "config.json").read_text()).items()
        if not k.startswith("_")
    }


def _components(directory: Path) -> dict[str, Any]:
    index = json.loads((directory / "model_index.json").read_text())
    return {k: v for k, v in index.items() if not k.startswith("_") and k != "decompose"}


def check_experts(dirs: Sequence[Path], names: Sequence[str]) -> None:
    """The experts must be one model: the same UNet architecture, noise schedule and components.
    ``names``: each expert as the messages name it (with where it is)."""
    first = dirs[0]
    for d, n in zip(dirs[1:], names[1:], strict=True):
        if _schedule(d) != _schedule(first):
            raise EnsembleError(f"{n} has another noise schedule than {names[0]}; experts share one")
        if _unet_config(d) != _unet_config(first):
            raise EnsembleError(f"{n} is another model than {names[0]} (unet/config.json differs)")
        if _components(d) != _components(first):
            raise EnsembleError(f"{n} has other pipeline components than {names[0]} (model_index.json)")


def assemble(
    experts: Sequence[str],
    ranges: Sequence[NoiseRange | None],
    output: str | Path,
    resolve: Callable[[str], Path],
) -> dict[str, Any]:
    """Copies the pipelines ``experts`` (run directories' exports, pipeline directories or MLflow
    URIs, made directories by ``resolve``) into the ensemble directory ``output`` and returns its
    ``ensemble.json``. A range of ``None`` is the expert's own (``expert.json``) or, for one model
    trained on every timestep, the gap the others leave. Checked before anything is copied."""
    out = Path(output)
    if out.exists():
        raise EnsembleError(f"--output {out} already exists; give a new directory")
    if not experts:
        raise EnsembleError("an ensemble needs at least one --expert")
    dirs = [resolve(e) for e in experts]
    names = [f"expert-{i}" for i in range(len(dirs))]
    labels = [f"{n} ({e})" for n, e in zip(names, experts, strict=True)]
    for d, label in zip(dirs, labels, strict=True):
        if is_ensemble(d):
            raise EnsembleError(f"{label} is itself an ensemble; give its experts")
    check_experts(dirs, labels)
    total = int(_schedule(dirs[0])["num_train_timesteps"])
    own = [r if r is not None else read_expert(d) for r, d in zip(ranges, dirs, strict=True)]
    intervals = plan(own, total, labels)
    order = sorted(range(len(dirs)), key=lambda i: -intervals[i][0])  # highest noise first: it runs first
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(dirs[order[0]], tmp)
    (tmp / EXPERT_FILE).unlink(missing_ok=True)  # the ensemble's intervals are in ensemble.json
    entries = []
    for rank, i in enumerate(order):
        unet = "unet" if rank == 0 else f"experts/{names[i]}/unet"
        if rank:
            shutil.copytree(dirs[i] / "unet", tmp / unet)
        entries.append({"name": names[i], "unet": unet, "noise_range": list(intervals[i])})
    index = {
        "format": FORMAT,
        "num_train_timesteps": total,
        "experts": entries,
        "from": {names[i]: experts[i] for i in order},
    }
    (tmp / ENSEMBLE_FILE).write_text(json.dumps(index, indent=2) + "\n")
    tmp.rename(out)
    return index


def read_index(directory: str | Path) -> dict[str, Any]:
    """``ensemble.json`` of ``directory``, checked (format, files, intervals)."""
    root = Path(directory)
    try:
        index = json.loads((root / ENSEMBLE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise EnsembleError(f"{root / ENSEMBLE_FILE}: unreadable ({e})") from None
    if index.get("format") != FORMAT:
        raise EnsembleError(f"{root / ENSEMBLE_FILE}: format {index.get('format')!r}, expected {FORMAT!r}")
    experts = index.get("experts") or []
    names = [str(e.get("name")) for e in experts]
    for e in experts:
        if not (root / e["unet"] / "config.json").is_file():
            raise EnsembleError(f"{root}: expert {e['name']}'s UNet {e['unet']} is missing")
    plan([tuple(e["noise_range"]) for e in experts], int(index["num_train_timesteps"]), names)
    if not experts or experts[0]["unet"] != "unet":
        raise EnsembleError(f"{root / ENSEMBLE_FILE}: the first expert must be the pipeline's own unet/")
    return index


@dataclass
class EnsembleEncoded:
    """Conditions encoded by each expert (its own condition encoders were fine-tuned too)."""

    parts: tuple[EncodedConditions, ...]

    def __len__(self) -> int:
        return len(self.parts[0])

    def select(self, rows: torch.Tensor) -> EnsembleEncoded:
        return EnsembleEncoded(tuple(p.select(rows) for p in self.parts))

    @staticmethod
    def cat(items: Sequence[EnsembleEncoded]) -> EnsembleEncoded:
        return EnsembleEncoded(
            tuple(EncodedConditions.cat(list(p)) for p in zip(*(i.parts for i in items), strict=True))
        )


class ExpertEnsemble(nn.Module):
    """Experts (``ComposerModel``s of one architecture) and their [lo, hi) timestep intervals;
    called as one model: each call runs the expert of its timestep."""

    def __init__(
        self,
        experts: Sequence[ComposerModel],
        ranges: Sequence[NoiseRange],
        names: Sequence[str] | None = None,
    ):
        super().__init__()
        if len(experts) != len(ranges) or not experts:
            raise ValueError("give one noise range per expert, and at least one expert")
        self.experts = nn.ModuleList(experts)
        self.ranges = [tuple(r) for r in ranges]
        self.names = list(names or (f"expert-{i}" for i in range(len(experts))))

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": n, "noise_range": list(r)} for n, r in zip(self.names, self.ranges, strict=True)]

    @property
    def config(self) -> Any:
        return self.experts[0].config

    @property
    def device(self) -> torch.device:
        return self.experts[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.experts[0].dtype

    def expert_at(self, timestep: torch.Tensor | int) -> int:
        """The index of the expert whose interval holds ``timestep`` (one value for the whole batch)."""
        t = torch.as_tensor(timestep)
        if t.numel() > 1:
            if not bool((t == t.flatten()[0]).all()):
                raise ValueError("an ensemble step runs one expert: give one timestep for the whole batch")
            t = t.flatten()[0]
        value = int(t)
        for k, (lo, hi) in enumerate(self.ranges):
            if lo <= value < hi:
                return k
        raise ValueError(f"timestep {value} is in no expert's interval {self.ranges}")

    def encode(self, conditions: Any, presence: torch.Tensor) -> EnsembleEncoded:
        return EnsembleEncoded(tuple(e.encode(conditions, presence) for e in self.experts))

    def residual_base(self, low: torch.Tensor) -> torch.Tensor:
        return self.experts[0].residual_base(low)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | int, encoded: EnsembleEncoded
    ) -> torch.Tensor:
        k = self.expert_at(timestep)
        return self.experts[k](sample, timestep, encoded=encoded.parts[k])


def load_experts(directory: str | Path, first: ComposerModel) -> ExpertEnsemble:
    """The ensemble of an ensemble directory whose pipeline (and so first expert, ``first``) is
    loaded: the other experts' UNets read from disk onto ``first``'s device and dtype."""
    root = Path(directory)
    index = read_index(root)
    experts = [first]
    for e in index["experts"][1:]:
        model = ComposerModel.from_pretrained(
            str(root / e["unet"]), use_safetensors=True, torch_dtype=first.dtype
        )
        experts.append(model.to(first.device))
    return ExpertEnsemble(
        experts, [tuple(e["noise_range"]) for e in index["experts"]], [e["name"] for e in index["experts"]]
    )


def attach_experts(pipe: Any, directory: str | Path) -> Any:
    """``pipe`` (loaded from ``directory``) with the other experts when ``directory`` is an
    ensemble directory; unchanged otherwise."""
    if is_ensemble(directory):
        pipe.ensemble = load_experts(directory, pipe.unet)
    return pipe


def describe(index: dict[str, Any]) -> str:
    return ", ".join(f"{e['name']} {e['noise_range'][0]}:{e['noise_range'][1]}" for e in index["experts"])
