"""Random model inputs shared by the ``models/`` tests."""

from __future__ import annotations

import itertools

import torch

from models import CONDITIONS, Conditions

# The fields of ``Conditions`` that carry each condition for the default (trainable-encoder) model.
FIELDS: dict[str, tuple[str, ...]] = {
    "caption": ("text_ids",),
    "semantics": ("semantics_image",),
    "palette": ("palette",),
    "sketch": ("sketch",),
    "instances": ("instances",),
    "depth": ("depth",),
    "intensity": ("intensity",),
    "mask": ("mask", "masked_image"),
}
assert tuple(FIELDS) == CONDITIONS


def all_patterns() -> torch.Tensor:
    """(256, 8) bool: every presence pattern once, columns in ``CONDITIONS`` order."""
    return torch.tensor(list(itertools.product([False, True], repeat=len(CONDITIONS))), dtype=torch.bool)


def rows(conditions: Conditions, index: torch.Tensor | slice) -> Conditions:
    return conditions.map(lambda v: v[index])


def replace(conditions: Conditions, **fields: torch.Tensor | None) -> Conditions:
    values = conditions.fields()
    values.update(fields)
    return Conditions(**{k: v for k, v in values.items() if v is not None})
