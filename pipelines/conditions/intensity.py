"""``intensity``: the grayscale (luma) image, Composer §3.1.

Training later mixes the RGB channels with random weights (as the paper does) from the stored
image; what is stored here is the standard ITU-R BT.601 luma.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.conditions.base import Batch, ColumnSpec, Extractor, ExtractorConfig
from pipelines.config import resource

# ITU-R BT.601 luma weights, the same as PIL's convert("L").
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class IntensityConfig(ExtractorConfig):
    batch_size: int = resource(256)  # pure numpy: big batches cost nothing


class IntensityExtractor(Extractor):
    name = "intensity"
    version = "1"
    config_cls = IntensityConfig

    def columns(self) -> list[ColumnSpec]:
        r = self.resolution
        return [ColumnSpec("intensity", "uint8", (r, r), "BT.601 luma, 0 = black")]

    def extract(self, batch: Batch) -> Batch:
        luma = batch["image"].astype(np.float32) @ _LUMA
        return {"intensity": np.clip(np.rint(luma), 0, 255).astype(np.uint8)}
