"""Computing shards on Ray Data and committing each one as soon as all its rows have arrived.

    work items (``decode.batch_size`` inputs of one shard each)
      → process (tasks: read, decode, the extractors that run no model)
      → one actor stage per extractor that runs a model
      → the driver (the rows, read in place from the object store)

Each hop between Ray Data stages serialises every row through the object store, so all the CPU
work shares one task: the no-weights path (the embedded default) is a single stage. Stages that
run a network keep their own actors, which load the weights once and hold the GPU.

The driver collects the computed rows as they stream in (read in place from the object store)
and commits a shard when it has all its inputs' rows, so a killed run loses at most the shards
in flight.

When no extractor runs a model (``_writes_in_tasks``), the rows need not meet anywhere: each
task computes a whole shard and writes its data files itself, while the rows are in its memory
(compressing them is most of the driver's work otherwise, and a single driver would cap a
cluster's throughput), and the driver writes the state file that commits it:

    shards → process_shards (tasks: every work item of the shard, then its data files)
      → the driver (one record per shard: the files' digests; it writes the state file)

There the driver also computes the first shard itself, with the same function, while Ray starts
(``_DriverShard``): the first rows are processed seconds before Ray could process any.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.conditions.base import Batch
from pipelines.config import ConfigError
from pipelines.decompose.commit import ShardTarget, Written, write_files
from pipelines.decompose.plan import JobPlan, Pending

log = logging.getLogger(__name__)

# Called with the number of shards this run has committed, right after each commit. Tests set it
# to act between two commits (e.g. kill the process there); product code leaves it None.
after_commit: Callable[[int], None] | None = None

REPORT_EVERY_S = 60.0  # a progress line in the log this often (see _Report)


@dataclass(frozen=True)
class ExtraStage:
    """An actor stage run after the model stages: ``cls(**kwargs, columns=...)`` is called on
    numpy batches of ``batch_size`` rows and returns them, as ``stages.output(batch, columns)``
    when ``columns`` is not None (the last stage: what the driver receives)."""

    cls: type
    kwargs: dict[str, Any]
    batch_size: int
    num_cpus: float = 0.0
    num_gpus: float = 0.0
    concurrency: int = 1


# Stages appended after the model stages. The decomposition benchmark puts a stand-in for a GPU
# model here (benchmarks/decompose.py --simulate-gpu); product code leaves it empty.
extra_stages: list[ExtraStage] = []


def fit_to_cluster(stages: dict[str, dict[str, Any]], cluster: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Give stages with ``num_gpus`` None (auto) their GPUs, and scale the actors' CPU
    reservations down when they cannot all be placed at once.

    Every actor stage must be running for the stream to flow; on a laptop the configured
    reservations (1 CPU per actor) may exceed the machine, which would stall the job. Only the
    reservations shrink — what the job computes is unchanged. Missing GPUs are a clear error.
    """
    gpus = cluster.get("GPU", 0.0)
    stages = _auto_gpus(stages, gpus)
    for name, r in stages.items():
        if r["num_gpus"] and r["num_gpus"] * r["concurrency"] > gpus:
            raise ConfigError(
                f"{name} asks for {r['concurrency']} actor(s) x {r['num_gpus']} GPU but the Ray cluster has "
                f"{gpus:g} GPU(s); lower {name}.concurrency / {name}.num_gpus or add GPU nodes"
            )
    cpus = cluster.get("CPU", 1.0)
    need = sum(r["num_cpus"] * r["concurrency"] for r in stages.values())
    budget = cpus * 0.5  # the other half runs the process tasks (read, decode, CPU extractors)
    if need <= budget:
        return stages
    scale = budget / need
    log.info(f"actors reserve {need:g} CPUs on a {cpus:g}-CPU cluster: scaling reservations by {scale:.2f}")
    return {n: {**r, "num_cpus": r["num_cpus"] * scale} for n, r in stages.items()}


