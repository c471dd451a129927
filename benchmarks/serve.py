"""Serving throughput and latency: the Serve app with ``@serve.batch`` against the same app without.

    python benchmarks/serve.py [--model DIR] [--resolution 32] [--steps 10] [--requests 32]
                               [--concurrency 1,8] [--repeats 2] [--max-batch-size 8]
                               [--batch-wait-timeout-s 0.01] [--model-cpus 1] [--ingress-cpus 0.1]
                               [--cpus N]

One local Ray (``address="local"``: never a cluster someone else started) and one Serve instance
on a free 127.0.0.1 port hold two applications of ``pipelines.serve.app.build_app``, deployed
once, side by side, with the same model directory and the same resources:

  batched    route ``/batched``: ``batching.enabled``, ``max_batch_size`` = ``--max-batch-size``
             samples, ``batch_wait_timeout_s`` = ``--batch-wait-timeout-s`` (the config default)
  unbatched  route ``/unbatched``: batching off, so the replica runs one request per model call

Each model deployment is one replica with ``--model-cpus`` (Ray gives it that many torch/OpenMP
threads: ``replica_torch_threads`` in the JSON is measured in a Ray task with the same
reservation), the ingress ``--ingress-cpus``; ``max_ongoing_requests`` is at least 16 and at
least the largest concurrency, so neither app queues in front of its replica differently.
Both apps stay deployed for the whole run and are measured one at a time, so only one replica
works at any moment (an idle replica costs nothing but health checks). The two apps' CPU
reservations are logical: Ray is started with ``--cpus`` (default: enough for both apps, at
least every core) — on a 2-core machine 3 logical CPUs, which is only bookkeeping since one app
is loaded at a time. Deploying both once, rather than deploying and deleting one app per
measurement, keeps replica start-up out of the run and lets the measurements alternate cheaply.

Load: an asyncio client (aiohttp, one connection per in-flight request) keeps ``c`` requests in
flight for each concurrency ``c`` of ``--concurrency`` until ``--requests`` have completed. Every
request is the same ``POST v1/generate`` (text + a two-colour palette, ``--steps`` DDIM steps, one
image, the default guidance), so all are compatible and may share a batch; seeds differ per
request. Before timing, both apps get an untimed warm-up at the same time (``2 × max
concurrency`` requests at the largest concurrency, then 2 at concurrency 1: the ingress's lazy
decoder, oneDNN primitives for the batch shapes). Then ``--repeats`` rounds; in each, every
concurrency level is measured for both apps, the order alternating (batched first in even rounds,
unbatched first in odd ones: A B, B A, ...) so drift in the machine's load hits both alike. Per app and level: requests/s = completed /
wall time from the first send to the last answer (median over rounds; each round's figure is
kept), latency p50/p95/mean/max pooled over all rounds' requests, the mean and largest
``batch.requests`` the responses report (how many requests shared their model call: 1 without
batching), the model's sampling time of the call each request was in (mean over requests), and
errors (non-200 answers or failed connections; must be 0).

Ratios batched/unbatched: requests/s (medians, and the median of each round's back-to-back pair)
and p95 latency per concurrency. Goal: batched requests/s > unbatched at concurrency 8 (the
largest level given). At concurrency 1 batching cannot win: a lone request waits
``batch_wait_timeout_s`` for company that never comes. Watch ``batch_requests_mean`` at the
largest level: Ray Serve closes a batch ``batch_wait_timeout_s`` after its first request even
while the previous batch still holds the model, so in-flight requests can split into groups
(e.g. 3 + 5 of 8); the model deployment merges the groups waiting for the model into one
sampling run (``ComposerServer._batched``), which the figure shows. The model is the tiny preset, randomly
initialised (the work per step does not depend on the weights), saved at ``--resolution`` in a
temporary directory unless ``--model`` names a saved pipeline.

Prints one JSON object on stdout; progress on stderr. Other processes share the CPU on a
development VM: the load averages before and after explain noisy runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Ray must not wrap its workers in `uv run` when this runs under uv (as tests/conftest.py does).
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import numpy as np  # noqa: E402

from benchmarks.machine import cpu_name  # noqa: E402
from pipelines.serve.config import Batching  # noqa: E402

MODES = ("batched", "unbatched")
TEXT = "a red circle above a blue star"
COLORS = ["#ff0000", "#0000ff"]
WARM_SEED = 10**6  # warm-up seeds; timed requests count from 0


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model(out_dir: Path, resolution: int, preset: str = "tiny") -> str:
    """A randomly initialised ``preset`` pipeline at ``resolution`` px, saved under ``out_dir``."""
    import torch

    from models import build_model
    from pipelines.diffusion.pipeline import ComposerPipeline
    from pipelines.diffusion.schedulers import default_scheduler

    torch.manual_seed(0)
    pipe = ComposerPipeline(build_model(preset, sample_size=resolution).eval(), default_scheduler())
    path = out_dir / "pipeline"
    pipe.save_pretrained(str(path))
    return str(path)


def request_body(steps: int, seed: int) -> dict[str, Any]:
    return {
        "conditions": {"text": TEXT, "palette": {"colors": COLORS}},
        "steps": steps,
        "seed": seed,
        "num_images": 1,
    }


# -- the load generator --------------------------------------------------------------------------------
async def _load(url: str, requests: int, concurrency: int, steps: int, seed0: int, timeout_s: float) -> dict:
    """``requests`` POSTs to ``url``, ``concurrency`` in flight at a time; per-request records."""
    import aiohttp

    records: list[dict[str, Any]] = []
    errors: list[str] = []
    next_index = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal next_index
            while next_index < requests:
                i = next_index
                next_index += 1
                t = time.perf_counter()
                try:
                    async with session.post(url, json=request_body(steps, seed0 + i)) as resp:
                        data = await resp.json(content_type=None)
                        status = resp.status
                except Exception as e:  # noqa: BLE001 - any failure is an error of the run
                    errors.append(f"{type(e).__name__}: {e}")
                    continue
                latency = time.perf_counter() - t
                if status != 200 or len(data.get("images", ())) != 1:
                    errors.append(f"HTTP {status}: {json.dumps(data)[:300]}")
                    continue
                records.append(
                    {
                        "latency_s": latency,
                        "batch_requests": data["batch"]["requests"],
                        "batch_samples": data["batch"]["samples"],
                        "sample_s": data["timings_s"]["sample"],
                    }
                )

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"records": records, "errors": errors, "wall_s": wall}


def run_level(url: str, requests: int, concurrency: int, steps: int, seed0: int, timeout_s: float) -> dict:
    return asyncio.run(_load(url, requests, concurrency, steps, seed0, timeout_s))


async def warm_up(urls: dict[str, str], top: int, steps: int, timeout_s: float) -> dict[str, dict]:
    """Untimed: ``2 × top`` requests at concurrency ``top``, then 2 alone, to every app at once."""

    async def one(url: str) -> dict:
        t = time.perf_counter()
        runs = [
            await _load(url, 2 * top, top, steps, WARM_SEED, timeout_s),
            await _load(url, 2, 1, steps, WARM_SEED, timeout_s),
        ]
        errors = [e for run in runs for e in run["errors"]]
        return {
            "seconds": round(time.perf_counter() - t, 2),
            "errors": len(errors),
            "error_examples": errors[:3],
        }

    done = await asyncio.gather(*(one(urls[mode]) for mode in MODES))
    return dict(zip(MODES, done, strict=True))


def summarize(runs: list[dict]) -> dict[str, Any]:
    """One app at one concurrency over all rounds: medians of requests/s, pooled latencies."""
    records = [r for run in runs for r in run["records"]]
    errors = [e for run in runs for e in run["errors"]]
    rps = [len(run["records"]) / run["wall_s"] for run in runs]
    lat = np.array([r["latency_s"] for r in records]) if records else np.zeros(1)
    batch = [r["batch_requests"] for r in records] or [0]
    # The sampling time of the model call each request was in (a call's members all report it).
    per_call = [r["sample_s"] for r in records]
    return {
        "requests_per_s": round(statistics.median(rps), 3),
        "requests_per_s_runs": [round(x, 3) for x in rps],
        "completed": len(records),
        "errors": len(errors),
        "error_examples": errors[:3],
        "latency_s": {
            "p50": round(float(np.percentile(lat, 50)), 4),
            "p95": round(float(np.percentile(lat, 95)), 4),
            "mean": round(float(lat.mean()), 4),
            "max": round(float(lat.max()), 4),
        },
        "batch_requests_mean": round(float(np.mean(batch)), 3),
        "batch_requests_max": int(max(batch)),
        "model_sample_s_mean": round(float(np.mean(per_call)), 4) if per_call else None,
        "wall_s_runs": [round(run["wall_s"], 3) for run in runs],
    }


# -- the apps ---------------------------------------------------------------------------------------------
def app_config(port: int, model_dir: str, name: str, batching: bool, args: argparse.Namespace):
    """The ``ServeConfig`` of one recompose app under ``/<name>``."""
    from pipelines.config import from_dict
    from pipelines.serve.config import ServeConfig

    top = max(args.concurrency)
    return from_dict(
        ServeConfig,
        {
            "model": model_dir,
            "port": port,
            "name": name,
            "route_prefix": f"/{name}",
            "model_deployment": {
                "num_cpus": args.model_cpus,
                "max_ongoing_requests": max(16, args.max_batch_size, top),
                "max_queued_requests": max(64, 2 * top),
            },
            "ingress": {"num_cpus": args.ingress_cpus},
            "batching": {
                "enabled": batching,
                "max_batch_size": args.max_batch_size,
                "batch_wait_timeout_s": args.batch_wait_timeout_s,
            },
        },
    )


def deploy(port: int, model_dir: str, args: argparse.Namespace) -> dict[str, str]:
    """Both apps at once (their replicas start side by side); each one's ``v1/generate`` URL."""
    from ray import serve

    from pipelines.serve.app import build_app

    targets = []
    for mode in MODES:
        cfg = app_config(port, model_dir, mode, mode == "batched", args)
        targets.append(serve.RunTarget(build_app(cfg), name=cfg.name, route_prefix=cfg.route_prefix))
    serve.run_many(targets)
    return {mode: f"http://127.0.0.1:{port}/{mode}/v1/generate" for mode in MODES}


