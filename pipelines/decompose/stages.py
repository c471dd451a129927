"""Ray Data UDFs of the decomposition job, in their own module so Ray pickles little.

    process (tasks, one work item each): read, decode, then every extractor that runs no model
      → one actor stage per extractor that runs a model (it loads it once)
      → the driver, which commits each shard once all its rows have arrived (commit.py)

or, when no extractor runs a model, one stage:

    process_shards (tasks, one whole shard each): ``process`` on each of its work items, then
      its data files written from the rows in memory; the driver writes only the state file

Every row carries ``err_stage/err_type/err_msg``. A row that failed somewhere flows on untouched
and is recorded at the end, so inputs = rows + errors always. A row records the first stage it
fails in, in the job's extractor order, whichever order the stages run in: an actor stage also
runs the rows that failed only in a later extractor that ran before it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pipelines.conditions import ExtractorConfig, get_extractor
from pipelines.data.sources import WorkUnit, error_message, read_unit
from pipelines.decompose.commit import ShardTarget, write_files
from pipelines.decompose.plan import Pending

EXTRACTOR_INPUTS = ("image", "text", "gt_instances", "gt_depth", "has_gt")  # GT only for the synthetic set


def unfused() -> dict[str, Any]:
    """A ``ray_remote_args_fn`` that changes nothing but keeps Ray Data from fusing this stage.

    Ray Data fuses a task stage into the actor stage after it; for the process tasks that would
    run all decoding and CPU extraction inside the (often single) actor of the first model stage.
    """
    return {}


def _parts(unit: WorkUnit, rows: int) -> list[tuple[int, WorkUnit]]:
    """``unit`` cut into parts of at most ``rows`` inputs, each with the offset of its first."""
    return [
        (
            lo,
            dataclasses.replace(
                unit, members=unit.members[lo : lo + rows], captions=unit.captions[lo : lo + rows], stats=()
            ),
        )
        for lo in range(0, len(unit.members), rows)
    ]


def work_items(unit: WorkUnit, todo: tuple[str, ...], rows: int) -> list[dict[str, Any]]:
    """``unit`` cut into items of at most ``rows`` inputs: what one process task reads and computes."""
    return [{"unit": part.to_json(), "offset": lo, "todo": ",".join(todo)} for lo, part in _parts(unit, rows)]


def read_item(item: dict[str, Any], read: dict[str, Any]) -> dict[str, np.ndarray]:
    """The rows of one work item as a batch: encoded bytes, captions, ``read`` errors."""
    return _read(WorkUnit.from_json(item["unit"]), int(item["offset"]), item["todo"], read)


def _read(part: WorkUnit, offset: int, todo: str, read: dict[str, Any]) -> dict[str, np.ndarray]:
    rows = read_unit(part, **read)
    batch: dict[str, np.ndarray] = {
        k: np.array([r[k] for r in rows], dtype=object) for k in rows[0] if k != "index"
    }
    batch["index"] = np.array([r["index"] for r in rows], np.int64) + offset
    batch["todo"] = np.array([todo] * len(rows), dtype=object)
    return batch


class ExtractorStage:
    """Runs one extractor on the rows that still need it; isolates rows that make it fail."""

    def __init__(
        self,
        name: str,
        config: ExtractorConfig,
        resolution: int,
        has_ground_truth: bool,
        ran_later: Sequence[str] = (),
        columns: Sequence[str] | None = None,
    ):
        """``ran_later``: extractors after this one in the job's order that have already run on
        the rows; a row that failed only there is still run here (a failure here comes first).
        ``columns``: the last stage, whose rows go to the driver (``output``)."""
        self.ran_later = list(ran_later)
        self.columns = columns
        self.extractor = get_extractor(name)(config, resolution, has_ground_truth)
        # Load weights now: a broken model directory fails the stage loudly instead of turning
        # every row into an error record.
        self.extractor.prepare()
        self.specs = self.extractor.columns()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        name = self.extractor.name
        n = len(batch["key"])
        stage, etype, emsg = (np.array(batch[c], dtype=object) for c in ("err_stage", "err_type", "err_msg"))
        todo = np.array([name in str(t).split(",") for t in batch["todo"]], bool)
        idx = np.flatnonzero(todo & ((stage == "") | np.isin(stage, self.ran_later)))
        try:
            res = self._run(batch, idx) if idx.size else None
        except Exception:  # noqa: BLE001 - retried row by row below to find and record the bad ones
            res = None
        if res is not None and idx.size == n:  # every row: its arrays are the columns, no copy
            out = {s.name: np.asarray(res[s.name], s.dtype) for s in self.specs}
        else:
            out = {s.name: np.zeros((n, *s.shape), s.dtype) for s in self.specs}
            if res is not None:
                self._place(out, idx, res)
            else:
                for i in idx:
                    try:
                        self._place(out, np.array([i]), self._run(batch, np.array([i])))
                    except Exception as e:  # noqa: BLE001
                        stage[i], etype[i], emsg[i] = name, type(e).__name__, error_message(e)
        batch = dict(batch)
        batch.update(out, err_stage=stage, err_type=etype, err_msg=emsg)
        return output(batch, self.columns) if self.columns is not None else batch

    def _run(self, batch: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
        whole = idx.size == len(batch["key"])
        return self.extractor(
            {k: batch[k] if whole else batch[k][idx] for k in EXTRACTOR_INPUTS if k in batch}
        )

    @staticmethod
    def _place(out: dict[str, np.ndarray], idx: np.ndarray, res: dict[str, np.ndarray]) -> None:
        for k in out:
            out[k][idx] = res[k]


# The stages of the process tasks, built once per worker process (a worker runs many tasks).
_STAGES: dict[tuple[Any, ...], ExtractorStage] = {}


def _stage(name: str, config: ExtractorConfig, resolution: int, has_ground_truth: bool) -> ExtractorStage:
    key = (name, type(config).__name__, config.model_dump_json(), resolution, has_ground_truth)
    if key not in _STAGES:
        _STAGES[key] = ExtractorStage(name, config, resolution, has_ground_truth)
    return _STAGES[key]


def process(
    items: dict[str, np.ndarray],
    read: dict[str, Any],
    decode: dict[str, Any],
    extractors: dict[str, ExtractorConfig],
    resolution: int,
    has_ground_truth: bool,
    columns: Sequence[str] | None,
    threads: int = 1,
) -> dict[str, np.ndarray]:
    """read → decode → ``extractors`` in order, for each work item of ``items`` (``work_items``;
    one per task). ``columns``: the rows go to the driver, with only these condition columns
    (``output``); None: to the model stages, with everything they read.

    One task does all of it, so the encoded bytes, the decoded images and the maps never leave
    the process between stages.
    ``threads``: the CPUs the task holds; OpenCV would otherwise start a thread per core of the
    host in every worker, and the workers would fight over the cores."""
    _threads(threads)
    out = []
    for i in range(len(items["unit"])):
        batch = read_item({k: items[k][i] for k in ("unit", "offset", "todo")}, read)
        out.append(_compute(batch, decode, extractors, resolution, has_ground_truth, columns))
    if len(out) == 1:
        return out[0]
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def _threads(n: int) -> None:
    import cv2

    if cv2.getNumThreads() != n:
        cv2.setNumThreads(n)


def _compute(
    batch: dict[str, np.ndarray],
    decode: dict[str, Any],
    extractors: dict[str, ExtractorConfig],
    resolution: int,
    has_ground_truth: bool,
    columns: Sequence[str] | None,
) -> dict[str, np.ndarray]:
    """decode → ``extractors`` in order on the rows of one work item (``read_item``)."""
    from pipelines.data.decode import decode_batch

    batch = decode_batch(batch, resolution=resolution, **decode)
    for name, config in extractors.items():
        batch = _stage(name, config, resolution, has_ground_truth)(batch)
    return output(batch, columns) if columns is not None else batch


def shard_items(work: Sequence[Pending], old: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    """One item per shard of ``work`` for ``process_shards``; ``old``: each update's stored state."""
    return [
        {
            "unit": p.unit.to_json(),
            "todo": ",".join(p.todo),
            "fresh": p.fresh,
            "old": json.dumps(old.get(p.unit.shard)),
        }
        for p in work
    ]


