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


def random_conditions(
    batch: int, size: int, generator: torch.Generator, caption_length: int = 24, vocab: int = 4096
) -> Conditions:
    """Every field of a trainable-encoder model filled with plausible random values."""
    g = generator
    return Conditions(
        text_ids=torch.randint(1, vocab, (batch, caption_length), generator=g),
        semantics_image=torch.rand(batch, 3, size, size, generator=g) * 2 - 1,
        palette=torch.softmax(torch.randn(batch, 156, generator=g) * 3, dim=1),
        sketch=(torch.rand(batch, 1, size, size, generator=g) > 0.8).float(),
        instances=torch.randint(0, 256, (batch, size, size), generator=g),
        depth=torch.rand(batch, 1, size, size, generator=g),
        intensity=torch.rand(batch, 1, size, size, generator=g),
        mask=(torch.rand(batch, 1, size, size, generator=g) > 0.5).float(),
        masked_image=torch.rand(batch, 3, size, size, generator=g) * 2 - 1,
    )


def all_patterns() -> torch.Tensor:
    """(256, 8) bool: every presence pattern once, columns in ``CONDITIONS`` order."""
    return torch.tensor(list(itertools.product([False, True], repeat=len(CONDITIONS))), dtype=torch.bool)


def rows(conditions: Conditions, index: torch.Tensor | slice) -> Conditions:
    return conditions.map(lambda v: v[index])


def replace(conditions: Conditions, **fields: torch.Tensor | None) -> Conditions:
    values = conditions.fields()
    values.update(fields)
    return Conditions(**{k: v for k, v in values.items() if v is not None})
