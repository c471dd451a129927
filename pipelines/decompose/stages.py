"""Ray Data UDFs of the decomposition job, in their own module so Ray pickles little.

read (flat_map over work units) → decode (tasks) → one actor stage per extractor → write parts.
Every row carries ``err_stage/err_type/err_msg``; a row that failed somewhere flows on untouched
and is recorded at the end, so inputs = rows + errors always.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.conditions import ExtractorConfig, get_extractor
from pipelines.data.shards import binary_array, write_parquet
from pipelines.data.sources import WorkUnit, error_message, read_unit

EXTRACTOR_INPUTS = ("image", "text", "gt_instances", "gt_depth", "has_gt")  # GT only for the synthetic set


def unfused() -> dict[str, Any]:
    """A ``ray_remote_args_fn`` that changes nothing but keeps Ray Data from fusing this stage.

    Ray Data fuses a task stage into the actor stage after it; for decode that would run all
    decoding inside the (often single) actor of the first extractor, on one core.
    """
    return {}


def read_rows(
    item: dict[str, Any], root: str, image_column: str | None, caption_column: str | None, max_bytes: int
) -> list[dict[str, Any]]:
    unit = WorkUnit.from_json(item["unit"])
    rows = read_unit(unit, root, image_column, caption_column, max_bytes)
    for r in rows:
        r["todo"] = item["todo"]
    return rows


class ExtractorStage:
    """Runs one extractor on the rows that still need it; isolates rows that make it fail."""

    def __init__(self, name: str, config: ExtractorConfig, resolution: int, has_ground_truth: bool):
        self.extractor = get_extractor(name)(config, resolution, has_ground_truth)
        # Load weights now: a broken model directory fails the stage loudly instead of turning
        # every row into an error record.
        self.extractor.prepare()
        self.specs = self.extractor.columns()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        name = self.extractor.name
        n = len(batch["key"])
        out = {s.name: np.zeros((n, *s.shape), s.dtype) for s in self.specs}
        stage, etype, emsg = (np.array(batch[c], dtype=object) for c in ("err_stage", "err_type", "err_msg"))
        todo = np.array([name in str(t).split(",") for t in batch["todo"]], bool)
        idx = np.flatnonzero(todo & (stage == ""))
        if idx.size:
            try:
                self._place(
                    out, idx, self.extractor({k: batch[k][idx] for k in EXTRACTOR_INPUTS if k in batch})
                )
            except Exception:  # noqa: BLE001 - retry row by row to find and record the bad ones
                for i in idx:
                    try:
                        self._place(
                            out,
                            np.array([i]),
                            self.extractor({k: batch[k][i : i + 1] for k in EXTRACTOR_INPUTS if k in batch}),
                        )
                    except Exception as e:  # noqa: BLE001
                        stage[i], etype[i], emsg[i] = name, type(e).__name__, error_message(e)
        batch = dict(batch)
        batch.update(out, err_stage=stage, err_type=etype, err_msg=emsg)
        return batch

    @staticmethod
    def _place(out: dict[str, np.ndarray], idx: np.ndarray, res: dict[str, np.ndarray]) -> None:
        for k in out:
            out[k][idx] = res[k]


def write_parts(batch: dict[str, np.ndarray], staging: str, columns: list[str]) -> dict[str, np.ndarray]:
    """Write the batch's rows to per-shard part files; return one summary row per part."""
    shards = np.asarray(batch["shard"], dtype=object)
    names, rows = [], []
    for shard in sorted(set(shards.tolist())):
        sel = np.flatnonzero(shards == shard)
        index = np.asarray(batch["index"])[sel]
        cols: dict[str, pa.Array] = {
            "index": pa.array(index.astype(np.int64)),
            **{
                c: pa.array([str(v) for v in np.asarray(batch[c], object)[sel]])
                for c in ("key", "source", "text", "err_stage", "err_type", "err_msg")
            },
        }
        for c in ["image", *columns]:
            cols[c] = binary_array(np.asarray(batch[c])[sel])
        path = Path(staging) / shard / f"part-{int(index.min()):08d}-{int(index.max()):08d}.parquet"
        write_parquet(pa.table(cols), path, compression="none")  # temporary: compressing costs ~5 ms/row
        names.append(shard)
        rows.append(len(sel))
    return {"shard": np.array(names, dtype=object), "rows": np.array(rows, dtype=np.int64)}
