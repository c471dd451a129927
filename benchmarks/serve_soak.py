"""A bounded soak of the Serve app on loopback: valid and malformed requests mixed, a fixed count.

    python benchmarks/serve_soak.py [--model DIR] [--requests 520] [--concurrency 16] [--steps 2]

One local Ray and Serve on a free 127.0.0.1 port with one recompose app (``build_app``, the
config defaults, the model deployment and ingress one replica each). An asyncio client keeps
``--concurrency`` requests in flight until ``--requests`` have been answered, cycling through a
fixed mix (``MIX``): valid generations with every condition kind (text, semantics, palette from
colours and from an image, sketch / instances / intensity from an image, sketch and depth maps,
a mask, all of them together, an edit), and invalid requests from a corpus of malformed bodies
and images, each with the 4xx status and error code it must get. It stops by itself and prints
one JSON object on stdout:

- ``valid``: count, failures (must be 0), latency p50 / p95 / max (s);
- ``invalid``: count, mismatches (answers other than the expected status and code; must be 0);
- ``rss_mb``: the model replica's and the ingress replica's resident memory, averaged over the
  first and over the last ``--window`` (100) answers (sampled after each), and their growth (goal < 10%).

The model is a random-init tiny pipeline at 32 px unless ``--model`` names one.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import numpy as np  # noqa: E402

from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.serve import free_port, log, make_model  # noqa: E402

WINDOW = 100  # default answers in each of the first and last RSS windows


def _png(a: np.ndarray, fmt: str = "PNG") -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def _scene(i: int) -> np.ndarray:
    from pipelines.data.scene import render_sample

    return render_sample(0, "train", i, 64).image


def mix(steps: int) -> list[tuple[str, str, Any, int, str | None]]:
    """(name, path, body, expected status, expected error code): bytes bodies are sent as they
    are (with the content type in the name's suffix), dicts as JSON."""
    a, b = _png(_scene(0)), _png(_scene(1))
    images = {"a": a, "b": b}
    ramp = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))
    mask = _png(np.pad(np.full((16, 16), 255, np.uint8), 24))
    wide_mask = _png(np.full((32, 64), 255, np.uint8))
    eps = base64.b64encode(_eps()).decode()

    def gen(conditions: dict, **kw: Any) -> dict:
        return {"images": images, "conditions": conditions, "steps": steps, **kw}

    valid = [
        ("text", "v1/generate", {"conditions": {"text": "a red circle above a blue star"}, "steps": steps}),
        ("semantics", "v1/generate", gen({"semantics": {"image": "a"}})),
        (
            "palette colours",
            "v1/generate",
            {"conditions": {"palette": {"colors": ["#f00", "#00f"]}}, "steps": steps},
        ),
        ("palette image", "v1/generate", gen({"palette": {"image": "b"}})),
        ("sketch image", "v1/generate", gen({"sketch": {"image": "a"}})),
        ("instances image", "v1/generate", gen({"instances": {"image": "b"}})),
        ("intensity image", "v1/generate", gen({"intensity": {"image": "a"}})),
        ("depth map", "v1/generate", {"conditions": {"depth": {"map": _png(ramp)}}, "steps": steps}),
        (
            "sketch map",
            "v1/generate",
            {"conditions": {"sketch": {"map": _png(np.eye(32, dtype=np.uint8) * 255)}}, "steps": steps},
        ),
        ("mask", "v1/generate", gen({"mask": {"mask": mask, "source": "a"}, "text": "a green ring"})),
        (
            "everything",
            "v1/generate",
            gen(
                {
                    "text": "a blue square",
                    "semantics": {"image": "a"},
                    "palette": {"image": "b"},
                    "sketch": {"image": "a"},
                    "instances": {"image": "b"},
                    "intensity": {"image": "a"},
                },
                guidance={"text": 4, "sketch": 2},
                num_images=2,
            ),
        ),
        (
            "edit",
            "v1/edit",
            {"source": a, "conditions": {"text": "a yellow star"}, "mask": mask, "steps": steps},
        ),
        ("decompose", "v1/decompose", {"image": a, "conditions": ["palette", "sketch"]}),
    ]
    invalid = [
        ("not json", "v1/generate", b'{"conditions": ', 400, "invalid_json"),
        (
            "text/plain form",
            "v1/generate:text/plain",
            b'{"conditions": {"text": "x"}}',
            415,
            "unsupported_media_type",
        ),
        ("unknown condition", "v1/generate", {"conditions": {"colour": "red"}}, 422, "unknown_condition"),
        ("unknown field", "v1/generate", {"conditions": {"text": "x"}, "colour": 1}, 422, "unknown_field"),
        (
            "nan guidance",
            "v1/generate",
            {"conditions": {"text": "x"}, "guidance": "text=nan"},
            422,
            "invalid_guidance",
        ),
        (
            "guidance names a missing condition",
            "v1/generate",
            {"conditions": {"text": "x"}, "guidance": "sketch=3"},
            422,
            "invalid_guidance",
        ),
        ("too many steps", "v1/generate", {"conditions": {"text": "x"}, "steps": 10**6}, 422, "out_of_range"),
        (
            "not base64",
            "v1/generate",
            gen({"sketch": {"image": "a"}}) | {"images": {"a": "%%%"}},
            422,
            "invalid_image",
        ),
        (
            "random bytes",
            "v1/generate",
            gen({"sketch": {"image": "a"}}) | {"images": {"a": base64.b64encode(os.urandom(512)).decode()}},
            422,
            "undecodable_image",
        ),
        (
            "eps image",
            "v1/generate",
            gen({"sketch": {"image": "a"}}) | {"images": {"a": eps}},
            422,
            "unsupported_image_format",
        ),
        ("unknown image name", "v1/generate", gen({"sketch": {"image": "zzz"}}), 422, "unknown_image"),
        (
            "mask framed unlike its source",
            "v1/generate",
            gen({"mask": {"mask": wide_mask, "source": "a"}}),
            422,
            "mask_aspect_mismatch",
        ),
        (
            "empty mask",
            "v1/edit",
            {"source": a, "conditions": {"text": "x"}, "mask": _png(np.zeros((64, 64), np.uint8))},
            422,
            "empty_mask",
        ),
        ("edit without a condition", "v1/edit", {"source": a, "conditions": {}}, 422, "invalid_request"),
    ]
    return [(n, p, body, 200, None) for n, p, body in valid] + invalid


