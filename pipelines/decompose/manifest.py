"""The decomposition's top-level outputs, once every shard is committed.

``manifest.json`` (what readers check: formats, resolution, hashes, extractors, the settings that
made the shards, every shard with its sha256, totals), ``errors.parquet`` (every shard's error
records) and ``preview.png``. A rerun that changed nothing leaves all three untouched.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import files
from pipelines.config import config_hash, to_dict
from pipelines.data import shards as S
from pipelines.decompose.commit import empty_errors, wrote
from pipelines.decompose.plan import JobPlan


@dataclass
class Outputs:
    """Where the outputs are and what the manifest's totals say."""

    manifest: str
    preview: str | None
    inputs: int
    rows: int
    errors: int
    skipped_upstream: dict[str, int]  # upstream failures (img2dataset status), by status
    errors_by_stage: dict[str, int]


def write_outputs(job: JobPlan, changed: bool) -> Outputs:
    """errors.parquet, manifest.json, preview.png; ``changed``: this run rewrote some shard."""
    entries = _entries(job)
    totals = {
        "inputs": sum(e["inputs"] for e in entries),
        "rows": sum(e["rows"] for e in entries),
        "errors": sum(e["errors"] for e in entries),
        "skipped_upstream": job.plan.skipped,
    }
    assert totals["inputs"] == totals["rows"] + totals["errors"]
    manifest = _manifest(job, entries, totals)
    path = job.out / "manifest.json"
    preview = job.out / "preview.png" if totals["rows"] else None
    previous = _unchanged(job, manifest, preview) if not changed else None
    if previous is not None:
        manifest = previous  # a rerun of a finished job: the outputs on disk already say exactly this
    else:
        manifest["errors_by_stage"] = _write_errors(job)
        wrote("errors.parquet", "")
        files.write_json(manifest, path)
        wrote("manifest", "")
        if preview is not None:
            from pipelines.data.preview import write_preview

            first = next(e for e in entries if e["rows"])
            write_preview(job.out / first["path"], preview)
    return Outputs(
        manifest=str(path),
        preview=str(preview) if preview else None,
        **totals,
        errors_by_stage=manifest["errors_by_stage"],
    )


def _entries(job: JobPlan) -> list[dict[str, Any]]:
    """The manifest's shard list, from the committed states (every shard must be complete)."""
    entries = []
    for unit in job.plan.units:
        st = job.unit_state(unit)
        if st is None or st["fingerprints"] != job.fingerprints:
            raise RuntimeError(f"shard {unit.shard} is not complete; rerun to resume")
        entries.append({k: st[k] for k in ("path", "inputs", "rows", "errors", "sha256")})
    return entries


def _manifest(job: JobPlan, entries: list[dict[str, Any]], totals: dict[str, Any]) -> dict[str, Any]:
    cfg = job.cfg
    return {
        "format": S.MANIFEST_FORMAT,
        "shard_format": S.SHARD_FORMAT,
        "input_format": job.plan.kind,
        "resolution": cfg.resolution,
        "config_hash": config_hash(cfg),
        "base_hash": job.base,
        "extractors": {n: e.describe() for n, e in job.extractors.items()},
        # What inference needs to decompose a user's image as this job did (model_index.json
        # of a trained pipeline, pipelines/data/decomposer.py); output-affecting settings only.
        "settings": {n: to_dict(getattr(cfg, n), outputs_only=True) for n in ("decode", *job.extractors)},
        "unavailable": job.unavailable,
        "shards": entries,
        "totals": totals,
    }


def _unchanged(job: JobPlan, manifest: dict[str, Any], preview: Path | None) -> dict[str, Any] | None:
    """The manifest on disk if it and the other outputs already say exactly ``manifest``, else None."""
    path = job.out / "manifest.json"
    if not path.is_file() or not (job.out / "errors.parquet").is_file():
        return None
    if preview is not None and not preview.is_file():
        return None
    previous = json.loads(path.read_text())
    same = {k: v for k, v in previous.items() if k != "errors_by_stage"} == json.loads(json.dumps(manifest))
    return previous if same else None


def _write_errors(job: JobPlan) -> dict[str, int]:
    """errors.parquet from every shard's error records; returns the error count by stage."""
    tables = [pq.read_table(job.state / "errors" / f"{u.shard}.parquet") for u in job.plan.units]
    errors = pa.concat_tables(tables) if tables else S.errors_table(empty_errors())
    S.write_parquet(errors, job.out / "errors.parquet")
    return dict(sorted(Counter(errors.column("stage").to_pylist()).items()))
