"""The contract every condition extractor follows (Composer §3.1, the decomposition phase).

An extractor is built once per Ray Data actor, loads its weights in ``setup()`` and then maps a
batch to a batch:

    input  batch: "image"        (B, H, W, 3) uint8 RGB at the stored resolution
                  "text"         (B,) object  caption strings ("" when the source has none)
                  "has_gt"       (B,) bool    whether the row carries ground truth (synthetic set)
                  "gt_instances" (B, H, W) uint8 ground-truth instance ids (0 = background) and
                  "gt_depth"     (B, H, W) uint8 ground-truth depth, 255 = nearest — both only
                                 when the source carries ground truth: read them for has_gt rows
    output batch: one array per declared ``ColumnSpec``, shape (B, *spec.shape), dtype spec.dtype

Outputs must be deterministic and batch-invariant (a batch of N equals N single calls), and no
extractor loops over pixels in Python. Heavy libraries (torch, open_clip, transformers,
controlnet_aux) are imported inside methods so that importing the registry stays cheap for Ray's
pickling and for the CLI.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from pipelines.config import Config, resource, to_dict

Batch = dict[str, np.ndarray]


class ExtractorConfig(Config):
    """Settings every extractor has: how its Ray Data actor stage is sized."""

    batch_size: int = resource(32, ge=1)  # rows per call; large enough to amortise a model forward
    concurrency: int = resource(1, ge=1)  # actors in the stage; raise on a cluster
    num_cpus: float = resource(1.0, ge=0)  # CPUs reserved per actor
    num_gpus: float = resource(0.0, ge=0)  # GPUs per actor; fractional shares one GPU between actors
    device: Literal["auto", "cpu", "cuda"] = resource("auto")  # auto: cuda when num_gpus > 0


@dataclass(frozen=True)
class ColumnSpec:
    """One output column: ``name`` in the batch, dtype and per-row shape.

    Names are ``<condition>`` for single-output extractors and ``<condition>.<field>`` for the
    fields of a multi-output one (``caption.clip_tokens``); on disk the latter become one struct
    column named after the condition.
    """

    name: str
    dtype: Literal["float16", "uint8"]
    shape: tuple[int, ...]
    description: str = ""


class ExtractorUnavailable(RuntimeError):
    """Raised when an extractor cannot run with the given configuration; the message says why."""


class Extractor(ABC):
    """Base class of the condition extractors; see the module docstring for the batch contract."""

    name: ClassVar[str]
    version: ClassVar[str]  # bump whenever the outputs for the same input change
    config_cls: ClassVar[type[ExtractorConfig]] = ExtractorConfig
    extracted: ClassVar[bool] = True  # False for `mask`, which is generated, not extracted

    def __init__(self, config: ExtractorConfig, resolution: int, has_ground_truth: bool = False):
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{self.name}: expected {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config
        self.resolution = resolution
        self.has_ground_truth = has_ground_truth
        self._ready = False

    # -- declaration -------------------------------------------------------------------------
    def unavailable_reason(self) -> str | None:
        """None if the extractor can run with this config, else a sentence saying why not."""
        return None

    @abstractmethod
    def columns(self) -> list[ColumnSpec]:
        """The output schema. May read small config files, never weights."""

    def resources(self) -> dict[str, Any]:
        """Ray Data ``map_batches`` sizing for this extractor's actor stage."""
        c = self.config
        return {
            "batch_size": c.batch_size,
            "concurrency": c.concurrency,
            "num_cpus": c.num_cpus,
            "num_gpus": c.num_gpus,
        }

    def fingerprint(self) -> str:
        """Identifies what this extractor writes: name, version and output-affecting settings.

        A change of the fingerprint makes a resumed job recompute this condition (and only it).
        """
        return self._fingerprint(to_dict(self.config, outputs_only=True))

    def _fingerprint(self, settings: dict[str, Any]) -> str:
        """``name@version:digest`` of the resolution and ``settings`` (extractors whose outputs
        depend on weights add the weights' identity to their settings here)."""
        text = json.dumps(settings, sort_keys=True, default=str)
        digest = hashlib.sha256(f"{self.resolution}|{text}".encode()).hexdigest()[:12]
        return f"{self.name}@{self.version}:{digest}"

    def describe(self) -> dict[str, Any]:
        """Name, version, fingerprint and schema, as written to the manifest."""
        return {
            "name": self.name,
            "version": self.version,
            "fingerprint": self.fingerprint(),
            "columns": [dataclasses.asdict(c) | {"shape": list(c.shape)} for c in self.columns()],
            "resources": self.resources(),
        }

    def uses_model(self) -> bool:
        """Whether ``extract`` runs a network that ``setup`` loads. The decomposition job gives
        such an extractor its own actor stage (the model is loaded once per actor); the others
        run inside the decode tasks, with no hop between stages."""
        return False

    # -- execution ---------------------------------------------------------------------------
    def setup(self) -> None:
        """Load weights; called once per actor before the first batch (no-op for numpy extractors)."""
        return None

    def torch_device(self) -> str:
        if self.config.device != "auto":
            return self.config.device
        import torch

        gpus = self.config.num_gpus or 0  # None (chosen from the cluster) was never filled in here
        return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"

    def prepare(self) -> None:
        """Check availability and load weights once; raises ``ExtractorUnavailable`` with the reason."""
        if self._ready:
            return
        reason = self.unavailable_reason()
        if reason:
            raise ExtractorUnavailable(f"{self.name}: {reason}")
        self.setup()
        self._ready = True

    def __call__(self, batch: Batch) -> Batch:
        self.prepare()
        out = self.extract(batch)
        self._check(out, len(batch["image"]))
        return out

    @abstractmethod
    def extract(self, batch: Batch) -> Batch:
        """Map an input batch to the declared output columns (see the module docstring)."""

    def _check(self, out: Batch, n: int) -> None:
        for spec in self.columns():
            if spec.name not in out:
                raise RuntimeError(f"{self.name}: extract() did not return column {spec.name!r}")
            a = out[spec.name]
            if a.dtype != np.dtype(spec.dtype) or a.shape != (n, *spec.shape):
                raise RuntimeError(
                    f"{self.name}: column {spec.name!r} is {a.dtype}{a.shape}, "
                    f"declared {spec.dtype}{(n, *spec.shape)}"
                )


def resolve_weights(path_or_repo: str, what: str) -> str:
    """A local directory for ``path_or_repo``: the path itself, or a snapshot in the HF cache.

    Never downloads: a repo id is looked up with ``local_files_only=True`` (as under
    ``HF_HUB_OFFLINE=1``), and a miss raises ``ExtractorUnavailable`` saying how to prefetch it.
    """
    import os

    if os.path.isdir(path_or_repo):
        return path_or_repo
    if os.path.exists(path_or_repo):
        raise ExtractorUnavailable(
            f"{what}: {path_or_repo!r} is a file; give the directory holding the weights"
        )
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path_or_repo, local_files_only=True)
    except Exception as e:  # the hub raises several types for "not cached"
        raise ExtractorUnavailable(
            f"{what}: {path_or_repo!r} is neither a local directory nor in the Hugging Face cache "
            f"({type(e).__name__}). On a machine with internet run "
            f"`huggingface-cli download {path_or_repo}` (or copy the directory here) and retry."
        ) from e
