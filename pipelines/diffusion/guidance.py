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

Guidance schedules: a target may act during part of the denoising only, with a weight that
changes over it (the start/end window of diffusers' multi-ControlNet, per condition set):

    "sketch=2@0:0.6"         weight 2 during the first 60% of the steps, dropped after
    "palette=3@0.2:1,linear" from 20% of the steps to the end, rising linearly from 0 to 3

A window ``@A:B`` is a fraction of the sampling steps, 0 = the first (noisiest) step, 1 = the end;
step i of n is inside when A <= (i + 0.5) / n < B. A shape after the item shapes the weight over
its window (u = 0 at A, 1 at B): ``constant`` (the default), ``linear`` (W·u), ``decay`` (W·(1 − u))
or ``cosine`` (W·(1 − cos πu) / 2). At each step Eq. 2 is computed with the targets inside their
windows at that step's weights; a target outside its window is dropped from that step — its
branch is not evaluated, so a step costs what its own set guidance needs. A window of the whole
run at a constant weight is the plain number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from models import CONDITIONS

ALIASES = {"text": "caption"}
SHAPES = ("constant", "linear", "decay", "cosine")


@dataclass(frozen=True)
class Window:
    """Where a target acts, as fractions of the sampling steps, and how its weight moves there."""

    start: float = 0.0
    end: float = 1.0
    shape: str = "constant"

    def __post_init__(self) -> None:
        if not (0.0 <= self.start <= self.end <= 1.0):
            raise ValueError(f"guidance window {self.start}:{self.end}: need 0 <= start <= end <= 1")
        if self.shape not in SHAPES:
            raise ValueError(f"guidance shape {self.shape!r}: known shapes are {', '.join(SHAPES)}")

    @property
    def whole(self) -> bool:
        """Every step at the full weight: the same as no window."""
        return self.start == 0.0 and self.end == 1.0 and self.shape == "constant"

    def factor(self, step: int, steps: int) -> float | None:
        """The weight's factor at ``step`` of ``steps`` (in sampling order); None outside."""
        p = (step + 0.5) / steps
        if not self.start <= p < self.end:
            return None
        u = (p - self.start) / (self.end - self.start)
        if self.shape == "linear":
            return u
        if self.shape == "decay":
            return 1.0 - u
        if self.shape == "cosine":
            return (1.0 - math.cos(math.pi * u)) / 2.0
        return 1.0

    def describe(self) -> dict:
        return {"window": [self.start, self.end], "shape": self.shape}


def _window(text: str, item: str) -> Window:
    a, sep, b = text.partition(":")
    try:
        if not sep:
            raise ValueError
        start, end = float(a), float(b)
    except ValueError:
        raise ValueError(
            f"guidance {item!r}: the window {text!r} is not START:END, fractions of the steps"
        ) from None
    if not (math.isfinite(start) and math.isfinite(end)):
        raise ValueError(f"guidance {item!r}: the window must be finite")
    try:
        return Window(start, end)
    except ValueError as e:
        raise ValueError(f"guidance {item!r}: {e}") from None


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
    # one per term when any target has a schedule (None: that target acts at every step); () none
    windows: tuple[Window | None, ...] = ()

    def __post_init__(self) -> None:
        for name in self.base | {n for s, _ in self.terms for n in s}:
            _condition(name)
        for s, _ in self.terms:
            if not self.base <= s:
                raise ValueError(f"guidance target {sorted(s)} must contain the base set {sorted(self.base)}")
        if self.windows and len(self.windows) != len(self.terms):
            raise ValueError("guidance: give one window (or None) per target")
        if self.windows and all(w is None or w.whole for w in self.windows):
            object.__setattr__(self, "windows", ())  # whole windows at constant weight: no schedule

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
        parts: list[tuple[frozenset[str], float, Window | None]] = []
        for item in text.split(","):
            item = item.strip()
            if "=" not in item and item in SHAPES:  # "…@0.2:1,linear": the previous item's shape
                if not parts or parts[-1][2] is None:
                    raise ValueError(
                        f"guidance {text!r}: the shape {item!r} follows no NAME=WEIGHT@START:END"
                    )
                chosen, w, window = parts[-1]
                parts[-1] = (chosen, w, Window(window.start, window.end, item))
                continue
            names, _, value = item.partition("=")
            weight, at, span = value.partition("@")
            try:
                w = float(weight)
            except ValueError:
                hint = f"; shapes: {', '.join(SHAPES)}" if not names.strip() or "=" not in item else ""
                raise ValueError(f"guidance {item!r}: the weight {weight!r} is not a number{hint}") from None
            if not math.isfinite(w):
                raise ValueError(f"guidance {item!r}: the weight must be a finite number")
            chosen = frozenset(_condition(n) for n in names.split("+"))
            missing = chosen - given
            if missing:
                raise ValueError(
                    f"guidance names {sorted(missing)}, which is not given (given: {sorted(given)})"
                )
            parts.append((chosen, w, _window(span, item) if at else None))
        named = frozenset().union(*(s for s, _, _ in parts))
        base = given - named
        windows = tuple(win for _, _, win in parts)
        return Guidance(
            base,
            tuple((base | s, w) for s, w, _ in parts),
            windows if any(win is not None for win in windows) else (),
        )

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

    def branch_sets(self) -> list[frozenset[str]]:
        """The condition sets encoded for a whole run: ``sets()``, or with a schedule c1 and every
        target (each step then evaluates the part it needs, ``at``)."""
        if not self.windows:
            return self.sets()
        return list(dict.fromkeys([self.base, *(s for s, _ in self.terms)]))

    def at(self, step: int, steps: int) -> tuple[Guidance, list[int] | None]:
        """Step ``step`` of ``steps`` (sampling order): the guidance that holds then (the targets
        inside their windows, at their weights there) and which of ``branch_sets()`` it
        evaluates, in its ``sets()`` order; (self, None) without a schedule."""
        if not self.windows:
            return self, None
        terms = []
        for (s, w), window in zip(self.terms, self.windows, strict=True):
            f = 1.0 if window is None else window.factor(step, steps)
            if f is not None:
                terms.append((s, w * f))
        now = Guidance(self.base, tuple(terms))
        branches = self.branch_sets()
        return now, [branches.index(s) for s in now.sets()]

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
        """(K·B, 8) bool presence rows: branch k's set (of ``branch_sets()``) repeated for the B samples."""
        rows = [[name in s for name in CONDITIONS] for s in self.branch_sets()]
        p = torch.tensor(rows, dtype=torch.bool, device=device)
        return p.repeat_interleave(batch, dim=0)

    def describe(self) -> dict:
        windows = self.windows or (None,) * len(self.terms)
        return {
            "c1": sorted(self.base),
            "targets": [
                {"c2": sorted(s), "weight": w} | ({} if win is None else win.describe())
                for (s, w), win in zip(self.terms, windows, strict=True)
            ],
            "branches": len(self.sets()) if not self.windows else len(self.branch_sets()),
        }
