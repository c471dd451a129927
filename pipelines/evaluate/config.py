"""The evaluation's configuration (``recompose evaluate``): one frozen config tree.

What is measured is fixed by the fields that are not ``resource()``: the evaluation rows, seeds,
condition subsets, sampling and re-extraction settings. Their hash is recorded with the table,
so two tables with the same hash measured the same thing (on possibly different models).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from models import CONDITIONS
from pipelines.config import Config, added, nested, resource
from pipelines.diffusion.loading import REFERENCE_MODEL
from pipelines.evaluate.quality import QualityConfig

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


class ReextractConfig(Config):
    # How depth and instances are read back from a generated image. extractor: the decomposition's
    # own extractor (a depth model needs weights; instances fall back to colour clustering);
    # scene: the synthetic scene parser re-renders the parsed objects in the generator's
    # conventions (the synthetic set's maps are ground truth, which a generated image lacks);
    # auto: scene on synthetic data, else the extractor.
    depth: Literal["auto", "extractor", "scene"] = "auto"
    instances: Literal["auto", "extractor", "scene"] = "auto"
    depth_weights: str | None = None  # a local depth model directory for the extractor method
    edge_tolerance_px: float = Field(1.0, ge=0)  # sketch edge F1: an edge within this distance is a match


class BenchmarkConfig(Config):
    # The synthetic compositional benchmark: captions drawn fresh from the generator (a seed
    # training never used), half with only (colour, shape) pairs seen in training, half with a
    # held-out pair; each is generated from its caption alone and read back by the scene parser.
    # auto: when the data's captions are synthetic. YAML reads a bare on/off as true/false: taken too.
    enabled: Literal["auto", "on", "off"] = "auto"
    seed: int = 1_000_003  # synth.py writes seeds 0..; an eval seed far from them
    num_captions: int | None = Field(None, ge=1)  # per side (seen, held-out); None: num_samples
    guidance: float = 5.0  # caption-only generation needs more guidance than local maps

    @field_validator("enabled", mode="before")
    @classmethod
    def _on_off(cls, value: object) -> object:
        return ("on" if value else "off") if isinstance(value, bool) else value


class MLflowSection(Config):
    # None: the training run's store (train.json beside an export directory), else
    # $MLFLOW_TRACKING_URI, else sqlite:///<OUTPUT's parent>/mlflow.db.
    tracking_uri: str | None = None
    experiment: str = "recompose"  # used only when the model's training run is not found
    enabled: bool = True


class EvalConfig(Config):
    model: str = (
        REFERENCE_MODEL  # a saved pipeline directory, models:/ / runs:/ URI, or the shipped reference
    )
    data: str = ""  # a `recompose decompose` output: the evaluation rows and the real images
    output: str = resource("")
    num_samples: int = Field(64, ge=2)  # evaluation rows (the first of the data in manifest order)
    seed: int = 0  # row i is sampled with seed + i under every subset, so subsets differ only in conditions
    steps: int = Field(25, ge=1)  # DDIM steps (a cascade's base)
    upsampler_steps: int = added(20, ge=1)  # a cascade's upsamplers: DDIM steps of each
    resolution: int | None = added(None, ge=1)  # a cascade: the side measured at (None: its last stage)
    guidance: float = Field(3.0, ge=0)  # one scale for every condition set (Composer's CFG over sets)
    subsets: dict[str, tuple[str, ...]] = Field(default_factory=lambda: dict(DEFAULT_SUBSETS), min_length=1)
    mask_seed: int = 0  # the masks of the mask subsets (boxes/strokes/instances, as in training)
    workers: int = resource(2, ge=1)  # Ray actors generating in parallel
    cpus_per_worker: float = resource(1.0, ge=0)
    gpus_per_worker: float = resource(0.0, ge=0)
    batch_size: int = resource(8, ge=1)  # rows per sampling batch
    grid_rows: int = resource(4, ge=1)  # example rows in the condition -> generation grid
    progress: bool = resource(True)
    reextract: ReextractConfig = nested(ReextractConfig)
    benchmark: BenchmarkConfig = nested(BenchmarkConfig)
    quality: QualityConfig = nested(QualityConfig)
    mlflow: MLflowSection = nested(MLflowSection)

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
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
        return self
