"""A pipeline on a pretrained Stable Diffusion base (tests/helpers/tiny_sd.py), served over real HTTP:
the page and API generate from a caption's text (encoded by the export's own text encoder) and
from maps, and a masked edit keeps every outside pixel, latents decoded and composited."""

from __future__ import annotations

import numpy as np
import pytest
import requests

from tests.diffusion.test_base_pipeline import make_pipe
from tests.helpers.serve import run_app, serve_cluster
from tests.serve.test_app import R, decode, png, scene

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    from pipelines.conditions.backbone import load_base
    from tests.helpers.tiny_sd import make_tiny_sd

    root = tmp_path_factory.mktemp("base-serve")
    make_pipe(load_base(make_tiny_sd(root / "sd"))).save_pretrained(str(root / "export"))
    with serve_cluster() as port:
        yield run_app(port, str(root / "export"), "base", "/", default_steps=2)


def test_info_generation_and_exact_masked_edit(url):
    info = requests.get(url + "v1/model", timeout=30).json()
    assert info["resolution"] == R and info["caption_encoder"] == "base"
    assert info["inputs"]["caption"] == "text" and info["decomposable"]["caption"] is True
    a = png(scene(0, R))
    for cond in (
        {"text": "a red circle"},
        {"sketch": {"image": "a"}},
        {"text": "a star", "intensity": {"image": "a"}},
    ):
        r = requests.post(
            url + "v1/generate", json={"images": {"a": a}, "conditions": cond, "seed": 1}, timeout=120
        )
        assert r.status_code == 200, (cond, r.text)
        assert decode(r.json()["images"][0]).shape == (R, R, 3)
    mask = np.zeros((R, R), np.uint8)
    mask[5:19, 9:23] = 255
    body = {"source": a, "conditions": {"text": "a blue square"}, "mask": png(mask), "num_images": 2}
    r = requests.post(url + "v1/edit", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    src, m = decode(out["source_png"]), decode(out["conditions"]["mask"]["png"]) > 0
    for im in out["images"]:
        im = decode(im)
        assert np.array_equal(im[~m], src[~m]) and not np.array_equal(im[m], src[m])
