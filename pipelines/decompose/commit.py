"""Committing one shard: its computed rows (or its stored shard, for an update) → the final files.

A shard is committed in this order, each file atomically: ``shards/<name>.parquet`` (and
``.tar``), ``.recompose/errors/<name>.parquet``, then ``.recompose/state/<name>.json``. The state
file is written last and records every other file's sha256, so a shard counts as done only once
everything it describes is on disk as it describes it: a kill between two of these writes (in a
fresh run or one that adds a condition) leaves files that do not match the state, and the rerun
computes that shard again.
Rows are sorted by input index, so a shard's bytes do not depend on the order Ray delivered them.

The data files (``write_files``) need only a ``ShardTarget``, small enough to send to the Ray
task that computed the rows, which writes them where the rows are (execute.py); the state file
(``commit_state``) is always written by the driver, which alone decides what counts as done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import files
from pipelines.conditions.base import Batch, ColumnSpec
from pipelines.data import shards as S
from pipelines.data.sources import WorkUnit
from pipelines.decompose.plan import JobPlan, Pending

Errors = dict[str, list[Any]]  # columns of shards.ERRORS_SCHEMA

# The seam the kill tests use: called as write_hook(file, shard) after each file of a commit is
# written ("shard", "tar", "errors", "state"), and by manifest.py after "errors.parquet" and "manifest".
write_hook: Callable[[str, str], None] | None = None


def wrote(what: str, shard: str) -> None:
    if write_hook is not None:
        write_hook(what, shard)


def empty_errors() -> Errors:
    return {f.name: [] for f in S.ERRORS_SCHEMA}


@dataclass(frozen=True)
class ShardTarget:
    """What writing a shard's data files needs: where, in which schema, at which resolution."""

    out: Path
    state: Path
    schema: pa.Schema
    specs: dict[str, Sequence[ColumnSpec]]
    resolution: int
    write_webdataset: bool

    @classmethod
    def of(cls, job: JobPlan) -> ShardTarget:
        cfg = job.cfg
        return cls(job.out, job.state, job.schema, job.specs, cfg.resolution, cfg.write_webdataset)


class Written(TypedDict):
    """A shard's data files as written: what its state file records about them."""

    rows: int
    errors: int
    error_stages: list[str]
    sha256: str
    errors_sha256: str
    tar_sha256: str | None


def write_files(t: ShardTarget, p: Pending, old: dict[str, Any] | None, parts: list[Batch]) -> Written:
    """``p``'s data files (shard, tar, errors) from its computed rows ``parts`` (batches of the
    stream, together every input's row once; none: only drop removed conditions). ``old``: the
    state of the stored shard an update merges with (``JobPlan.unit_state``; None when fresh)."""
    n = len(p.unit.members)
    rows = _computed_rows(parts, p.unit.shard, n)
    new_errors = _errors_from(rows, p.unit) if rows else empty_errors()
    if p.fresh:
        errors = new_errors
        good = _good(n, errors)
        data = _arrays(t, rows, good, p.todo)
        data.update({c: np.asarray(rows[c], object)[good] for c in ("key", "source", "text")})
    else:
        errors, good, data = _merge(t, p, old, rows, new_errors, reread=bool(parts))
    return _write(t, p.unit, errors, good, data)


def _computed_rows(parts: list[Batch], shard: str, n: int) -> dict[str, np.ndarray]:
    """The computed rows as one batch in input order 0..n-1 (empty without parts): one copy of
    each column, read in place from the object store."""
    if not parts:
        return {}
    parts = sorted(parts, key=lambda b: int(b["index"][0]))
    index = np.concatenate([b["index"] for b in parts])
    order = None if (index[1:] > index[:-1]).all() else np.argsort(index, kind="stable")
    if order is not None:
        index = index[order]
    if not np.array_equal(index, np.arange(n)):
        raise RuntimeError(f"shard {shard}: computed rows do not cover inputs 0..{n - 1}")
    rows = {}
    for c in parts[0]:
        whole = np.concatenate([b[c] for b in parts]) if len(parts) > 1 else parts[0][c]
        rows[c] = whole if order is None else whole[order]
    return rows


def _good(n: int, errors: Errors) -> list[int]:
    bad = set(errors["index"])
    return [i for i in range(n) if i not in bad]


