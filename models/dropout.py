"""Condition dropout for training (Composer §3.2, "Joint training strategy").

Each row of a batch keeps a random subset of its available conditions: with probability
``p_drop_all`` none, with ``p_keep_all`` all of them, otherwise each condition independently
dropped with ``p_drop`` (0.5), except for those in ``per_condition`` (intensity: 0.7, because
"intensity" alone nearly gives the image away and the model must not learn to lean on it).
Learning every subset is what makes classifier-free guidance over condition *sets* possible.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.conditioning import CONDITIONS, INDEX


class DropoutConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    p_drop: float = Field(0.5, ge=0, le=1)  # per condition, as in the paper
    p_drop_all: float = Field(0.1, ge=0, le=1)  # all conditions dropped: the unconditional model CFG needs
    p_keep_all: float = Field(0.1, ge=0, le=1)  # all kept: the fully-conditioned model
    per_condition: dict[str, float] = Field(default_factory=lambda: {"intensity": 0.7})

    @model_validator(mode="after")
    def _check(self) -> DropoutConfig:
        if self.p_drop_all + self.p_keep_all > 1:
            raise ValueError("dropout p_drop_all + p_keep_all must be <= 1")
        for name, p in self.per_condition.items():
            if name not in INDEX:
                raise ValueError(
                    f"dropout per_condition: unknown condition {name!r}; known: {', '.join(CONDITIONS)}"
                )
            if not 0 <= p <= 1:
                raise ValueError(f"dropout per_condition[{name!r}] must be in [0, 1], got {p}")
        return self

    def drop_probabilities(self) -> torch.Tensor:
        """(8,) probability that each condition is dropped in an independently-dropped row."""
        p = torch.full((len(CONDITIONS),), self.p_drop)
        for name, value in self.per_condition.items():
            p[INDEX[name]] = value
        return p


class ConditionDropout:
    """Draws which conditions each training row keeps."""

    def __init__(self, config: DropoutConfig | None = None):
        self.config = config or DropoutConfig()
        self._p = self.config.drop_probabilities()

    def __call__(self, available: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """available (B, 8) bool (what the data has) -> presence (B, 8) bool (what the model sees)."""
        if available.dtype != torch.bool or available.ndim != 2 or available.shape[1] != len(CONDITIONS):
            raise ValueError(
                f"available must be (B, {len(CONDITIONS)}) bool, got {available.dtype} {tuple(available.shape)}"
            )
        b = available.shape[0]
        c = self.config
        mode = torch.rand(b, generator=generator)
        keep = torch.rand(b, len(CONDITIONS), generator=generator) >= self._p
        keep[mode < c.p_drop_all] = False
        keep[(mode >= c.p_drop_all) & (mode < c.p_drop_all + c.p_keep_all)] = True
        return keep.to(available.device) & available