def replica_threads(num_cpus: float) -> dict[str, Any]:
    """torch's thread count in a Ray worker with the model replica's CPU reservation."""
    import ray

    @ray.remote(num_cpus=num_cpus)
    def probe() -> dict[str, Any]:
        import torch

        return {
            "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        }

    return ray.get(probe.remote())


def benchmark(model_dir: str, port: int, args: argparse.Namespace) -> dict[str, Any]:
    t = time.perf_counter()
    urls = deploy(port, model_dir, args)
    log(f"deployed {' and '.join(MODES)} in {time.perf_counter() - t:.1f} s")
    top = max(args.concurrency)
    t = time.perf_counter()
    warmup = asyncio.run(warm_up(urls, top, args.steps, args.timeout_s))
    errors = {mode: w["errors"] for mode, w in warmup.items()}
    log(f"warm-up of both apps (side by side): {time.perf_counter() - t:.1f} s, errors {errors}")
    seed = 0
    runs: dict[str, dict[int, list[dict]]] = {m: {c: [] for c in args.concurrency} for m in MODES}
    for r in range(args.repeats):
        order = MODES if r % 2 == 0 else MODES[::-1]
        for c in args.concurrency:
            for mode in order:
                run = run_level(urls[mode], args.requests, c, args.steps, seed, args.timeout_s)
                seed += args.requests
                runs[mode][c].append(run)
                lat = [x["latency_s"] for x in run["records"]] or [math.nan]
                batch = [x["batch_requests"] for x in run["records"]] or [math.nan]
                log(
                    f"round {r + 1}/{args.repeats} c={c} {mode:9s}: "
                    f"{len(run['records']) / run['wall_s']:.2f} req/s, p50 {np.median(lat):.3f} s, "
                    f"mean batch {np.mean(batch):.2f} requests, {len(run['errors'])} errors"
                )
    results = {m: {str(c): summarize(runs[m][c]) for c in args.concurrency} for m in MODES}
    ratios: dict[str, dict[str, float | None]] = {"requests_per_s": {}, "requests_per_s_pairs_median": {}}
    ratios["p95_latency"] = {}
    for c in args.concurrency:
        b, u = results["batched"][str(c)], results["unbatched"][str(c)]
        ratios["requests_per_s"][str(c)] = round(b["requests_per_s"] / u["requests_per_s"], 3)
        pairs = [
            x / y for x, y in zip(b["requests_per_s_runs"], u["requests_per_s_runs"], strict=True) if y > 0
        ]
        ratios["requests_per_s_pairs_median"][str(c)] = round(statistics.median(pairs), 3) if pairs else None
        ratios["p95_latency"][str(c)] = round(b["latency_s"]["p95"] / u["latency_s"]["p95"], 3)
    return {"warmup": warmup, "results": results, "ratios": ratios}


def parse_levels(text: str) -> list[int]:
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"--concurrency wants positive integers, got {text!r}")
    return levels


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a saved pipeline; default: tiny, random init, made here")
    p.add_argument("--resolution", type=int, default=32, help="side of the default model's images")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per request")
    p.add_argument("--requests", type=int, default=32, help="timed requests per app, level and round")
    p.add_argument("--concurrency", type=parse_levels, default=[1, 8], help="requests in flight, e.g. 1,8")
    p.add_argument("--repeats", type=int, default=2, help="rounds; the app order alternates")
    p.add_argument("--max-batch-size", type=int, default=8, help="batching.max_batch_size (samples)")
    p.add_argument(
        "--batch-wait-timeout-s",
        type=float,
        default=Batching().batch_wait_timeout_s,
        help="batching.batch_wait_timeout_s (default: the config default)",
    )
    p.add_argument("--model-cpus", type=float, default=1.0, help="num_cpus of each model replica")
    p.add_argument("--ingress-cpus", type=float, default=0.1, help="num_cpus of each ingress replica")
    p.add_argument("--cpus", type=int, default=None, help="logical CPUs of the local Ray; default: enough")
    p.add_argument("--timeout-s", type=float, default=300.0, help="per-request client timeout")
    args = p.parse_args(argv)
    if args.requests < 1 or args.repeats < 1 or args.steps < 1:
        p.error("--requests, --repeats and --steps must be >= 1")
    import aiohttp
    import fastapi
    import ray
    import torch
    from ray import serve

    from pipelines.config import to_dict

    cores = len(os.sched_getaffinity(0))
    needed = math.ceil(len(MODES) * (args.model_cpus + args.ingress_cpus) - 1e-9)
    cpus = args.cpus or max(cores, needed)
    if cpus < needed:
        p.error(f"--cpus {cpus}: the two apps reserve {needed} CPUs")
    out: dict[str, Any] = {
        "benchmark": "serve",
        "machine": {
            "cpu": cpu_name(),
            "cores": cores,
            "ray_cpus": cpus,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ray": ray.__version__,
            "fastapi": fastapi.__version__,
            "aiohttp": aiohttp.__version__,
        },
        "args": {k: v for k, v in vars(args).items()},
        "model": args.model or f"tiny, random init, {args.resolution} px (temporary)",
        "request": request_body(args.steps, 0) | {"seed": "distinct per request"},
        "apps": {
            mode: {
                section: to_dict(getattr(app_config(1, "-", mode, mode == "batched", args), section))
                for section in ("model_deployment", "ingress", "batching")
            }
            for mode in MODES
        },
        "layout": "both apps deployed in one Serve instance, measured one at a time; Ray CPUs are logical",
        "goal": f"batched requests/s > unbatched at concurrency {max(args.concurrency)}",
        "loadavg_1min_before": round(os.getloadavg()[0], 2),
    }
    # Ray echoes its workers' output on this process's stdout (file descriptor 1): point that at
    # stderr while Ray runs and keep a copy of the real stdout for the JSON alone.
    sys.stdout.flush()
    saved_stdout = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    t_start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-serve-", ignore_cleanup_errors=True) as tmp:
            model_dir = args.model or make_model(Path(tmp), args.resolution)
            port = free_port()
            log(f"starting Ray ({cpus} logical CPUs) and Serve on 127.0.0.1:{port}")
            # address="local": a Ray of our own, never a cluster someone else started on this machine.
            ray.init(
                address="local",
                num_cpus=cpus,
                include_dashboard=False,
                logging_level="ERROR",
                log_to_driver=False,
            )
            try:
                out["replica_torch_threads"] = replica_threads(args.model_cpus)
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                out.update(benchmark(model_dir, port, args))
            finally:
                try:
                    serve.shutdown()
                finally:
                    ray.shutdown()
    finally:
        sys.stdout.flush()
        os.dup2(saved_stdout, sys.stdout.fileno())
        os.close(saved_stdout)
    top = str(max(args.concurrency))
    res = out["results"]
    out["goal_met"] = res["batched"][top]["requests_per_s"] > res["unbatched"][top]["requests_per_s"]
    out["errors_total"] = sum(r["errors"] for m in MODES for r in res[m].values())
    out["seconds_total"] = round(time.perf_counter() - t_start, 1)
    out["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
