"""The serve stage: the condition subsets its HTTP client asks for, how a refusal reads, and the
two Serve apps (the trained model at /, the shipped reference model at /reference)."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from pipelines.files import encode_png
from pipelines.quickstart.client import (
    Reference,
    ServeClient,
    centre_mask,
    condition_subsets,
    generate_subsets,
)
from pipelines.quickstart.results import QuickstartError, ServeResult, TrainResult, read_record
from pipelines.quickstart.run import Quickstart

REF = Reference(png=encode_png(np.zeros((8, 12, 3), np.uint8)), text="a red circle")
DECOMPOSABLE = {"caption": True, "palette": True, "sketch": True, "depth": "no weights", "mask": True}
# the reference app (under /reference) cannot decompose palette: palette and all are left out for it
REFERENCE_DECOMPOSABLE = {**DECOMPOSABLE, "palette": "no weights"}


def test_centre_mask_is_the_central_square_half_the_side():
    mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(centre_mask(REF.png)))))
    assert mask.shape == (8, 12)
    assert (mask[2:6, 3:9] == 255).all() and mask.sum() == 255 * 4 * 6


def test_subsets_caption_each_map_mask_and_all():
    subsets = condition_subsets(["palette", "sketch"], REF)
    assert list(subsets) == ["caption", "palette", "sketch", "mask+caption", "all"]
    assert subsets["caption"] == {"text": "a red circle"}
    assert subsets["palette"] == {"palette": {"image": "a"}}
    assert subsets["mask+caption"]["mask"]["source"] == "a"
    assert set(subsets["all"]) == {"text", "palette", "sketch"}
    assert "all" not in condition_subsets([], REF)


class _Serve(BaseHTTPRequestHandler):
    """/v1/model and /v1/generate as Serve answers them, for the app at / and the one at
    /reference (which answers with other PNGs); /v1/generate with sketch is refused."""

    requests: list[dict] = []
    paths: list[str] = []  # of every POST, in order

    def log_message(self, *args):
        pass

    def _answer(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        assert self.path in ("/v1/model", "/reference/v1/model"), self.path
        ref = self.path.startswith("/reference/")
        self._answer(200, {"decomposable": REFERENCE_DECOMPOSABLE if ref else DECOMPOSABLE})

    def do_POST(self):
        assert self.path in ("/v1/generate", "/reference/v1/generate"), self.path
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        type(self).paths.append(self.path)
        if "sketch" in body["conditions"] and self.server.refuse_sketch:
            return self._answer(422, {"detail": "sketch: no"})
        png = base64.b64encode(THEIRS if self.path.startswith("/reference/") else REF.png).decode()
        given = {c: {"png": png} for c in body["conditions"] if c in ("palette", "sketch")}
        self._answer(
            200, {"images": [png] * body["num_images"], "conditions": given, "timings_s": {"total": 0.1}}
        )


@pytest.fixture
def serve_stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Serve)
    server.refuse_sketch = False
    _Serve.requests = []
    _Serve.paths = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_generate_subsets_writes_every_png_and_the_record(tmp_path, serve_stub):
    client = ServeClient(f"http://127.0.0.1:{serve_stub.server_address[1]}")
    result = generate_subsets(client, REF, tmp_path, steps=2, num_images=2)
    assert [g.subset for g in result.generations] == ["caption", "palette", "sketch", "mask+caption", "all"]
    assert "images" not in _Serve.requests[0]  # caption only: no image sent
    assert all(r["steps"] == 2 and r["seed"] == 0 for r in _Serve.requests)
    mask = result.generations[3]
    assert mask.conditions == ["mask", "text"] and list(mask.given) == ["mask"]
    assert result.generations[4].given == {
        "palette": "all-given-palette.png",
        "sketch": "all-given-sketch.png",
    }
    for g in result.generations:
        assert len(g.images) == 2
        for f in [*g.images, *g.given.values()]:
            assert (tmp_path / f).read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "reference.png").read_bytes() == REF.png
    assert read_record(ServeResult, tmp_path / "generations.json") == result


THEIRS = encode_png(np.full((8, 12, 3), 255, np.uint8))  # what the reference app generates


def test_the_reference_app_gets_the_same_requests_into_its_own_folder(tmp_path, serve_stub):
    base = f"http://127.0.0.1:{serve_stub.server_address[1]}"
    result = generate_subsets(
        ServeClient(base),
        REF,
        tmp_path,
        steps=2,
        num_images=2,
        reference_app=ServeClient(base + "/reference"),
    )
    subsets = ["caption", "palette", "sketch", "mask+caption", "all"]
    assert [g.subset for g in result.generations] == subsets
    # what it can decompose, in the same order, after the trained model's
    assert [g.subset for g in result.reference] == ["caption", "sketch", "mask+caption"]
    assert _Serve.paths == ["/v1/generate"] * 5 + ["/reference/v1/generate"] * 3
    mine = dict(zip(subsets, _Serve.requests[:5], strict=True))
    for g, body in zip(result.reference, _Serve.requests[5:], strict=True):
        assert body == mine[g.subset]  # the same conditions, seed, steps and image
    for g in result.reference:
        assert len(g.images) == 2
        for f in g.images:
            assert (tmp_path / "reference" / f).read_bytes() == THEIRS
            assert (tmp_path / f).read_bytes() == REF.png  # the trained model's, unchanged
    assert result.reference[1].given == {"sketch": "sketch-given-sketch.png"}
    assert (tmp_path / "reference" / "sketch-given-sketch.png").is_file()
    assert read_record(ServeResult, tmp_path / "generations.json") == result


def test_without_a_reference_app_the_record_has_no_reference_generations(tmp_path, serve_stub):
    client = ServeClient(f"http://127.0.0.1:{serve_stub.server_address[1]}")
    result = generate_subsets(client, REF, tmp_path, steps=2, num_images=1)
    assert result.reference == [] and not (tmp_path / "reference").exists()
    assert json.loads((tmp_path / "generations.json").read_text())["reference"] == []


def test_a_refused_request_is_reported_with_its_status_and_body(tmp_path, serve_stub):
    serve_stub.refuse_sketch = True
    client = ServeClient(f"http://127.0.0.1:{serve_stub.server_address[1]}")
    with pytest.raises(QuickstartError, match=r"POST /v1/generate: HTTP 422: .*sketch: no"):
        generate_subsets(client, REF, tmp_path, steps=2, num_images=1)


# -- the serve stage: deploying both apps ---------------------------------------------------------
def _deployed(monkeypatch) -> list:
    """The configs ``launch.deploy`` is called with (nothing is deployed)."""
    from pipelines.serve import launch

    configs = []

    def deploy(cfg):
        configs.append(cfg)
        return f"http://127.0.0.1:{cfg.port}{cfg.route_prefix.rstrip('/')}/"

    monkeypatch.setattr(launch, "deploy", deploy)
    return configs


def test_the_reference_model_is_deployed_as_a_second_app_that_fits_two_cpus(
    tmp_path, monkeypatch, reference_model
):
    configs = _deployed(monkeypatch)
    qs = Quickstart(tmp_path / "qs", fast=True, port=8123)
    assert qs.deploy("/w/train/export") == ("http://127.0.0.1:8123", "http://127.0.0.1:8123/reference")
    mine, theirs = configs
    assert (mine.name, mine.route_prefix, mine.model, mine.port) == (
        "recompose",
        "/",
        "/w/train/export",
        8123,
    )
    # its directory (checked here, loaded by the replicas), on the same port
    assert (theirs.name, theirs.route_prefix, theirs.model, theirs.port) == (
        "reference",
        "/reference",
        str(reference_model),
        8123,
    )
    # every replica fits the local Ray of a 2-CPU machine, with room to spare
    cpus = sum(
        c.model_deployment.num_cpus * c.model_deployment.num_replicas
        + c.ingress.num_cpus * c.ingress.num_replicas
        for c in configs
    )
    assert cpus <= 1.5
    assert [qs.web_page(a) for a in ("recompose", "reference")] == [
        "http://127.0.0.1:8123/",
        "http://127.0.0.1:8123/reference/",
    ]


def test_without_a_reference_model_only_the_trained_one_is_deployed(
    tmp_path, monkeypatch, no_reference_model
):
    configs = _deployed(monkeypatch)
    qs = Quickstart(tmp_path / "qs", fast=True, port=8123)
    assert qs.deploy("/w/train/export") == ("http://127.0.0.1:8123", None)
    assert [c.name for c in configs] == ["recompose"]


def _synth(out):
    """A `recompose synth` shard's first row: what the serve stage conditions on."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist([{"image": REF.png, "caption": REF.text}]), out / "part-00000.parquet"
    )