def _auto_gpus(stages: dict[str, dict[str, Any]], gpus: float) -> dict[str, dict[str, Any]]:
    """``num_gpus`` None: up to one GPU per actor out of those the other stages leave free, none
    (the CPU) on a cluster without GPUs."""
    free = gpus - sum(r["num_gpus"] * r["concurrency"] for r in stages.values() if r["num_gpus"])
    out = {}
    for name, r in stages.items():
        if r["num_gpus"] is None:
            share = min(1.0, free / r["concurrency"]) if free > 0 else 0.0
            free -= share * r["concurrency"]
            log.info(f"{name}: {share:g} GPU per actor ({gpus:g} in the cluster, num_gpus unset)")
            r = {**r, "num_gpus": share}
        out[name] = r
    return out


def execute(job: JobPlan, work: list[Pending], committed: Callable[[Pending, Written], None]) -> None:
    """Compute the shards of ``work``, write their data files, and call ``committed(pending,
    written)`` for each one (which writes its state file) as soon as they are on disk."""
    import ray

    inline, actors = split_stages(job, work)
    progress = _Progress(work, job.cfg.progress)
    # Started before Ray is: the driver's shard runs while ray.init and Ray Data start up
    ahead = _DriverShard.start(job, work, inline, actors, committed, progress)
    try:
        if not ray.is_initialized():
            ray.init(log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        shutil.rmtree(job.state / "staging", ignore_errors=True)  # part files of versions before 2026-12
        if "read_num_cpus" in job.cfg.model_fields_set:
            log.warning(
                "read_num_cpus is no longer used: reading runs in the process tasks (decode.num_cpus)"
            )
        rest = work[1:] if ahead else work
        poll = ahead.poll if ahead else lambda: None
        if _writes_in_tasks(job, rest, actors, ray.cluster_resources().get("CPU", 1.0)):
            ds = _shard_dataset(job, rest, inline)
            _stream_written(ds, rest, committed, progress, poll)
        else:
            ds = _dataset(job, rest, inline, actors)
            target = ShardTarget.of(job)

            def commit(p: Pending, parts: list[Batch]) -> None:
                committed(p, write_files(target, p, None if p.fresh else job.unit_state(p.unit), parts))

            _stream(ds, rest, commit, progress, poll)
    finally:
        # never leave the driver's shard half-written (exception() waits), nor done and not committed
        if ahead and ahead.future.exception() is None:
            ahead.finish()
    progress.close()
    if job.cfg.data_stats:
        log.info(ds.stats())


class _DriverShard:
    """The first shard of a job without model extractors, computed and written in a thread of the
    driver by the tasks' own function (``stages.process_shards``: the same bytes) while Ray starts.

    Ray's start-up is seconds of work that uses no row (``ray.init`` of a local Ray ~4.5 s on 2
    cores; Ray Data's first execution ~2 s; the workers' boot ~1.5 s), so the driver fills it with
    one shard; the others go to Ray as before. The commit (the state file) stays on the main
    thread, between the rows Ray streams in."""

    def __init__(
        self,
        pending: Pending,
        future: Any,
        committed: Callable[[Pending, Written], None],
        progress: _Progress,
    ):
        self.pending, self.future, self.committed, self.progress = pending, future, committed, progress
        self.done = False

    @classmethod
    def start(
        cls,
        job: JobPlan,
        work: list[Pending],
        inline: list[str],
        actors: list[str],
        committed: Callable[[Pending, Written], None],
        progress: _Progress,
    ) -> _DriverShard | None:
        cfg = job.cfg
        if not (cfg.driver_first_shard and cfg.write_in_tasks) or actors or extra_stages or len(work) < 2:
            return None
        if not _shard_fits(job, work[:1]):
            return None
        from concurrent.futures import ThreadPoolExecutor

        from pipelines.decompose.stages import process_shards, shard_items

        first = work[0]
        items = shard_items([first], _old_states(job, [first]))
        batch = {k: np.array([item[k] for item in items], object) for k in items[0]}
        pool = ThreadPoolExecutor(1, thread_name_prefix="driver-shard")
        future = pool.submit(process_shards, batch, **_shard_kwargs(job, inline))
        pool.shutdown(wait=False)  # the thread ends with its one task
        log.info(f"the driver computes shard {first.unit.shard} while Ray starts")
        return cls(first, future, committed, progress)

    def poll(self) -> None:
        """Commit the shard if it is done (called between the batches Ray streams in)."""
        if self.future.done():
            self.finish()

    def finish(self) -> None:
        """Wait for the shard (re-raising its error) and commit it, once."""
        if self.done:
            return
        out = self.future.result()
        self.done = True
        self.progress.first_row(float(out["first_row_at"][0]))
        self.committed(self.pending, json.loads(out["written"][0]))
        self.progress.update(len(self.pending.unit.members), committed=True)


def _writes_in_tasks(job: JobPlan, work: list[Pending], actors: list[str], cpus: float) -> bool:
    """Whether each task computes and writes a whole shard: no extractor runs a model, there are
    shards enough to keep every process slot busy, and a shard's rows fit
    ``write_in_tasks_max_mb`` (the task holds them all until it writes)."""
    cfg = job.cfg
    if not cfg.write_in_tasks or actors or extra_stages:
        return False
    slots = max(1, int(cpus // cfg.decode.num_cpus))
    if len(work) < slots:
        log.info(
            f"{len(work)} shard(s) for {slots} process slots: the rows go to the driver, in smaller tasks"
        )
        return False
    return _shard_fits(job, work, say=True)


def _shard_fits(job: JobPlan, work: list[Pending], say: bool = False) -> bool:
    """Whether the rows of each shard of ``work`` take at most ``write_in_tasks_max_mb``."""
    cfg = job.cfg
    per_row = cfg.resolution**2 * 3 + sum(
        int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for n in job.extractors for s in job.specs[n]
    )
    need = max(len(p.unit.members) for p in work) * per_row
    if need > cfg.write_in_tasks_max_mb * 2**20:
        if say:
            log.info(
                f"a shard's rows take {need / 2**20:.0f} MB, over write_in_tasks_max_mb "
                f"({cfg.write_in_tasks_max_mb}): the rows go to the driver, which writes the shards"
            )
        return False
    return True


def _compute_args(job: JobPlan, inline: list[str]) -> dict[str, Any]:
    """The arguments of ``stages.process`` and ``stages.process_shards`` that say what to compute."""
    cfg, has_gt = job.cfg, job.plan.has_ground_truth
    read = {
        "root": job.plan.root,
        "image_column": cfg.image_column,
        "caption_column": cfg.caption_column,
        "max_bytes": cfg.decode.max_file_bytes,
    }
    return {
        "read": read,
        "decode": {"cfg": cfg.decode, "with_gt": has_gt},
        "extractors": {n: getattr(cfg, n) for n in inline},
        "resolution": cfg.resolution,
        "has_ground_truth": has_gt,
    }


def _columns(job: JobPlan, names: list[str]) -> list[str]:
    """The condition columns of the extractors ``names``, in the job's order."""
    return [s.name for name in job.extractors if name in names for s in job.specs[name]]


def _old_states(job: JobPlan, work: list[Pending]) -> dict[str, dict[str, Any] | None]:
    """The stored state of each shard of ``work`` that updates an earlier one (``shard_items``)."""
    return {p.unit.shard: job.unit_state(p.unit) for p in work if not p.fresh}


def _shard_kwargs(job: JobPlan, inline: list[str]) -> dict[str, Any]:
    """The arguments of ``stages.process_shards`` but its items."""
    from pipelines.decompose import commit

    return {
        **_compute_args(job, inline),
        "columns": _columns(job, inline),
        "rows": job.cfg.decode.batch_size,
        "target": ShardTarget.of(job),
        "threads": max(1, int(job.cfg.decode.num_cpus)),
        "write_hook": commit.write_hook,
    }


def _shard_dataset(job: JobPlan, work: list[Pending], inline: list[str]) -> Any:
    """One task per shard: compute all of it, write its data files (``stages.process_shards``)."""
    import ray

    from pipelines.decompose.stages import process_shards, shard_items

    cfg = job.cfg
    log.info(f"stages: process and write each shard (read, decode, {', '.join(inline)}) → state (driver)")
    items = shard_items(work, _old_states(job, work))
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        process_shards,
        fn_kwargs=_shard_kwargs(job, inline),
        batch_size=None,  # a block: one shard
        num_cpus=cfg.decode.num_cpus,
        batch_format="numpy",
    )
    ds.context.op_resource_reservation_enabled = False  # see _dataset
    return ds


def split_stages(job: JobPlan, work: list[Pending]) -> tuple[list[str], list[str]]:
    """The extractors ``work`` needs, in the job's order, split into those that run inside the
    process tasks (no model, no GPU) and those that get an actor stage each."""
    names = [n for n in job.extractors if any(n in p.todo for p in work)]
    if not job.cfg.inline_extractors:
        return [], names
    inline = [
        n for n in names if not job.extractors[n].uses_model() and not job.extractors[n].config.num_gpus
    ]
    return inline, [n for n in names if n not in inline]


def _dataset(job: JobPlan, work: list[Pending], inline: list[str], actors: list[str]) -> Any:
    """The Ray Data pipeline over ``work``; its blocks are computed rows, each of one shard."""
    import ray

    from pipelines.decompose.stages import ExtractorStage, process, unfused, work_items

    cfg, has_gt = job.cfg, job.plan.has_ground_truth
    # One task per `decode.batch_size` inputs (not per shard): small jobs still use every CPU.
    items = [item for p in work for item in work_items(p.unit, p.todo, cfg.decode.batch_size)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    model_stages = bool(actors or extra_stages)
    log.info(
        f"stages: process (read, decode{''.join(', ' + n for n in inline)})"
        + "".join(f" → {n} (actors)" for n in actors)
        + " → commit (driver)"
    )
    order = [n for n in job.extractors if n in inline or n in actors]
    columns = _columns(job, order)
    ds = ds.map_batches(
        process,
        fn_kwargs={
            **_compute_args(job, inline),
            "columns": None if model_stages else columns,
            "threads": max(1, int(cfg.decode.num_cpus)),
        },
        batch_size=None,  # a block: one work item
        num_cpus=cfg.decode.num_cpus,
        batch_format="numpy",
        ray_remote_args_fn=unfused if model_stages else None,
    )
    # Ray Data reserves half of the CPUs for the operators by default, split among them: the
    # process tasks (all the CPU work) would get a share only, one task of two on a 2-CPU
    # machine. Model stages are actor pools that hold their CPUs and GPUs from the start.
    ds.context.op_resource_reservation_enabled = False
    if not model_stages:
        return ds
    stages = {n: job.extractors[n].resources() for n in actors}
    for name, res in fit_to_cluster(stages, ray.cluster_resources()).items():
        ds = ds.map_batches(
            ExtractorStage,
            fn_constructor_kwargs={
                "name": name,
                # the GPUs it got: an auto (None) num_gpus is decided above, and decides the device
                "config": getattr(cfg, name).model_copy(update={"num_gpus": res["num_gpus"]}),
                "resolution": cfg.resolution,
                "has_ground_truth": has_gt,
                "ran_later": [n for n in inline if order.index(n) > order.index(name)],
                "columns": columns if name == actors[-1] and not extra_stages else None,
            },
            batch_size=res["batch_size"],
            compute=ray.data.ActorPoolStrategy(size=res["concurrency"]),
            num_cpus=res["num_cpus"],
            num_gpus=res["num_gpus"] or None,
            batch_format="numpy",
        )
    for i, extra in enumerate(extra_stages):
        last = i == len(extra_stages) - 1
        ds = ds.map_batches(
            extra.cls,
            fn_constructor_kwargs={**extra.kwargs, "columns": columns if last else None},
            batch_size=extra.batch_size,
            compute=ray.data.ActorPoolStrategy(size=extra.concurrency),
            num_cpus=extra.num_cpus,
            num_gpus=extra.num_gpus or None,
            batch_format="numpy",
        )
    return ds


def _stream(
    ds: Any,
    work: list[Pending],
    commit: Callable[[Pending, list[Batch]], None],
    progress: _Progress,
    poll: Callable[[], None],
) -> None:
    """Collect each shard's computed rows as they stream in; commit a shard once it has them all.

    The driver holds the rows of the shards in flight (about CPUs × ``decode.batch_size`` rows:
    items are started in shard order), in the object store, read in place."""
    expected = {p.unit.shard: len(p.unit.members) for p in work}
    by_name = {p.unit.shard: p for p in work}
    got: Counter[str] = Counter()
    held: dict[str, list[Batch]] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        poll()
        progress.first_row(time.time())
        for shard in dict.fromkeys(batch["shard"].tolist()):  # one, unless Ray merged blocks
            rows = batch if (batch["shard"] == shard).all() else _select(batch, shard)
            n = len(rows["index"])
            got[shard] += n
            held.setdefault(shard, []).append(rows)
            if got[shard] == expected[shard]:
                commit(by_name[shard], held.pop(shard))
                progress.update(n, committed=True)
            elif got[shard] > expected[shard]:
                raise RuntimeError(f"shard {shard}: {got[shard]} rows for {expected[shard]} inputs")
            else:
                progress.update(n, committed=False)
    missing = [s for s in expected if got[s] != expected[s]]
    if missing:
        raise RuntimeError(f"shards {missing[:5]} did not receive all their rows; rerun to resume")


def _stream_written(
    ds: Any,
    work: list[Pending],
    committed: Callable[[Pending, Written], None],
    progress: _Progress,
    poll: Callable[[], None],
) -> None:
    """Commit each shard whose data files a task has written (``_shard_dataset``); ``poll``
    commits the driver's shard (``_DriverShard``) once it is done."""
    by_name = {p.unit.shard: p for p in work}
    done: set[str] = set()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        poll()
        progress.first_row(float(batch["first_row_at"].min()))
        for shard, written in zip(batch["shard"].tolist(), batch["written"].tolist(), strict=True):
            p = by_name[shard]
            if shard in done:
                raise RuntimeError(f"shard {shard} was written twice")
            committed(p, json.loads(written))
            done.add(shard)
            progress.update(len(p.unit.members), committed=True)
    missing = [s for s in by_name if s not in done]
    if missing:
        raise RuntimeError(f"shards {missing[:5]} were not written; rerun to resume")


def _select(batch: Batch, shard: str) -> Batch:
    keep = np.flatnonzero(batch["shard"] == shard)
    return {k: v[keep] for k, v in batch.items()}


class _Progress:
    """The progress bar, and a log line every ``every`` seconds (images, rate, shards committed,
    time left): what a run of days shows in ``ray job logs``, where a progress bar is one endless
    line. Also logs the start-up: when the first rows were processed, from the process's start."""

    def __init__(self, work: list[Pending], bar: bool, every: float = REPORT_EVERY_S):
        from tqdm import tqdm

        self.total, self.shards, self.every = sum(len(p.unit.members) for p in work), len(work), every
        self.start = self.last = time.monotonic()
        self.started_at = time.time()  # the pipeline's start, epoch seconds
        self.done = self.committed = 0
        self.first: float | None = None
        self.bar = tqdm(
            total=self.total,
            unit="img",
            desc="decompose",
            file=sys.stderr,
            mininterval=1.0,
            dynamic_ncols=True,
            disable=not bar,
        )

    def first_row(self, at: float) -> None:
        """The first rows were processed at ``at`` (epoch seconds): logged once."""
        if self.first is not None:
            return
        import psutil

        self.first = at - psutil.Process().create_time()
        log.info(
            f"first rows processed {self.first:.1f} s after the process started "
            f"({at - self.started_at:.1f} s after the pipeline did)"
        )

    def update(self, n: int, committed: bool) -> None:
        self.done += n
        self.bar.update(n)
        if committed:
            self.committed += 1
            self.bar.set_postfix(shards=f"{self.committed}/{self.shards}")
            if after_commit is not None:
                after_commit(self.committed)
        now = time.monotonic()
        if now - self.last < self.every or self.done >= self.total:
            return
        self.last = now
        rate = self.done / (now - self.start)
        left = (self.total - self.done) / rate if rate else float("inf")
        log.info(
            f"{self.done:,}/{self.total:,} images ({self.done / self.total:.1%}), {rate:.1f} images/s, "
            f"{self.committed}/{self.shards} shards committed, ~{_duration(left)} left"
        )

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    h, rem = divmod(int(seconds), 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"