SHARD_COLUMNS = ("shard", "written", "first_row_at")  # what process_shards returns per shard


def process_shards(
    items: dict[str, np.ndarray],
    read: dict[str, Any],
    decode: dict[str, Any],
    extractors: dict[str, ExtractorConfig],
    resolution: int,
    has_ground_truth: bool,
    columns: Sequence[str],
    rows: int,
    target: ShardTarget,
    threads: int = 1,
    write_hook: Callable[[str, str], None] | None = None,
) -> dict[str, np.ndarray]:
    """For each item of ``shard_items`` (one per task): ``process`` on its work items of ``rows``
    inputs, then the shard's data files, written from the rows while they are in memory.

    Returns, per shard, the ``Written`` record (JSON) the driver commits with the state file, and
    when its first row was processed (epoch seconds). ``write_hook``: the driver's
    ``commit.write_hook``, so that a test's seam acts here too."""
    from pipelines.decompose import commit

    _threads(threads)
    commit.write_hook = write_hook
    out: dict[str, list[Any]] = {c: [] for c in SHARD_COLUMNS}
    for i in range(len(items["unit"])):
        p = Pending(
            WorkUnit.from_json(items["unit"][i]),
            tuple(str(items["todo"][i]).split(",")),
            bool(items["fresh"][i]),
        )
        parts, first, todo = [], None, ",".join(p.todo)
        for lo, part in _parts(p.unit, rows):
            batch = _read(part, lo, todo, read)
            parts.append(_compute(batch, decode, extractors, resolution, has_ground_truth, columns))
            first = first or time.time()
        written = write_files(target, p, json.loads(items["old"][i]), parts)
        out["shard"].append(p.unit.shard)
        out["written"].append(json.dumps(written))
        out["first_row_at"].append(first)
    return {
        "shard": np.array(out["shard"], object),
        "written": np.array(out["written"], object),
        "first_row_at": np.array(out["first_row_at"], np.float64),
    }


ROW_COLUMNS = ("shard", "index", "key", "source", "text", "err_stage", "err_type", "err_msg", "image")


def output(batch: dict[str, np.ndarray], columns: Sequence[str]) -> dict[str, np.ndarray]:
    """What reaches the driver: the row's identity, its errors, the image and ``columns``."""
    return {c: batch[c] for c in (*ROW_COLUMNS, *columns)}