def _eps() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "EPS")
    return buf.getvalue()


def _rss(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def replica_pids(app: str) -> dict[str, int]:
    """The processes of the app's two replicas, by the title Ray gives an actor's process."""
    import psutil

    pids = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        for deployment in ("ComposerServer", "Ingress"):
            if title.startswith(f"ray::ServeReplica:{app}:{deployment}"):
                pids[deployment] = proc.info["pid"]
    if len(pids) != 2:
        raise RuntimeError(f"found the processes of {sorted(pids)} only, not both replicas of {app!r}")
    return pids


async def soak(
    url: str, cases: list, total: int, concurrency: int, pids: dict[str, int], window: int = WINDOW
) -> dict[str, Any]:
    import aiohttp

    results: list[dict[str, Any]] = []
    rss: dict[str, list[tuple[int, float]]] = {d: [] for d in pids}
    counter = iter(range(total))

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        name, path, body, status, code = cases[i % len(cases)]
        path, _, media = path.partition(":")
        if isinstance(body, bytes):
            data, headers = body, {"Content-Type": media or "application/json"}
        else:
            if "seed" not in body and status == 200 and path != "v1/decompose":
                body = {**body, "seed": i}
            data, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
        t = time.perf_counter()
        try:
            async with session.post(url + path, data=data, headers=headers) as r:
                text = await r.text()
                got_status = r.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            got_status, text = -1, f"{type(e).__name__}: {e}"
        latency = time.perf_counter() - t
        got_code = None
        if got_status >= 400:
            try:
                got_code = json.loads(text)["error"]["code"]
            except (ValueError, KeyError, TypeError):
                got_code = "?"
        ok = got_status == status and (code is None or got_code == code)
        n = len(results)
        results.append(
            {
                "name": name,
                "valid": status == 200,
                "ok": ok,
                "latency": latency,
                "got": [got_status, got_code],
            }
        )
        if n < window or n >= total - window:
            for d, pid in pids.items():
                rss[d].append((n, _rss(pid)))

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in counter:
            await one(session, i)

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
    valid = [r for r in results if r["valid"]]
    invalid = [r for r in results if not r["valid"]]
    lat = sorted(r["latency"] for r in valid)
    rss_out = {}
    for d, points in rss.items():
        first = statistics.mean(v for n, v in points if n < window)
        last = statistics.mean(v for n, v in points if n >= total - window)
        rss_out[d] = {
            "first": round(first, 1),
            "last": round(last, 1),
            "growth": round(last / first - 1, 4),
        }
    return {
        "requests": len(results),
        "valid": {
            "count": len(valid),
            "failures": sum(not r["ok"] for r in valid),
            "failed": sorted({f"{r['name']}: {r['got']}" for r in valid if not r["ok"]}),
            "latency_s": {
                "p50": round(lat[len(lat) // 2], 3),
                "p95": round(lat[min(len(lat) - 1, int(len(lat) * 0.95))], 3),
                "max": round(lat[-1], 3),
            },
        },
        "invalid": {
            "count": len(invalid),
            "mismatches": sum(not r["ok"] for r in invalid),
            "mismatched": sorted({f"{r['name']}: {r['got']}" for r in invalid if not r["ok"]}),
        },
        "rss_mb": rss_out,
        "goal": "0 valid failures, 0 invalid mismatches, RSS growth < 10%",
        "passed": bool(
            valid
            and not any(not r["ok"] for r in results)
            and all(v["growth"] < 0.10 for v in rss_out.values())
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a saved pipeline; default: tiny random init at 32 px")
    p.add_argument("--requests", type=int, default=520, help="answers to collect (>= 2 x 100)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--steps", type=int, default=2, help="DDIM steps of the valid generations")
    p.add_argument("--window", type=int, default=WINDOW, help="answers in each RSS window (first, last)")
    args = p.parse_args(argv)
    if args.window < 1 or args.requests < 2 * args.window or args.concurrency < 1 or args.steps < 1:
        p.error("--requests must be >= 2 x --window; --window, --concurrency and --steps >= 1")
    import ray
    import torch
    from ray import serve

    from pipelines.config import from_dict
    from pipelines.serve.app import build_app
    from pipelines.serve.config import ServeConfig

    sys.stdout.flush()
    saved_stdout = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # Ray's echo to stderr; stdout keeps the JSON
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-soak-", ignore_cleanup_errors=True) as tmp:
            model_dir = args.model or make_model(Path(tmp), 32)
            port = free_port()
            ray.init(address="local", include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": port})
                cfg = from_dict(ServeConfig, {"model": model_dir, "port": port, "name": "soak"})
                serve.run(build_app(cfg), name="soak", route_prefix="/")
                url = f"http://127.0.0.1:{port}/"
                cases = mix(args.steps)
                log(f"soaking {url} with {args.requests} requests at concurrency {args.concurrency}")
                out = asyncio.run(
                    soak(url, cases, args.requests, args.concurrency, replica_pids("soak"), args.window)
                )
            finally:
                serve.shutdown()
                ray.shutdown()
    finally:
        os.dup2(saved_stdout, sys.stdout.fileno())
    out = {
        "benchmark": "serve_soak",
        "machine": {
            "cpu": cpu_name(),
            "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
        },
        "torch": torch.__version__,
        "ray": ray.__version__,
        "args": vars(args),
        "mix": {"cases": len(cases), "valid": sum(c[3] == 200 for c in cases)},
        **out,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(out, indent=2))
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
