"""The eight representations of Composer §3.1 and the one registry of their extractors.

Each extractor declares its name, which is part of the on-disk format (shard column names,
manifest keys); the registry lists them in ``models.CONDITIONS`` order (the model's presence
columns, where the names are defined; ``tests/conditions/test_registry.py`` holds the two equal
without this module importing torch). ``mask`` is generated at training and inference time (see
``pipelines/conditions/mask.py``), never extracted, so the decomposition job refuses it.

``EXTRAS`` registers the representations the decomposition job can store that are not conditions
(no presence column in the model): ``latents``, a pretrained base's VAE encoding of the image,
which a model on that base denoises. ``STORED_NAMES`` is everything the job can extract.
"""

from __future__ import annotations

from pipelines.conditions.base import ColumnSpec, Extractor, ExtractorConfig, ExtractorUnavailable
from pipelines.conditions.caption import CaptionExtractor
from pipelines.conditions.depth import DepthExtractor
from pipelines.conditions.instances import InstancesExtractor
from pipelines.conditions.intensity import IntensityExtractor
from pipelines.conditions.latents import LatentsExtractor
from pipelines.conditions.mask import MaskGenerator
from pipelines.conditions.palette import PaletteExtractor
from pipelines.conditions.semantics import SemanticsExtractor
from pipelines.conditions.sketch import SketchExtractor

REGISTRY: dict[str, type[Extractor]] = {
    cls.name: cls
    for cls in (
        CaptionExtractor,
        SemanticsExtractor,
        PaletteExtractor,
        SketchExtractor,
        InstancesExtractor,
        DepthExtractor,
        IntensityExtractor,
        MaskGenerator,
    )
}
CONDITION_NAMES: tuple[str, ...] = tuple(REGISTRY)
EXTRACTED_NAMES: tuple[str, ...] = tuple(n for n, c in REGISTRY.items() if c.extracted)
EXTRAS: dict[str, type[Extractor]] = {cls.name: cls for cls in (LatentsExtractor,)}
STORED_NAMES: tuple[str, ...] = EXTRACTED_NAMES + tuple(EXTRAS)
# The conditions stored as one (R, R) uint8 map per image; they can also be given as a picture.
MAPS: tuple[str, ...] = ("sketch", "instances", "depth", "intensity")


def get_extractor(name: str) -> type[Extractor]:
    """The extractor class registered under ``name`` (a condition or one of ``EXTRAS``);
    ``ValueError`` lists the valid names."""
    try:
        return REGISTRY[name] if name in REGISTRY else EXTRAS[name]
    except KeyError:
        raise ValueError(
            f"unknown condition {name!r}; known conditions: {', '.join(CONDITION_NAMES)}; "
            f"other representations: {', '.join(EXTRAS)}"
        ) from None


__all__ = [
    "CONDITION_NAMES",
    "EXTRACTED_NAMES",
    "EXTRAS",
    "MAPS",
    "REGISTRY",
    "STORED_NAMES",
    "ColumnSpec",
    "Extractor",
    "ExtractorConfig",
    "ExtractorUnavailable",
    "get_extractor",
]
