"""The decomposition job (Composer §3.1): image datasets → condition-feature shards, on Ray Data.

    plan (driver: units, extractors, what is done)  — plan.py
      → execute (Ray Data: read + decode + the no-model extractors in one task → one actor stage
        per model → the rows to the driver; without models, a task per shard that also writes
        its data files)  — execute.py
      → commit each complete shard: shards/<name>.parquet + errors (driver or task), then its
        state (driver), each atomically  — commit.py
      → errors.parquet, manifest.json, preview.png  — manifest.py

Resumability: a shard is done when its state file ``.recompose/state/<name>.json`` exists and
records the same input digest and extractor fingerprints as the current run. A rerun skips done
shards, recomputes shards whose state is missing (killed mid-run), and for shards whose
fingerprints differ recomputes only the changed conditions and merges them into the shard.
Because every file is written to a temporary name and renamed, and shard contents are sorted and
deterministic, an interrupted-then-resumed run ends with the same manifest as a clean one.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipelines import files
from pipelines.decompose.commit import ShardTarget, Written, commit_state, write_files
from pipelines.decompose.config import DecomposeConfig
from pipelines.decompose.execute import execute
from pipelines.decompose.manifest import write_outputs
from pipelines.decompose.plan import STATE_DIR, JobPlan, Pending, build_extractors

log = logging.getLogger(__name__)


@dataclass
class DecomposeResult:
    """What ``recompose decompose --json`` prints: where the outputs are and what this run did."""

    output: str
    manifest: str
    preview: str | None
    inputs: int  # = rows + errors
    rows: int
    errors: int
    skipped_upstream: dict[str, int]  # upstream failures (img2dataset status), by status
    errors_by_stage: dict[str, int]
    elapsed_s: float
    shards_computed: int
    inputs_processed: int  # inputs of the shards computed by this run
    shards_reused: int
    computed: dict[str, int]  # rows computed by this run, per condition


def run_decompose(cfg: DecomposeConfig) -> DecomposeResult:
    """Run (or resume) the decomposition described by ``cfg``."""
    job = JobPlan(cfg)
    with _claimed(job):
        for name, why in job.unavailable.items():
            log.info(f"skipping {name}: {why}")
        t0 = time.time()
        pending = job.pending()
        reused = len(job.plan.units) - len(pending)
        log.info(
            f"{job.plan.inputs} inputs in {len(job.plan.units)} shards ({job.plan.kind}); "
            f"{reused} shards already done, {len(pending)} to compute; conditions: {', '.join(job.extractors)}"
        )
        computed: Counter[str] = Counter()

        def committed(p: Pending, written: Written) -> None:
            commit_state(job, p.unit, written)
            for name in p.todo:
                computed[name] += written["rows"]

        updates = [p for p in pending if not p.fresh and not p.todo]
        for p in updates:  # only removed conditions: no compute, rewrite in place
            committed(p, write_files(ShardTarget.of(job), p, job.unit_state(p.unit), []))
        work = [p for p in pending if p.todo]
        if work:
            job.check_base(work)
            execute(job, work, committed)
        outputs = write_outputs(job, changed=bool(work or updates))
    result = DecomposeResult(
        output=str(job.out),
        **dataclasses.asdict(outputs),
        elapsed_s=round(time.time() - t0, 3),
        shards_computed=len(work),
        inputs_processed=sum(len(p.unit.members) for p in work),
        shards_reused=reused,
        computed=dict(computed),
    )
    _log_summary(result)
    return result


@contextmanager
def _claimed(job: JobPlan) -> Iterator[None]:
    """Hold the output directory for this run: refuse another run's or foreign content, lock it
    against a concurrent run, and record which input it holds (``.recompose/job.json``)."""

    def check() -> None:
        files.claim_output(job.out, f"{STATE_DIR}/job.json", "decomposition", job.identity(), _unfinished)

    check()
    job.state.mkdir(parents=True, exist_ok=True)
    with open(job.state / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise files.OutputInUse(f"another decomposition is writing to {job.out}") from None
        check()  # again, now that no other run can write job.json
        files.write_json(job.identity(), job.state / "job.json")
        yield


def _unfinished(entry: Path) -> bool:
    """A run stopped before it wrote job.json leaves only its state folder."""
    return entry.name == STATE_DIR


def _log_summary(s: DecomposeResult) -> None:
    rate = s.inputs_processed / s.elapsed_s if s.elapsed_s else 0.0
    speed = f" ({rate:.1f} img/s)" if s.shards_computed else " (nothing to do: all shards were complete)"
    log.info(f"done in {s.elapsed_s:.1f}s: {s.inputs} inputs = {s.rows} rows + {s.errors} errors{speed}")
    log.info(
        f"shards computed {s.shards_computed}, reused {s.shards_reused}; "
        f"rows computed per condition: {s.computed or '{}'}"
    )
    if s.errors_by_stage:
        log.info(f"errors by stage: {s.errors_by_stage} (see {Path(s.output) / 'errors.parquet'})")
    if s.skipped_upstream:
        log.info(f"skipped upstream (img2dataset status): {s.skipped_upstream}")
    log.info(f"manifest: {s.manifest}" + (f"  preview: {s.preview}" if s.preview else ""))


__all__ = ["DecomposeResult", "build_extractors", "run_decompose"]
