"""Classifier-free guidance over condition *sets* (Composer §3.2, Eq. 2).

Composer's Eq. 2 guides from one condition set c1 towards another c2:

    ε̂ = ω · ε(x_t, c2) + (1 − ω) · ε(x_t, c1)

which is standard CFG when c1 = ∅. ``Guidance`` generalises it to several targets with their own
weights (per-condition guidance, as in composable diffusion):

    ε̂ = ε(x_t, c1) + Σ_i ω_i · (ε(x_t, c2_i) − ε(x_t, c1))

With one target this is exactly Eq. 2. Every set is one branch of a single batched forward pass.

Text form (``recompose generate --guidance``):
    "3"                      c1 = ∅, c2 = every given condition, ω = 3 (standard CFG)
    "text=5,sketch=2"        c1 = given conditions not named; two targets: c1 ∪ {caption}, ω = 5,
                             and c1 ∪ {sketch}, ω = 2
    "text+palette=4"         c1 = the others given (e.g. {sketch}), c2 = c1 ∪ {caption, palette}
``text`` is accepted for ``caption``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from models import CONDITIONS

ALIASES = {"text": "caption"}


def _condition(name: str) -> str:
    name = ALIASES.get(name.strip(), name.strip())
    if name not in CONDITIONS:
        raise ValueError(f"guidance: unknown condition {name!r}; known: text, {', '.join(CONDITIONS)}")
    return name


@dataclass(frozen=True)
class Guidance:
    """c1 (``base``) and the targets (c2_i, ω_i); see the module docstring."""

    base: frozenset[str]
    terms: tuple[tuple[frozenset[str], float], ...]

    def __post_init__(self) -> None:
        for name in self.base | {n for s, _ in self.terms for n in s}:
            _condition(name)
        for s, _ in self.terms:
            if not self.base <= s:
                raise ValueError(f"guidance target {sorted(s)} must contain the base set {sorted(self.base)}")

    @staticmethod
    def standard(conditions: Iterable[str], scale: float) -> Guidance:
        """Standard CFG: c1 = ∅, c2 = ``conditions``."""
        return Guidance(frozenset(), ((frozenset(conditions), float(scale)),))

    @staticmethod
    def parse(spec: str | float, given: Iterable[str]) -> Guidance:
        """The text form (module docstring) for the conditions ``given``."""
        given = frozenset(_condition(n) for n in given)
        text = str(spec).strip()
        if "=" not in text:
            try:
                w = float(text)
            except ValueError:
                raise ValueError(
                    f"guidance {text!r}: expected a number or NAME[+NAME...]=WEIGHT,..."
                ) from None
            if not math.isfinite(w):
                raise ValueError(f"guidance {text!r}: the weight must be a finite number")
            return Guidance.standard(given, w)
        parts = []
        for item in text.split(","):
            names, _, weight = item.partition("=")
            try:
                w = float(weight)
            except ValueError:
                raise ValueError(f"guidance {item!r}: the weight {weight!r} is not a number") from None
            if not math.isfinite(w):
                raise ValueError(f"guidance {item!r}: the weight must be a finite number")
            chosen = frozenset(_condition(n) for n in names.split("+"))
            missing = chosen - given
            if missing:
                raise ValueError(
                    f"guidance names {sorted(missing)}, which is not given (given: {sorted(given)})"
                )
            parts.append((chosen, w))
        named = frozenset().union(*(s for s, _ in parts))
        base = given - named
        return Guidance(base, tuple((base | s, w) for s, w in parts))

    def sets(self) -> list[frozenset[str]]:
        """The condition set of each batched branch: c1 first, then the targets.

        One target with ω = 1 needs no c1 branch (ε̂ = ε(c2)); targets equal to c1 (or none)
        mean ε̂ = ε(c1), one branch.
        """
        if len(self.terms) == 1 and self.terms[0][1] == 1.0:
            return [self.terms[0][0]]
        if all(s == self.base for s, _ in self.terms):  # e.g. no conditions at all: c2 = c1
            return [self.base]
        return [self.base] + [s for s, _ in self.terms]

    def combine(self, eps: torch.Tensor) -> torch.Tensor:
        """eps (K·B, ...) from the branches of ``sets()`` in order -> guided ε̂ (B, ...)."""
        sets = self.sets()
        if len(sets) == 1:
            return eps
        chunks = eps.chunk(len(sets))
        base, targets = chunks[0], chunks[1:]
        out = base
        for (_, w), e in zip(self.terms, targets, strict=True):
            out = out + w * (e - base)
        return out

    def presence(self, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """(K·B, 8) bool presence rows: branch k's set repeated for the B samples."""
        rows = [[name in s for name in CONDITIONS] for s in self.sets()]
        p = torch.tensor(rows, dtype=torch.bool, device=device)
        return p.repeat_interleave(batch, dim=0)

    def describe(self) -> dict:
        return {
            "c1": sorted(self.base),
            "targets": [{"c2": sorted(s), "weight": w} for s, w in self.terms],
            "branches": len(self.sets()),
        }
