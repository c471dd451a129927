"""The decomposition job's configuration: the extraction settings plus where to read and write.

``base`` (``--base``) names a pretrained Stable Diffusion–family pipeline. With it the job also
stores ``latents`` (its VAE's encoding) and, unless ``caption.encoders`` is set explicitly, the
caption as its text encoder's embeddings: ``caption.encoders`` becomes ``[base]``, or
``[clip, base]`` when ``caption.clip_model`` is set (CLIP embeddings are stored whenever their
weights are given, as without a base). The base reaches those two extractors through their
sections' ``base`` key, which this config fills in and which is never set on its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field, model_validator

from pipelines.conditions import EXTRACTED_NAMES, EXTRAS, STORED_NAMES, get_extractor
from pipelines.conditions.latents import NO_BASE, LatentsConfig
from pipelines.config import added, hash_data, resource, to_dict
from pipelines.data.decomposer import ExtractionSettings
from pipelines.data.sources import Format


class DecomposeConfig(ExtractionSettings):
    input: str = ""  # folder, .tar/.parquet file, or a folder of tars/parquet files
    # The output directory (shards/, errors.parquet, manifest.json). Where the output goes does
    # not change what is written, so it stays out of the config hash (like a resource).
    output: str = resource("")
    format: Format = "auto"  # auto: tars → webdataset, parquet with an image column → parquet, else folder
    conditions: tuple[str, ...] = ()  # empty: every extracted condition this config can run
    # A diffusers SD 1.x/2.x pipeline (directory or cached repo id): adds `latents` and the
    # caption's `base` embeddings, what a model on that base trains on (see the module docstring)
    base: str | None = added(None)
    latents: LatentsConfig = added(LatentsConfig())  # the base's VAE encoding (needs `base`)
    shard_size: int = Field(1000, ge=1)  # inputs per output shard: the unit of resumption
    captions: str | None = None  # CSV/Parquet of key → caption for folder inputs
    image_column: str | None = None  # parquet: the encoded-image column (auto-detected if unset)
    caption_column: str | None = None  # parquet: the caption column (auto-detected if unset)
    write_webdataset: bool = False  # also write shards/<name>.tar (webdataset) next to each parquet
    # Unused: reading runs inside the process tasks (decode.num_cpus); kept so that configs
    # written for earlier versions still load
    read_num_cpus: float = resource(0.5, gt=0)
    # Run the extractors that need no model inside the decode tasks (one hop for all the CPU
    # work); false: one actor stage each, as for models (slower; the outputs are the same)
    inline_extractors: bool = resource(True)
    # When no extractor runs a model: each task computes a whole shard and writes its data files
    # where its rows are (the driver writes only the state file), if a shard's rows take at most
    # write_in_tasks_max_mb in memory; false: the rows go to the driver, which writes every file
    # (the outputs are the same)
    write_in_tasks: bool = resource(True)
    write_in_tasks_max_mb: int = resource(1024, ge=1)
    # With write_in_tasks and no model extractor: the driver computes and writes the first shard
    # itself while Ray starts (ray.init, Ray Data's executor, the workers' boot), so the first
    # rows are processed seconds sooner; the other shards go to Ray (the outputs are the same)
    driver_first_shard: bool = resource(True)
    progress: bool = resource(True)  # progress bar on stderr (the log lines follow --quiet/--verbose)
    data_stats: bool = resource(False)  # print Ray Data's per-operator timing at the end (tuning)

    @model_validator(mode="before")
    @classmethod
    def _apply_base(cls, data: Any) -> Any:
        """Hand ``base`` to the sections that use it; with a base, default the caption encoders."""
        if not isinstance(data, Mapping):
            return data
        out, base = dict(data), data.get("base")
        for name in ("caption", "latents"):
            section = out.get(name, {})
            if isinstance(section, BaseModel):
                section = section.model_dump(exclude_unset=True)
            if not isinstance(section, Mapping):
                continue  # pydantic names the bad value
            section = dict(section)
            if section.get("base") is not None and section["base"] != base:
                raise ValueError(f"{name}.base is filled in from base (--base); set only base")
            if base is not None:
                section["base"] = base
                if name == "caption" and "encoders" not in section:
                    section["encoders"] = ["clip", "base"] if section.get("clip_model") else ["base"]
            out[name] = section
        return out

    @model_validator(mode="after")
    def _check(self) -> DecomposeConfig:
        for name in self.conditions:
            cls = get_extractor(name)  # unknown names raise, listing the valid ones
            if not cls.extracted:
                raise ValueError(
                    f"condition {name!r} is not extracted: it is generated at training and inference time "
                    "(pipelines/conditions/mask.py); extracted representations: " + ", ".join(STORED_NAMES)
                )
            if name in EXTRAS and self.base is None:
                raise ValueError(f"conditions: {NO_BASE}")
        return self

    def wanted(self) -> tuple[str, ...]:
        """The representations to extract: ``conditions`` (empty: every extracted condition), plus
        ``latents`` whenever a base is given."""
        names = self.conditions or EXTRACTED_NAMES
        if self.base is not None and "latents" not in names:
            names = (*names, "latents")
        return names

    def base_hash(self, kind: str) -> str:
        """Hash of everything that decides the rows and the stored image (not the conditions)."""
        d = to_dict(self, outputs_only=True)
        keep = {
            k: d[k]
            for k in ("shard_size", "resolution", "captions", "image_column", "caption_column", "decode")
        }
        keep.update(input=os.path.abspath(self.input), format=kind)
        return hash_data(keep)
