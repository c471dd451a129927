"""The evaluation's configuration (``recompose evaluate``): one frozen dataclass tree.

What is measured is fixed by the fields that are not ``resource()``: the evaluation rows, seeds,
condition subsets, sampling and re-extraction settings. Their hash is recorded with the table,
so two tables with the same hash measured the same thing (on possibly different models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from models import CONDITIONS
from pipelines.config import nested, resource
from pipelines.eval_quality import QualityConfig

# Every subset is a set of condition names (models.CONDITIONS); "none" (all dropped, the
# unconditional floor) is always evaluated, and so are the real images (the ceiling).
DEFAULT_SUBSETS: dict[str, tuple[str, ...]] = {
    "caption": ("caption",),
    "semantics": ("semantics",),
    "palette": ("palette",),
    "sketch": ("sketch",),
    "instances": ("instances",),
    "depth": ("depth",),
    "intensity": ("intensity",),
    "mask+caption": ("mask", "caption"),
    "all": tuple(CONDITIONS),
}
RESERVED = ("none", "real")  # row names of the floor and the ceiling


@dataclass(frozen=True)
class ReextractConfig:
    # How depth and instances are read back from a generated image. extractor: the decomposition's
    # own extractor (a depth model needs weights; instances fall back to colour clustering);
    # scene: the synthetic scene parser re-renders the parsed objects in the generator's
    # conventions (the synthetic set's maps are ground truth, which a generated image lacks);
    # auto: scene on synthetic data, else the extractor.
    depth: Literal["auto", "extractor", "scene"] = "auto"
    instances: Literal["auto", "extractor", "scene"] = "auto"
    depth_weights: str | None = None  # a local depth model directory for the extractor method
    edge_tolerance_px: float = 1.0  # sketch edge F1: an edge within this distance is a match

    def __post_init__(self) -> None:
        for k in ("depth", "instances"):
            if getattr(self, k) not in ("auto", "extractor", "scene"):
                raise ValueError(f"reextract.{k} must be auto, extractor or scene, got {getattr(self, k)!r}")
        if self.edge_tolerance_px < 0:
            raise ValueError("reextract.edge_tolerance_px must be >= 0")


@dataclass(frozen=True)
class BenchmarkConfig:
    # The synthetic compositional benchmark: captions drawn fresh from the generator (a seed
    # training never used), half with only (colour, shape) pairs seen in training, half with a
    # held-out pair; each is generated from its caption alone and read back by the scene parser.
    # auto: when the data's captions are synthetic. YAML reads a bare on/off as true/false: taken too.
    enabled: Literal["auto", "on", "off"] | bool = "auto"
    seed: int = 1_000_003  # synth.py writes seeds 0..; an eval seed far from them
    num_captions: int | None = None  # per side (seen, held-out); None: num_samples
    guidance: float = 5.0  # caption-only generation needs more guidance than local maps

    def __post_init__(self) -> None:
        if isinstance(self.enabled, bool):
            object.__setattr__(self, "enabled", "on" if self.enabled else "off")
        if self.enabled not in ("auto", "on", "off"):
            raise ValueError(f"benchmark.enabled must be auto, on or off, got {self.enabled!r}")
        if self.num_captions is not None and self.num_captions < 1:
            raise ValueError("benchmark.num_captions must be >= 1 or null")


@dataclass(frozen=True)
class MLflowSection:
    # None: the training run's store (train.json beside an export directory), else
    # $MLFLOW_TRACKING_URI, else sqlite:///<OUTPUT's parent>/mlflow.db.
    tracking_uri: str | None = None
    experiment: str = "recompose"  # used only when the model's training run is not found
    enabled: bool = True


@dataclass(frozen=True)
class EvalConfig:
    model: str = ""  # a saved pipeline directory or models:/ / runs:/ URI
    data: str = ""  # a `recompose decompose` output: the evaluation rows and the real images
    output: str = resource("")
    num_samples: int = 64  # evaluation rows (the first of the data in manifest order)
    seed: int = 0  # row i is sampled with seed + i under every subset, so subsets differ only in conditions
    steps: int = 25  # DDIM steps
    guidance: float = 3.0  # one scale for every condition set (Composer's CFG over sets)
    subsets: dict[str, tuple[str, ...]] = nested(lambda: dict(DEFAULT_SUBSETS))
    mask_seed: int = 0  # the masks of the mask subsets (boxes/strokes/instances, as in training)
    workers: int = resource(2)  # Ray actors generating in parallel
    cpus_per_worker: float = resource(1.0)
    gpus_per_worker: float = resource(0.0)
    batch_size: int = resource(8)  # rows per sampling batch
    grid_rows: int = resource(4)  # example rows in the condition -> generation grid
    progress: bool = resource(True)
    reextract: ReextractConfig = nested(ReextractConfig)
    benchmark: BenchmarkConfig = nested(BenchmarkConfig)
    quality: QualityConfig = nested(QualityConfig)
    mlflow: MLflowSection = nested(MLflowSection)

    def __post_init__(self) -> None:
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2, got {self.num_samples}")
        if self.steps < 1 or self.batch_size < 1 or self.workers < 1 or self.grid_rows < 1:
            raise ValueError("steps, batch_size, workers and grid_rows must be >= 1")
        if self.guidance < 0 or self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ValueError("guidance, cpus_per_worker and gpus_per_worker must be >= 0")
        if not isinstance(self.subsets, dict) or not self.subsets:
            raise ValueError("subsets must be a non-empty mapping of name -> list of conditions")
        for name, conds in self.subsets.items():
            if name in RESERVED:
                raise ValueError(f"subsets: {name!r} is reserved (the unconditional floor / real images)")
            if isinstance(conds, str) or not conds:
                raise ValueError(f"subsets.{name}: expected a non-empty list of conditions, got {conds!r}")
            unknown = [c for c in conds if c not in CONDITIONS]
            if unknown:
                raise ValueError(
                    f"subsets.{name}: unknown condition(s) {', '.join(map(repr, unknown))}; "
                    f"known: {', '.join(CONDITIONS)}"
                )
