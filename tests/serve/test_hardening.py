"""The Serve app under faults: one request's failure stays its own, cancelled clients leave the
others served, the event loop stays free while big uploads decode, only allowed image formats
are read, the health check can fail, no exception text or server path reaches a caller, no
cross-site POST, every number finite, masks framed like their source.

Unit tests drive ``ComposerServer`` and ``Ingress`` directly (their classes, without Ray); the
``slow`` ones go through a real local Ray Serve over HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from pipelines.config import from_dict
from pipelines.serve.api import ApiError, Job, Refused, Sampled
from pipelines.serve.config import ServeConfig
from pipelines.serve.model import FAULT_TEXT_ENV, ComposerServer
from tests.helpers import images
from tests.helpers.serve import run_app, serve_cluster

FAULT = "a caption that makes the extractor crash"


def png(a: np.ndarray, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decode(s: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(s))))


# -- the model deployment's class, without Ray ------------------------------------------------------
@pytest.fixture
def server(tiny_model_dir, monkeypatch):
    monkeypatch.setenv(FAULT_TEXT_ENV, FAULT)
    return ComposerServer.func_or_class({"model": tiny_model_dir})


def jobs(n: int, **kw) -> list[Job]:
    return [
        Job(kind="generate", text=f"a red circle number {i}", steps=2, seed=10 + i, **kw) for i in range(n)
    ]


def test_one_jobs_failure_stays_its_own(server):
    batch = jobs(5)
    batch.insert(2, Job(kind="generate", text=FAULT, steps=2, seed=3))
    out = server._run(batch)
    refused = out.pop(2)
    assert isinstance(refused, Refused) and refused.status == 500 and refused.code == "internal_error"
    assert refused.error_id and refused.error_id in refused.message and "injected" not in refused.message
    alone = [server._run([j])[0] for j in jobs(5)]
    for a, b in zip(out, alone, strict=True):
        assert isinstance(a, Sampled) and np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 2

    # a sampling run that fails for one job is rerun one job at a time: only that job fails
    real = server.pipe.sample_batch

    def fails_with_seed_11(prepared, *args):
        if any(p.request.seed == 11 for p in prepared):
            raise RuntimeError("a kernel failed")
        return real(prepared, *args)

    server.pipe.sample_batch = fails_with_seed_11
    out = server._run(jobs(4))
    assert [type(r).__name__ for r in out] == ["Sampled", "Refused", "Sampled", "Sampled"]
    assert out[1].status == 500 and server.lost is None  # not a lost device: still healthy
    server.check_health()


def test_health_check_fails_when_the_replica_cannot_sample(server, tiny_model_dir):
    server.check_health()  # loaded and computing

    def device_lost(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    server.pipe.sample_batch = device_lost
    out = server._run(jobs(3))
    assert all(isinstance(r, Refused) and r.status == 500 for r in out)
    with pytest.raises(RuntimeError, match="can no longer sample"):
        server.check_health()

    gone = ComposerServer.func_or_class({"model": tiny_model_dir})
    gone.pipe = None
    with pytest.raises(RuntimeError, match="not loaded"):
        gone.check_health()


def test_cancelled_callers_never_strand_the_others(server):
    """Callers cancelled while their run samples (clients gone): every other job is answered,
    the worker sleeps afterwards (no spinning) and the next job runs."""

    async def scenario():
        real = server._run
        started = threading.Event()

        def slow_run(batch):
            started.set()
            time.sleep(0.5)
            return real(batch)

        server._run = slow_run
        callers = [asyncio.ensure_future(server._submit([j])) for j in jobs(8)]
        await asyncio.to_thread(started.wait, 10)
        for c in callers[::2]:
            c.cancel()
        done = await asyncio.wait_for(asyncio.gather(*callers[1::2]), timeout=60)
        assert all(isinstance(r, Sampled) for (r,) in done)
        assert all(c.cancelled() for c in callers[::2])
        # idle: the worker waits on its event instead of spinning
        await asyncio.sleep(0.2)
        assert not server.pending and not server._worker.done()
        t = time.perf_counter()
        loops = 0
        while time.perf_counter() - t < 0.2:
            await asyncio.sleep(0)
            loops += 1
        assert loops > 100  # the loop is free: a spinning worker would starve this
        server._run = real
        (after,) = await asyncio.wait_for(server._submit(jobs(1)), timeout=60)
        assert isinstance(after, Sampled)

    asyncio.run(scenario())


# -- the ingress's class, without Ray -------------------------------------------------------------
class _Unavailable:
    async def remote(self, *args):
        from ray.serve.exceptions import DeploymentUnavailableError

        raise DeploymentUnavailableError("ComposerServer at /home/someone/secret/path is gone")


class _Crashing:
    async def remote(self, *args):
        raise RuntimeError("Traceback … /home/someone/secret/path")


def test_failures_carry_an_error_id_and_no_exception_text(caplog):
    from pipelines.serve.app import Ingress

    ingress = types.SimpleNamespace(config=from_dict(ServeConfig, {}))
    for method, status in ((_Unavailable(), 503), (_Crashing(), 500)):
        with pytest.raises(ApiError) as e:
            asyncio.run(Ingress.func_or_class._call(ingress, method))
        body = e.value.body()["error"]
        assert e.value.status == status and body["id"] and body["id"] in body["message"]
        assert "secret" not in body["message"]
        assert any(body["id"] in r.getMessage() and r.exc_info for r in caplog.records)  # details logged


def test_unauthenticated_exposure_is_refused_unless_allowed(capsys):
    from jobs.serve import main

    def cfg(**kw) -> ServeConfig:
        return from_dict(ServeConfig, kw)

    assert cfg().unauthenticated_exposure() is None  # 127.0.0.1
    for host in ("localhost", "::1", "127.0.0.2"):
        assert cfg(host=host).unauthenticated_exposure() is None, host
    for host in ("0.0.0.0", "10.1.2.3", "::", "myhost.example.com"):
        assert "not a loopback address" in cfg(host=host).unauthenticated_exposure(), host
    assert cfg(host="0.0.0.0", auth={"token_env": "T"}).unauthenticated_exposure() is None
    assert cfg(host="0.0.0.0", allow_unauthenticated=True).unauthenticated_exposure() is None
    # the command refuses before it starts anything
    assert main(["--host", "0.0.0.0"]) == 2
    assert "--allow-unauthenticated" in capsys.readouterr().err


def test_config_checks_formats_and_origins():
    for bad in ({"limits": {"image_formats": ["PNG", "NOPE"]}}, {"cors_origins": ["*"]}):
        with pytest.raises(Exception, match="image formats|origin"):
            from_dict(ServeConfig, bad)


# -- through a real Serve --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app(tiny_model_dir):
    os.environ[FAULT_TEXT_ENV] = FAULT  # inherited by the replicas started below
    try:
        with serve_cluster() as port:
            yield run_app(
                port,
                tiny_model_dir,
                "hard",
                "/",
                default_steps=2,
                cors_origins=["https://allowed.example"],
                limits={"max_image_bytes": 12 * 2**20, "max_body_bytes": 16 * 2**20},
            )
    finally:
        os.environ.pop(FAULT_TEXT_ENV, None)


def post(url: str, path: str, body: dict, **kw) -> requests.Response:
    return requests.post(url + path, json=body, timeout=kw.pop("timeout", 120), **kw)


@pytest.mark.slow
def test_batch_isolation_over_http(app):
    bodies = [
        {"conditions": {"text": f"a blue star number {i}"}, "steps": 3, "seed": 40 + i} for i in range(5)
    ]
    bad = {"conditions": {"text": FAULT}, "steps": 3, "seed": 1}
    with ThreadPoolExecutor(6) as pool:
        rs = list(pool.map(lambda b: post(app, "v1/generate", b), [bad, *bodies]))
    assert rs[0].status_code == 500, rs[0].text
    err = rs[0].json()["error"]
    assert (
        err["code"] == "internal_error" and err["id"] in err["message"] and "injected" not in err["message"]
    )
    assert all(r.status_code == 200 for r in rs[1:]), [r.text[:200] for r in rs[1:]]
    assert max(r.json()["batch"]["requests"] for r in rs[1:]) >= 2  # they were batched with it
    for body, r in zip(bodies, rs[1:], strict=True):
        alone = post(app, "v1/generate", body).json()
        a, b = decode(alone["images"][0]).astype(int), decode(r.json()["images"][0]).astype(int)
        assert np.abs(a - b).max() <= 2  # the images they get alone


@pytest.mark.slow
def test_disconnected_clients_leave_the_others_served(app):
    body = {"conditions": {"text": "a green ring"}, "steps": 40}
    t = time.perf_counter()
    assert post(app, "v1/generate", {**body, "seed": 0}).status_code == 200
    normal = time.perf_counter() - t

    def one(i: int):
        try:  # the even clients give up mid-sampling and close their connections
            return post(app, "v1/generate", {**body, "seed": i}, timeout=0.3 * normal if i % 2 == 0 else 300)
        except requests.exceptions.ReadTimeout:
            return None

    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(one, range(8)))
    assert all(r is None for r in rs[::2])
    assert all(r is not None and r.status_code == 200 for r in rs[1::2]), [
        r and r.text[:200] for r in rs[1::2]
    ]
    assert requests.get(app + "healthz", timeout=10).json() == {"status": "ok"}
    t = time.perf_counter()
    assert post(app, "v1/generate", {**body, "seed": 99}).status_code == 200
    assert time.perf_counter() - t < 3 * normal + 2  # its normal time: nothing left spinning or stuck


@pytest.mark.slow
def test_health_answers_while_big_uploads_decode(app):
    """8 requests, each with 6 reference images at limits.max_image_pixels (4096 x 4096, the
    default): ~50 decodes of 16.7 MP while /healthz is polled."""
    side = 4096
    ramp = np.linspace(0, 255, side, dtype=np.float32)

    def upload(k: int) -> str:
        return png(
            ((ramp[None, :, None] * (1 + k / 7) + ramp[:, None, None] * 0.5) % 256)
            .astype(np.uint8)
            .repeat(3, 2)
        )

    refs = dict(zip("abcdef", map(upload, range(6)), strict=True))
    mask = np.zeros((side, side), np.uint8)
    mask[:100, :100] = 255
    conditions = {
        "semantics": {"image": "a"},
        "palette": {"image": "b"},
        "sketch": {"image": "c"},
        "instances": {"image": "d"},
        "intensity": {"image": "e"},
        "mask": {"mask": png(mask), "source": "f"},
    }
    body = json.dumps({"images": refs, "conditions": conditions, "steps": 1}).encode()
    latencies: list[float] = []
    assert requests.get(app + "healthz", timeout=10).status_code == 200  # connections and handles up
    with ThreadPoolExecutor(8) as pool:
        futures = [
            pool.submit(
                requests.post,
                app + "v1/generate",
                data=body,  # encoded once here: the client's own JSON encoding would skew the timings
                headers={"Content-Type": "application/json"},
                timeout=600,
            )
            for _ in range(8)
        ]
        while not all(f.done() for f in futures):
            t = time.perf_counter()
            assert requests.get(app + "healthz", timeout=10).status_code == 200
            latencies.append(time.perf_counter() - t)
            time.sleep(0.05)
        assert all(f.result().status_code == 200 for f in futures), [f.result().text[:200] for f in futures]
    assert len(latencies) >= 20, latencies  # the decoding window was sampled
    assert max(latencies) < 0.2, sorted(latencies)[-5:]


@pytest.mark.slow
def test_refusals_formats_numbers_media_types_and_what_is_shown(app, tiny_model_dir):
    scene = np.zeros((48, 64, 3), np.uint8)
    scene[10:30, 10:40] = images.RED
    # 1. only allowed image formats
    for name, make in images.OTHER_FORMATS.items():
        body = {"images": {"a": b64(make())}, "conditions": {"sketch": {"image": "a"}}}
        r = post(app, "v1/generate", body)
        assert r.status_code == 422 and r.json()["error"]["code"] == "unsupported_image_format", (
            name,
            r.text,
        )
        assert r.json()["error"]["field"] == "images.a"
    # 2. every number finite
    for body in (
        {"conditions": {"text": "x"}, "guidance": "text=nan"},
        {"conditions": {"text": "x"}, "guidance": "inf"},
        {"conditions": {"text": "x"}, "guidance": {"text": float("nan")}},
        {"conditions": {"palette": {"colors": ["#f00", "#00f"], "weights": [1.0, float("inf")]}}},
        {"conditions": {"palette": {"colors": ["#f00"], "weights": [float("nan")]}}},
    ):
        data = json.dumps(body)  # NaN/Infinity literals, as Python's json writes them
        r = requests.post(
            app + "v1/generate", data=data, headers={"Content-Type": "application/json"}, timeout=60
        )
        assert r.status_code == 422, (body, r.status_code, r.text[:200])
    # 3. a mask framed unlike its source is refused, not stretched
    square_mask = png(np.full((64, 64), 255, np.uint8))
    body = {"images": {"a": png(scene)}, "conditions": {"mask": {"mask": square_mask, "source": "a"}}}
    r = post(app, "v1/generate", body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "mask_aspect_mismatch", r.text
    edit = {"source": png(scene), "conditions": {"text": "a blue square"}, "mask": square_mask, "steps": 2}
    r = post(app, "v1/edit", edit)
    assert r.status_code == 422 and r.json()["error"]["field"] == "mask", r.text
    same_ratio = png(np.pad(np.full((12, 16), 255, np.uint8), ((6, 6), (8, 8))))  # 24x32: same 3:4
    assert post(app, "v1/edit", {**edit, "mask": same_ratio}).status_code == 200
    # 4. no cross-site POST: a form's text/plain body is refused before it is parsed
    form = requests.post(
        app + "v1/generate",
        data='{"conditions": {"text": "x"}}',
        headers={"Content-Type": "text/plain"},
        timeout=30,
    )
    assert form.status_code == 415 and form.json()["error"]["code"] == "unsupported_media_type"
    # CORS only for the configured origin
    stranger = requests.get(app + "v1/model", headers={"Origin": "https://evil.example"}, timeout=30)
    assert not any(h.lower().startswith("access-control") for h in stranger.headers)
    pre = requests.options(
        app + "v1/generate",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        timeout=30,
    )
    assert "access-control-allow-origin" not in {h.lower() for h in pre.headers}
    ok = requests.get(app + "v1/model", headers={"Origin": "https://allowed.example"}, timeout=30)
    assert ok.headers["Access-Control-Allow-Origin"] == "https://allowed.example"
    # 5. what callers see: status only from /healthz, a model name and version, no server path
    assert requests.get(app + "healthz", timeout=30).json() == {"status": "ok"}
    info = requests.get(app + "v1/model", timeout=30)
    assert info.json()["model"] == "/".join(Path(tiny_model_dir).parts[-2:])  # its name, not its path
    assert len(info.json()["version"]) == 12
    assert tiny_model_dir not in info.text and str(os.path.dirname(tiny_model_dir)) not in info.text
