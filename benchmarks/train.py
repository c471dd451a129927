"""Training input speed on CPU: the Ray Data reader against raw pyarrow, and a real 2-worker run.

    python benchmarks/train.py [--data DIR] [--count 512] [--resolution 64] [--steps 60] [--batch 16]
                               [--reader-batch 128] [--workers 2] [--preset tiny] [--repeats 3] [--cpus N]
                               [--skip-train] [--skip-reader]

Data: ``--data``, a ``recompose decompose`` output; without it, ``--count`` synthetic images are
made and decomposed at ``--resolution`` (palette, sketch, instances, depth, intensity; 128 rows
a shard) in a temporary directory. One local Ray (``--cpus``, default every core) is started
first; its start-up is never timed.

Reader (same files, same columns as training reads: ``make_recipe`` for the ``--preset`` model):
  (a) raw pyarrow        ``pq.read_table(f, columns=cols)`` per file, one process, then the
                         fixed-width columns as numpy arrays (``from_binary`` for the fixed-size
                         binary images and maps, a zero-copy reshape for fixed-size lists)
  (b) ray data           ``train_data.read_shards(files, cols).iter_batches(batch_size=--reader-batch,
                         batch_format="pyarrow")`` (the reader training uses) with the same
                         decode in the consumer
  (c) ray data + prepare ``build_dataset`` (map_batches(prepare_batch): decode, augment, tokenize)
                         through ``iter_torch_batches(batch_size=--reader-batch, prefetch_batches=2,
                         local_shuffle_buffer_size=256)``: the training input path in one
                         consumer; reported, not judged
Samples/s counts from building the dataset to the last batch, so (b) and (c) include what Ray
Data pays on every execution, i.e. every training epoch (planning, listing, launching read
tasks); ``first_batch_s`` and the rate after the first batch are reported beside it. One
untimed warm-up pass of each comes first (Ray's worker processes start, the files enter the
page cache); then ``--repeats`` timed passes of each,
the order alternating (a b c, c b a, ...). Figures are medians. Goal: ``ratio_reader`` = (b)/(a)
≥ 0.5. Training reads through Ray's V1 parquet datasource (``read_shards`` says why: the V2 one
restarts a pool of footer-indexing actors every epoch); (b) and (c) measure that reader.

Train: ``run_train`` with ``--workers`` CPU workers (DDP over gloo), ``--steps`` steps of
``--batch`` rows per worker, metrics every 10 steps, sample grids only at the end (2 DDIM steps),
no system metrics, no model registration, one checkpoint at the end; MLflow in a temporary SQLite
store, read back with ``MlflowClient``. Per logged window: images/s and the fraction of step time
spent blocked on the next batch (summed over workers). The first window includes Ray Data's
start-up and is reported on its own; ``steady`` is the mean over the later windows (which still
hold each later epoch's re-execution of the dataset: an epoch is rows / (workers × batch) steps). Goal:
steady ``data_wait_fraction`` < 0.10.

Prints one JSON object on stdout; progress on stderr. Other processes share the CPU on a
development VM: the load averages before and after explain noisy runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers.configuration_utils import FrozenDict  # noqa: E402

from benchmarks.machine import cpu_name  # noqa: E402
from pipelines.config import load_config  # noqa: E402
from pipelines.data.batches import BatchRecipe, DataSpec, make_recipe, open_data
from pipelines.data.shards import from_binary  # noqa: E402
from pipelines.log import configure  # noqa: E402
from pipelines.train.config import DataSection, TrainConfig  # noqa: E402
from pipelines.train.data import build_dataset, read_parallelism, read_shards
from pipelines.train.run import model_arguments  # noqa: E402

GOAL_READER_RATIO = 0.5
GOAL_DATA_WAIT = 0.10
LOG_EVERY = 10
WINDOW_METRICS = ("images_per_s", "data_wait_fraction", "step_time_s", "loss", "epoch")
CONDITIONS = ("palette", "sketch", "instances", "depth", "intensity")


log = logging.getLogger("bench")


def make_data(root: Path, count: int, resolution: int, conditions: tuple[str, ...] = CONDITIONS) -> Path:
    """``count`` synthetic images decomposed at ``resolution`` into ``root``/decomposed (Ray running)."""
    from pipelines.data.synth import write_synth
    from pipelines.decompose.config import DecomposeConfig
    from pipelines.decompose.job import run_decompose

    write_synth(root / "synth", count=count, resolution=resolution, seed=0, split="train", progress=False)
    cfg = DecomposeConfig(
        input=str(root / "synth"),
        output=str(root / "decomposed"),
        resolution=resolution,
        shard_size=128,
        conditions=conditions,
        progress=False,
    )
    run_decompose(cfg)
    return root / "decomposed"


def training_recipe(spec: DataSpec, preset: str) -> BatchRecipe:
    """The recipe ``run_train`` builds for ``preset`` on ``spec``, every condition the data has."""
    cfg = load_config(TrainConfig, values={"data": spec.root, "model.preset": preset})
    return make_recipe(spec, FrozenDict(model_arguments(cfg, spec)), spec.conditions, cfg.augment)


# -- reader ----------------------------------------------------------------------------------------

Layout = dict[str, tuple[str, tuple[int, ...]]]  # fixed-width column -> (numpy dtype, per-row shape)
Marks = list[tuple[int, float]]  # per batch: (rows, seconds since the pass began)


def column_layout(spec: DataSpec, columns: tuple[str, ...]) -> Layout:
    """The fixed-width columns among ``columns`` (images, maps, palette) and how to view them."""
    schema = pq.read_schema(spec.files[0])
    out: Layout = {}
    for name in columns:
        f = schema.field(name)
        if pa.types.is_fixed_size_binary(f.type):
            out[name] = (f.metadata[b"dtype"].decode(), spec.shapes[name])
        elif pa.types.is_fixed_size_list(f.type):
            out[name] = (f.type.value_type.to_pandas_dtype().__name__, spec.shapes[name])
    return out


def to_arrays(table: pa.Table, layout: Layout) -> dict[str, np.ndarray]:
    """The minimal decode both readers share: fixed-width columns -> (N, *shape) numpy views."""
    out = {}
    for name, (dtype, shape) in layout.items():
        col = table.column(name)
        if pa.types.is_fixed_size_binary(col.type):
            out[name] = from_binary(col, dtype, shape)
        else:
            col = col.combine_chunks()
            out[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), *shape)
    return out


def read_raw(spec: DataSpec, columns: tuple[str, ...], layout: Layout) -> Marks:
    """(a): every file with pyarrow in this process; one batch per file."""
    t0, marks = time.perf_counter(), []
    for f in spec.files:
        table = pq.read_table(f, columns=list(columns))
        to_arrays(table, layout)
        marks.append((table.num_rows, time.perf_counter() - t0))
    return marks


def read_ray(spec: DataSpec, columns: tuple[str, ...], layout: Layout, batch: int) -> Marks:
    """(b): the Ray Data parquet reader, batches decoded in the consumer as (a) does."""
    import ray

    t0, marks = time.perf_counter(), []
    # The reader training uses (train_data.read_shards: Ray's V1 parquet datasource, columns
    # pruned in the scan, read_parallelism tasks).
    blocks = read_parallelism(spec.rows, len(spec.files), ray.cluster_resources().get("CPU", 1))
    ds = read_shards(list(spec.files), list(columns), num_blocks=blocks)
    for table in ds.iter_batches(batch_size=batch, batch_format="pyarrow"):
        to_arrays(table, layout)
        marks.append((table.num_rows, time.perf_counter() - t0))
    return marks


def read_prepared(spec: DataSpec, recipe: BatchRecipe, batch: int) -> Marks:
    """(c): the training input path (read, prepare_batch, torch batches) in one consumer."""
    loader = DataSection()
    t0, marks = time.perf_counter(), []
    ds = build_dataset(spec, recipe, shuffle_files=True, seed=0, augment_cpus=loader.augment_cpus)
    for b in ds.iter_torch_batches(
        batch_size=batch,
        prefetch_batches=loader.prefetch_batches,
        local_shuffle_buffer_size=loader.shuffle_buffer,
    ):
        marks.append((len(b["image"]), time.perf_counter() - t0))
    return marks


def _run_figures(marks: Marks) -> dict:
    rows, seconds = sum(n for n, _ in marks), marks[-1][1]
    first_rows, first_s = marks[0]
    rest = (rows - first_rows) / (seconds - first_s) if len(marks) > 1 and seconds > first_s else None
    return {
        "rows": rows,
        "seconds": round(seconds, 4),
        "samples_per_s": rows / seconds,
        "first_batch_s": round(first_s, 4),
        "after_first_batch_samples_per_s": rest,
    }


def reader_benchmark(
    spec: DataSpec, recipe: BatchRecipe, repeats: int, batch: int, warmup: bool = True
) -> dict:
    """Samples/s of (a) raw pyarrow, (b) Ray Data, (c) Ray Data + prepare_batch (Ray initialised).

    ``warmup``: one untimed pass of each first (tests skip it: they check fields, not speed).

    Returns ``{"columns", "raw_pyarrow", "ray_data", "ray_data_prepare", "ratio_reader", "goal_met"}``;
    each reader's entry holds the median samples/s, first-batch latency and every timed run.
    """
    import ray.data

    if repeats < 1 or batch < 1:
        raise ValueError(f"repeats and batch must be >= 1, got {repeats} and {batch}")
    ray.data.DataContext.get_current().enable_progress_bars = False
    columns = recipe.columns
    layout = column_layout(spec, columns)
    readers: dict[str, Callable[[], Marks]] = {
        "raw_pyarrow": lambda: read_raw(spec, columns, layout),
        "ray_data": lambda: read_ray(spec, columns, layout, batch),
        "ray_data_prepare": lambda: read_prepared(spec, recipe, batch),
    }
    for name, fn in readers.items() if warmup else ():
        log.info(f"reader warm-up: {name}")
        fn()
    runs: dict[str, list[dict]] = {name: [] for name in readers}
    for i in range(repeats):
        order = list(readers) if i % 2 == 0 else list(reversed(readers))
        for name in order:
            runs[name].append(_run_figures(readers[name]()))
            log.info(f"reader run {i + 1}/{repeats} {name}: {runs[name][-1]['samples_per_s']:.0f} samples/s")
    out: dict = {
        "columns": list(columns),
        "batch": batch,
        "repeats": repeats,
        "warmup": warmup,
        "datasource": "v1 (train_data.read_shards)",
    }
    for name, rs in runs.items():
        rest = [r["after_first_batch_samples_per_s"] for r in rs if r["after_first_batch_samples_per_s"]]
        out[name] = {
            "samples_per_s": statistics.median(r["samples_per_s"] for r in rs),
            "first_batch_s": statistics.median(r["first_batch_s"] for r in rs),
            "after_first_batch_samples_per_s": statistics.median(rest) if rest else None,
            "runs": rs,
        }
    out["ratio_reader"] = out["ray_data"]["samples_per_s"] / out["raw_pyarrow"]["samples_per_s"]
    out["goal_ratio"] = GOAL_READER_RATIO
    out["goal_met"] = out["ratio_reader"] >= GOAL_READER_RATIO
    return out


# -- train -----------------------------------------------------------------------------------------


def train_benchmark(data: Path, steps: int, batch: int, workers: int, preset: str) -> dict:
    """A real ``run_train`` (Ray initialised) and its MLflow metric windows."""
    from mlflow import MlflowClient

    from pipelines.train.run import run_train

    with tempfile.TemporaryDirectory(prefix="bench-train-", ignore_cleanup_errors=True) as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        values = {
            "data": str(data),
            "output": str(Path(tmp) / "run"),
            "max_steps": steps,
            "workers": workers,
            "model.preset": preset,
        }
        overrides = [
            f"optim.batch_size={batch}",
            f"mlflow.log_every={LOG_EVERY}",
            "mlflow.sample_every=0",
            "mlflow.sample_steps=2",
            "mlflow.system_metrics=false",
            "mlflow.registered_model=null",
            f"mlflow.tracking_uri={uri}",
            f"checkpoint_every={steps}",
        ]
        cfg = load_config(TrainConfig, values=values, overrides=overrides)
        t0 = time.perf_counter()
        summary = run_train(cfg)
        total = time.perf_counter() - t0
        client = MlflowClient(uri)
        history = {
            name: {m.step: m.value for m in client.get_metric_history(summary.mlflow_run_id, name)}
            for name in WINDOW_METRICS
        }
    windows = [
        {"step": step, **{name: history[name].get(step) for name in WINDOW_METRICS}}
        for step in sorted(history["images_per_s"])
    ]
    later = windows[1:]
    steady = None
    if later:
        steady = {
            "images_per_s": statistics.fmean(w["images_per_s"] for w in later),
            "data_wait_fraction": statistics.fmean(w["data_wait_fraction"] for w in later),
            "windows": len(later),
        }
    return {
        "workers": workers,
        "cpus_per_worker": summary.config["cpus_per_worker"],
        "batch_per_worker": batch,
        "global_batch": batch * workers,
        "steps": summary.steps,
        "log_every": LOG_EVERY,
        "windows": windows,
        "first_window": windows[0] if windows else None,
        "steady": steady,
        "goal_data_wait": GOAL_DATA_WAIT,
        "goal_met": steady["data_wait_fraction"] < GOAL_DATA_WAIT if steady else None,
        "registered_model": summary.registered_model,
        "fit_seconds": summary.seconds,
        "seconds_total": round(total, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="a decomposition output; default: synthetic, made here")
    p.add_argument("--count", type=int, default=512, help="synthetic images when --data is not given")
    p.add_argument("--resolution", type=int, default=64, help="stored side of the synthetic data")
    p.add_argument("--steps", type=int, default=60, help="training steps")
    p.add_argument("--batch", type=int, default=16, help="rows per training step and worker")
    p.add_argument("--reader-batch", type=int, default=128, help="rows per batch in the reader comparison")
    p.add_argument("--workers", type=int, default=2, help="Ray Train CPU workers")
    p.add_argument("--preset", default="tiny", help="model preset (decides the columns read)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes of each reader, alternating")
    p.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray; default every core")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-reader", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    configure()  # run_train's own lines as `[train] …`
    import pyarrow
    import ray
    import torch

    cpus = args.cpus or len(os.sched_getaffinity(0))
    out: dict = {
        "benchmark": "train",
        "machine": {
            "cpu": cpu_name(),
            "cores": len(os.sched_getaffinity(0)),
            "ray_cpus": cpus,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "pyarrow": pyarrow.__version__,
        },
        "args": vars(args),
        "loadavg_1min_before": round(os.getloadavg()[0], 2),
    }
    # Ray echoes its workers' and raylet's output on this process's stdout (file descriptor 1):
    # point that at stderr and keep a copy of the real stdout for the JSON alone.
    sys.stdout.flush()
    result = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    # address="local": a Ray of our own, never a cluster someone else started on this machine.
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=True)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-data-", ignore_cleanup_errors=True) as tmp:
            data = Path(args.data) if args.data else None
            if data is None:
                log.info(
                    f"no --data: decomposing {args.count} synthetic images at {args.resolution} px in {tmp}"
                )
                t0 = time.perf_counter()
                data = make_data(Path(tmp), args.count, args.resolution)
                log.info(f"data ready in {time.perf_counter() - t0:.1f} s")
            spec = open_data(data)
            out["data"] = {
                "dir": str(data) if args.data else "synthetic (temporary)",
                "rows": spec.rows,
                "files": len(spec.files),
                "resolution": spec.resolution,
                "bytes": sum(Path(f).stat().st_size for f in spec.files),
            }
            if not args.skip_reader:
                out["reader"] = reader_benchmark(
                    spec, training_recipe(spec, args.preset), args.repeats, args.reader_batch
                )
            if not args.skip_train:
                log.info(f"training {args.steps} steps on {args.workers} CPU workers")
                out["train"] = train_benchmark(data, args.steps, args.batch, args.workers, args.preset)
    finally:
        ray.shutdown()
    out["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=2), file=result, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
