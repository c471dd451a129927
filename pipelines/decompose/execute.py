"""Computing shards on Ray Data and committing each one as soon as all its rows have arrived.

    work units → read (flat_map) → decode (tasks) → one actor stage per extractor → write parts

The driver streams the write stage's summary rows (shard, rows written) and commits a shard when
its count reaches the shard's input count, so a killed run loses at most the shards in flight.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipelines.config import ConfigError
from pipelines.decompose.plan import JobPlan, Pending

log = logging.getLogger(__name__)

# Called with the number of shards this run has committed, right after each commit. Tests set it
# to act between two commits (e.g. kill the process there); product code leaves it None.
after_commit: Callable[[int], None] | None = None


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
    budget = cpus * 0.5  # the other half runs the read, decode and write tasks
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


def execute(job: JobPlan, work: list[Pending], commit: Callable[[Pending, list[Path]], None]) -> None:
    """Compute the shards of ``work`` and ``commit(pending, part_files)`` each one when complete."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    staging = job.state / "staging"
    for p in work:
        shutil.rmtree(staging / p.unit.shard, ignore_errors=True)
    ds = _dataset(job, work, staging)
    _stream(ds, work, staging, commit, job.cfg.progress)
    if job.cfg.data_stats:
        log.info(ds.stats())


def _dataset(job: JobPlan, work: list[Pending], staging: Path) -> Any:
    """The Ray Data pipeline over ``work``; it yields one (shard, rows) row per part file written."""
    import ray

    from pipelines.data.decode import decode_batch
    from pipelines.decompose.stages import ExtractorStage, read_rows, unfused, write_parts

    cfg, has_gt = job.cfg, job.plan.has_ground_truth
    items = [{"unit": p.unit.to_json(), "todo": ",".join(p.todo)} for p in work]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    read_kwargs = {
        "root": job.plan.root,
        "image_column": cfg.image_column,
        "caption_column": cfg.caption_column,
        "max_bytes": cfg.decode.max_file_bytes,
    }
    ds = ds.flat_map(read_rows, fn_kwargs=read_kwargs, num_cpus=cfg.read_num_cpus)
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"resolution": cfg.resolution, "cfg": cfg.decode, "with_gt": has_gt},
        batch_size=cfg.decode.batch_size,
        num_cpus=cfg.decode.num_cpus,
        batch_format="numpy",
        ray_remote_args_fn=unfused,
    )
    stages = {n: e.resources() for n, e in job.extractors.items() if any(n in p.todo for p in work)}
    for name, res in fit_to_cluster(stages, ray.cluster_resources()).items():
        ds = ds.map_batches(
            ExtractorStage,
            fn_constructor_kwargs={
                "name": name,
                # the GPUs it got: an auto (None) num_gpus is decided above, and decides the device
                "config": getattr(cfg, name).model_copy(update={"num_gpus": res["num_gpus"]}),
                "resolution": cfg.resolution,
                "has_ground_truth": has_gt,
            },
            batch_size=res["batch_size"],
            compute=ray.data.ActorPoolStrategy(size=res["concurrency"]),
            num_cpus=res["num_cpus"],
            num_gpus=res["num_gpus"] or None,
            batch_format="numpy",
        )
    columns = [s.name for name in stages for s in job.specs[name]]
    return ds.map_batches(
        write_parts,
        fn_kwargs={"staging": str(staging), "columns": columns},
        batch_format="numpy",
        num_cpus=0.5,
    )


def _stream(
    ds: Any, work: list[Pending], staging: Path, commit: Callable[[Pending, list[Path]], None], progress: bool
) -> None:
    """Count each shard's written rows as they stream in; commit a shard once it has them all."""
    from tqdm import tqdm

    expected = {p.unit.shard: len(p.unit.members) for p in work}
    by_name = {p.unit.shard: p for p in work}
    got: Counter[str] = Counter()
    bar = tqdm(
        total=sum(expected.values()),
        unit="img",
        desc="decompose",
        file=sys.stderr,
        mininterval=1.0,
        dynamic_ncols=True,
        disable=not progress,
    )
    finished = 0
    for row in ds.iter_rows():
        shard, n = row["shard"], int(row["rows"])
        got[shard] += n
        bar.update(n)
        if got[shard] == expected[shard]:
            commit(by_name[shard], sorted((staging / shard).glob("part-*.parquet")))
            finished += 1
            bar.set_postfix(shards=f"{finished}/{len(work)}")
            if after_commit is not None:
                after_commit(finished)
        elif got[shard] > expected[shard]:
            raise RuntimeError(f"shard {shard}: {got[shard]} rows for {expected[shard]} inputs")
    bar.close()
    missing = [s for s in expected if got[s] != expected[s]]
    if missing:
        raise RuntimeError(f"shards {missing[:5]} did not receive all their rows; rerun to resume")