@pytest.mark.parametrize("installed", [True, False])
def test_the_serve_stage_asks_both_apps_and_shuts_serve_down(tmp_path, monkeypatch, serve_stub, installed):
    from ray import serve

    base = f"http://127.0.0.1:{serve_stub.server_address[1]}"
    monkeypatch.setattr(
        Quickstart, "deploy", lambda self, export: (base, base + "/reference" if installed else None)
    )
    shutdowns = []
    monkeypatch.setattr(serve, "shutdown", lambda: shutdowns.append(1))
    qs = Quickstart(tmp_path / "qs", fast=True)
    _synth(qs.paths["synth"])
    train = TrainResult("/w/train", "/w/train/export", 6, None, None, None, None, 1.0)
    result = qs._serve(train)
    assert shutdowns == [1]
    assert result.url == base and len(result.generations) == 5
    assert [g.subset for g in result.reference] == (
        ["caption", "sketch", "mask+caption"] if installed else []
    )
    assert all(len(g.images) == qs.plan.http_images for g in [*result.generations, *result.reference])
    assert (qs.paths["serve"] / "reference").is_dir() == installed


@pytest.mark.parametrize("serving", [True, False])
def test_the_last_lines_name_both_web_pages(monkeypatch, serving):
    from pipelines.quickstart import run

    lines = []
    monkeypatch.setattr(run.log, "info", lambda msg, *args: lines.append(msg % args))
    summary = Quickstart("/w/qs", fast=True, port=8123).summary(
        TrainResult("/w/train", "/w/train/export", 6, None, None, None, None, 1.0), 1.0
    )
    run._log_summary(summary, serving, "http://127.0.0.1:8123/reference/")
    pages = [line for line in lines if "http://127.0.0.1:8123/" in line]
    assert pages[0].startswith("  web page     http://127.0.0.1:8123/")
    assert pages[1].startswith("  reference    http://127.0.0.1:8123/reference/")
    assert ("serve it again" in pages[0]) == (not serving)
    run._log_summary(summary, serving, None)  # no reference model: no line for it
    assert sum("/reference/" in line for line in lines) == 1
