"""What a decomposition run has to do: its extractors, the output's saved state, the shards to compute.

The output directory's state folder ``.recompose/`` is the job's memory between runs::

    job.json            {"base_hash", "input"}: which input and decode settings the output holds
    lock                held (flock) by the run writing the directory
    state/<shard>.json  a committed shard: its inputs' digest, row and error counts, the sha256
                        of the shard (and of its .tar and error records), and the extractor
                        fingerprints it was computed with. A shard whose files do not match
                        their sha256 (a kill between two of its writes) counts as not done.
    errors/<shard>.parquet  that shard's error records (merged into errors.parquet)
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.conditions import STORED_NAMES, Extractor, get_extractor
from pipelines.conditions.backbone import load_base
from pipelines.config import ConfigError
from pipelines.data import shards as S
from pipelines.data.sources import WorkUnit, plan
from pipelines.decompose.config import DecomposeConfig

STATE_DIR = ".recompose"

log = logging.getLogger(__name__)


def build_extractors(cfg: DecomposeConfig, has_gt: bool) -> tuple[dict[str, Extractor], dict[str, str]]:
    """The extractors this run uses, and the reasons of the ones it cannot run."""
    wanted = cfg.wanted()
    chosen: dict[str, Extractor] = {}
    unavailable: dict[str, str] = {}
    for name in STORED_NAMES:
        if name not in wanted:
            continue
        ext = get_extractor(name)(getattr(cfg, name), cfg.resolution, has_gt)
        reason = ext.unavailable_reason()
        if reason:
            if name == "latents":  # what --base is for: never skipped
                raise ConfigError(f"latents cannot be extracted: {reason}")
            if cfg.conditions:
                raise ConfigError(f"condition {name!r} was requested but is unavailable: {reason}")
            unavailable[name] = reason
        else:
            chosen[name] = ext
    if cfg.base is not None and "caption" in chosen and "base" not in cfg.caption.encoders:
        log.info(
            f"caption.encoders {list(cfg.caption.encoders)} is set explicitly and lacks base: the "
            "caption is not stored as the base's text-encoder embeddings"
        )
    if not chosen:
        raise ConfigError(
            "no condition can be extracted with this config: "
            + "; ".join(f"{k}: {v}" for k, v in unavailable.items())
        )
    return chosen, unavailable


@dataclass
class Pending:
    """A shard this run writes."""

    unit: WorkUnit
    todo: tuple[str, ...]  # conditions to compute (empty: only drop removed ones)
    fresh: bool  # no usable previous shard: compute everything


class JobPlan:
    """Everything decided before the first shard is computed: inputs cut into units, extractors,
    the shard schema and the base hash (what decides the rows and the stored image)."""

    def __init__(self, cfg: DecomposeConfig):
        if not cfg.input or not cfg.output:
            raise ConfigError("both input and output are required")
        self.cfg = cfg
        self.out = Path(cfg.output)
        self.state = self.out / STATE_DIR
        self.plan = plan(cfg.input, cfg.format, cfg.shard_size, cfg.captions, cfg.image_column)
        self.extractors, self.unavailable = build_extractors(cfg, self.plan.has_ground_truth)
        self.fingerprints = {n: e.fingerprint() for n, e in self.extractors.items()}
        self.specs = {n: e.columns() for n, e in self.extractors.items()}
        self.schema = S.shard_schema(cfg.resolution, self.specs, self.fingerprints)
        self.base = cfg.base_hash(self.plan.kind)
        self._verified: dict[tuple, bool] = {}  # (file, size, mtime, sha256) -> it matches

    def identity(self) -> dict[str, str]:
        """``job.json``: an output directory holds the decomposition of one input and base hash
        (input first: a refusal names the first key that differs)."""
        return {"input": os.path.abspath(self.cfg.input), "base_hash": self.base}

    def unit_state(self, unit: WorkUnit) -> dict[str, Any] | None:
        """The committed state of ``unit``'s shard, or None when it must be computed from scratch."""
        p = self.state / "state" / f"{unit.shard}.json"
        if not p.is_file():
            return None
        st = json.loads(p.read_text())
        if st.get("unit") != unit.digest() or not (self.out / st["path"]).is_file():
            return None
        if "inputs_digest" in st and st["inputs_digest"] != unit.content_digest():
            return None  # a file was replaced under the same name (states before this lack it)
        recorded = [(self.out / st["path"], st["sha256"])]
        if st.get("errors_sha256"):  # states written before these were recorded lack them
            recorded.append((self.state / "errors" / f"{unit.shard}.parquet", st["errors_sha256"]))
        if st.get("tar_sha256"):
            recorded.append((self.out / Path(st["path"]).with_suffix(".tar"), st["tar_sha256"]))
        if not all(self._matches(path, digest) for path, digest in recorded):
            return None  # written after this state (a kill mid-commit) or changed by hand: redo
        return st

    def remember(self, path: Path, sha256: str) -> None:
        """``path`` was just written with this sha256 (by this run): no need to hash it again."""
        info = path.stat()
        self._verified[(str(path), info.st_size, info.st_mtime_ns, sha256)] = True

    def _matches(self, path: Path, sha256: str) -> bool:
        """``path`` exists with this sha256 (each file hashed once per run unless it changes)."""
        from pipelines.files import sha256_file

        try:
            info = path.stat()
        except OSError:
            return False
        key = (str(path), info.st_size, info.st_mtime_ns, sha256)
        if key not in self._verified:
            self._verified[key] = sha256_file(path) == sha256
        return self._verified[key]

    def check_base(self, work: list[Pending]) -> None:
        """Load the parts of ``--base`` that ``work`` uses once, here: a base that cannot be
        loaded is one clear error before any Ray work, not an actor failing in each stage."""
        if self.cfg.base is None:
            return
        todo = {n for p in work for n in p.todo}
        parts = ("vae",) if "latents" in todo else ()
        if "caption" in todo and "base" in self.cfg.caption.encoders:
            parts += ("text_encoder", "tokenizer")
        if parts:
            load_base(self.cfg.base, parts)

    def pending(self) -> list[Pending]:
        """The shards that are missing or were computed with other extractor fingerprints."""
        todo_all = tuple(self.extractors)
        out = []
        for unit in self.plan.units:
            st = self.unit_state(unit)
            if st is None:
                out.append(Pending(unit, todo_all, True))
                continue
            old = st["fingerprints"]
            if old == self.fingerprints:
                continue
            todo = tuple(n for n in todo_all if old.get(n) != self.fingerprints[n])
            removed = set(old) - set(self.fingerprints)
            # A row that failed in a recomputed or removed extractor has no stored columns to
            # merge with, so such a shard is recomputed whole.
            fresh = bool(set(st["error_stages"]) & (set(todo) | removed))
            out.append(Pending(unit, todo_all if fresh else todo, fresh))
        return out
