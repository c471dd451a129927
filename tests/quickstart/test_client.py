"""The serve stage's HTTP client: the condition subsets it asks for and how a refusal reads."""

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
from pipelines.quickstart.results import QuickstartError, ServeResult, read_record

REF = Reference(png=encode_png(np.zeros((8, 12, 3), np.uint8)), text="a red circle")
DECOMPOSABLE = {"caption": True, "palette": True, "sketch": True, "depth": "no weights", "mask": True}


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
    """/v1/model and /v1/generate as Serve answers them; /v1/generate with sketch is refused."""

    requests: list[dict] = []

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
        self._answer(200, {"decomposable": DECOMPOSABLE})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        if "sketch" in body["conditions"] and self.server.refuse_sketch:
            return self._answer(422, {"detail": "sketch: no"})
        png = base64.b64encode(REF.png).decode()
        given = {c: {"png": png} for c in body["conditions"] if c in ("palette", "sketch")}
        self._answer(
            200, {"images": [png] * body["num_images"], "conditions": given, "timings_s": {"total": 0.1}}
        )


@pytest.fixture
def serve_stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Serve)
    server.refuse_sketch = False
    _Serve.requests = []
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


def test_a_refused_request_is_reported_with_its_status_and_body(tmp_path, serve_stub):
    serve_stub.refuse_sketch = True
    client = ServeClient(f"http://127.0.0.1:{serve_stub.server_address[1]}")
    with pytest.raises(QuickstartError, match=r"POST /v1/generate: HTTP 422: .*sketch: no"):
        generate_subsets(client, REF, tmp_path, steps=2, num_images=1)