def _merge(
    t: ShardTarget,
    p: Pending,
    old_state: dict[str, Any] | None,
    rows: dict[str, Any],
    new_errors: Errors,
    reread: bool,
) -> tuple[Errors, list[int], dict[str, np.ndarray]]:
    """The stored shard with ``p.todo``'s columns replaced by the computed ones; its errors merged."""
    unit, n = p.unit, len(p.unit.members)
    old_err = pq.read_table(t.state / "errors" / f"{unit.shard}.parquet").to_pydict()
    # Re-read rows bring their read/decode errors again; keep the old ones only without parts.
    again = ("read", "decode") if reread else ()
    keep = [i for i, s in enumerate(old_err["stage"]) if s not in p.todo and s not in again]
    errors = {k: [old_err[k][i] for i in keep] + list(new_errors[k]) for k in new_errors}
    order = sorted(range(len(errors["index"])), key=lambda i: errors["index"][i])
    errors = {k: [v[i] for i in order] for k, v in errors.items()}
    good = _good(n, errors)
    pos = {idx: j for j, idx in enumerate(_good(n, old_err))}
    if not set(good) <= set(pos) or old_state is None:
        raise RuntimeError(f"shard {unit.shard}: cannot merge an update; delete its state to recompute")
    old = S.read_shard(t.out / old_state["path"])
    sel = [pos[i] for i in good]
    data = {k: v[sel] for k, v in old.items()}
    data.update(_arrays(t, rows, good, p.todo))
    return errors, good, data


def _arrays(
    t: ShardTarget, rows: dict[str, Any], good: list[int], todo: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """The image and ``todo``'s columns of the ``good`` rows, checked against their declared types."""
    out: dict[str, np.ndarray] = {}
    if not rows:
        return out
    r = t.resolution
    pick = None if len(good) == len(rows["index"]) else np.asarray(good, np.int64)

    def column(name: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        a = rows[name]
        if a.dtype != np.dtype(dtype) or a.shape[1:] != tuple(shape):
            raise RuntimeError(f"{name}: computed {a.dtype} {a.shape[1:]}, declared {dtype} {tuple(shape)}")
        return a if pick is None else a[pick]

    out["image"] = column("image", np.uint8, (r, r, 3))
    for name in todo:
        for spec in t.specs[name]:
            out[spec.name] = column(spec.name, spec.dtype, spec.shape)
    return out


def _errors_from(rows: dict[str, Any], unit: WorkUnit) -> Errors:
    """The error records of the computed rows that failed in some stage."""
    stage = [str(s) for s in rows["err_stage"]]
    bad = [i for i, s in enumerate(stage) if s]
    pick = {c: [str(v) for v in rows[c]] for c in ("key", "source", "err_type", "err_msg")}
    return {
        "key": [pick["key"][i] for i in bad],
        "source": [pick["source"][i] for i in bad],
        "stage": [stage[i] for i in bad],
        "error_type": [pick["err_type"][i] for i in bad],
        "message": [pick["err_msg"][i] for i in bad],
        "shard": [unit.shard] * len(bad),
        "index": bad,
    }


def _write(
    t: ShardTarget, unit: WorkUnit, errors: Errors, good: list[int], data: dict[str, np.ndarray]
) -> Written:
    table = S.build_table(t.schema, data)
    path = t.out / "shards" / f"{unit.shard}.parquet"
    S.write_parquet(table, path)
    wrote("shard", unit.shard)
    tar = path.with_suffix(".tar")
    if t.write_webdataset:
        from pipelines.data.webdataset_out import write_tar

        write_tar(table, tar)
        wrote("tar", unit.shard)
    errors_path = t.state / "errors" / f"{unit.shard}.parquet"
    S.write_parquet(S.errors_table(errors), errors_path)
    wrote("errors", unit.shard)
    return {
        "rows": len(good),
        "errors": len(errors["index"]),
        "error_stages": sorted(set(errors["stage"])),
        "sha256": files.sha256_file(path),
        "errors_sha256": files.sha256_file(errors_path),
        "tar_sha256": files.sha256_file(tar) if t.write_webdataset else None,
    }


def commit_state(job: JobPlan, unit: WorkUnit, written: Written) -> None:
    """The state file of ``unit``'s shard, whose data files are ``written``: the commit itself."""
    shard = job.out / "shards" / f"{unit.shard}.parquet"
    recorded = (
        (shard, written["sha256"]),
        (job.state / "errors" / f"{unit.shard}.parquet", written["errors_sha256"]),
        (shard.with_suffix(".tar"), written["tar_sha256"]),
    )
    for file, digest in recorded:
        if digest:
            job.remember(file, digest)
    state = {
        "unit": unit.digest(),
        "inputs_digest": unit.content_digest(),
        "path": f"shards/{unit.shard}.parquet",
        "inputs": len(unit.members),
        "rows": written["rows"],
        "errors": written["errors"],
        "error_stages": written["error_stages"],
        "sha256": written["sha256"],
        "errors_sha256": written["errors_sha256"],
        "tar_sha256": written["tar_sha256"],
        "fingerprints": job.fingerprints,
    }
    files.write_json(state, job.state / "state" / f"{unit.shard}.json")
    wrote("state", unit.shard)
