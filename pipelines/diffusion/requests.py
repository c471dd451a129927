"""What ``ComposerPipeline.sample_batch`` samples: requests, checked requests, and a batch of them.

    SampleRequest --ComposerPipeline.prepare--> PreparedRequest --(compatible ones)--> Batch

A ``Batch`` is one sampling run: its requests' rows are concatenated request-major (request 0's
samples, then request 1's, …), and each request draws its noise from its own generator, so a
request's samples do not depend on what it was batched with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from pipelines.diffusion.guidance import Guidance


@dataclass
class SampleRequest:
    """One generation request of ``ComposerPipeline.sample_batch`` (``__call__``'s arguments)."""

    conditions: Mapping[str, Any]
    guidance: Guidance | float | str = 3.0
    num_images: int = 1
    seed: int | None = 0
    generator: torch.Generator | None = None
    source: np.ndarray | None = None  # (R, R, 3) uint8
    mask: np.ndarray | None = None  # (R, R) {0, 1}, 1 = regenerate
    invert_conditions: Mapping[str, Any] | None = None
    invert_guidance: Guidance | float | str = 1.0
    # paint-with-words (eDiffi): {phrase of the caption: (R, R) region, nonzero = painted}
    paint: Mapping[str, np.ndarray] | None = None
    paint_weight: float = 1.0
    paint_caption: str | None = None  # the caption the phrases are in; default conditions["text"]


@dataclass
class PreparedRequest:
    """A checked ``SampleRequest``: conditions with the mask keys added, guidance resolved."""

    request: SampleRequest
    conditions: dict[str, Any]
    mask: np.ndarray | None
    guidance: Guidance
    invert_guidance: Guidance | None

    def compatible_key(self) -> tuple:
        """Requests with equal keys can share one batched sampling run."""
        inv = self.request.invert_conditions
        return (
            tuple(sorted(self.conditions)),
            self.guidance,
            self.invert_guidance,
            None if inv is None else tuple(sorted(inv)),
            self.request.source is not None,
            self.mask is not None,
        )


@dataclass
class Batch:
    """Compatible prepared requests sampled together; ``ValueError`` if they are not compatible.

    ``sizes``: each request's number of samples; ``generators``: the one each request draws its
    noise from (its own ``generator``, or a CPU one seeded with its ``seed``).
    """

    prepared: Sequence[PreparedRequest]
    sizes: list[int] = field(init=False)
    generators: list[torch.Generator] = field(init=False)

    def __post_init__(self) -> None:
        kinds = {p.compatible_key() for p in self.prepared}
        if len(kinds) != 1:
            raise ValueError(
                f"sample_batch: the requests are not compatible ({len(kinds)} kinds); group them"
            )
        self.sizes = [p.request.num_images for p in self.prepared]
        self.generators = [
            p.request.generator
            if p.request.generator is not None
            else torch.Generator("cpu").manual_seed(0 if p.request.seed is None else p.request.seed)
            for p in self.prepared
        ]

    @property
    def first(self) -> PreparedRequest:
        """Any request stands for all in what they share (keys, guidance, source and mask or not)."""
        return self.prepared[0]
