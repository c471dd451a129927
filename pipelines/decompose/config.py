"""The decomposition job's configuration: the extraction settings plus where to read and write."""

from __future__ import annotations

import os

from pydantic import Field, model_validator

from pipelines.conditions import EXTRACTED_NAMES, REGISTRY, get_extractor
from pipelines.config import hash_data, resource, to_dict
from pipelines.data.decomposer import ExtractionSettings
from pipelines.data.sources import Format


class DecomposeConfig(ExtractionSettings):
    input: str = ""  # folder, .tar/.parquet file, or a folder of tars/parquet files
    # The output directory (shards/, errors.parquet, manifest.json). Where the output goes does
    # not change what is written, so it stays out of the config hash (like a resource).
    output: str = resource("")
    format: Format = "auto"  # auto: tars → webdataset, parquet with an image column → parquet, else folder
    conditions: tuple[str, ...] = ()  # empty: every extracted condition this config can run
    shard_size: int = Field(1000, ge=1)  # inputs per output shard: the unit of resumption
    captions: str | None = None  # CSV/Parquet of key → caption for folder inputs
    image_column: str | None = None  # parquet: the encoded-image column (auto-detected if unset)
    caption_column: str | None = None  # parquet: the caption column (auto-detected if unset)
    write_webdataset: bool = False  # also write shards/<name>.tar (webdataset) next to each parquet
    read_num_cpus: float = resource(0.5, gt=0)  # CPUs per read task
    progress: bool = resource(True)  # progress bar on stderr (the log lines follow --quiet/--verbose)
    data_stats: bool = resource(False)  # print Ray Data's per-operator timing at the end (tuning)

    @model_validator(mode="after")
    def _check(self) -> DecomposeConfig:
        for name in self.conditions:
            get_extractor(name)  # unknown names raise, listing the valid ones
            if not REGISTRY[name].extracted:
                raise ValueError(
                    f"condition {name!r} is not extracted: it is generated at training and inference time "
                    "(pipelines/conditions/mask.py); extracted conditions: " + ", ".join(EXTRACTED_NAMES)
                )
        return self

    def base_hash(self, kind: str) -> str:
        """Hash of everything that decides the rows and the stored image (not the conditions)."""
        d = to_dict(self, outputs_only=True)
        keep = {
            k: d[k]
            for k in ("shard_size", "resolution", "captions", "image_column", "caption_column", "decode")
        }
        keep.update(input=os.path.abspath(self.input), format=kind)
        return hash_data(keep)
