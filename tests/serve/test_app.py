"""The Serve app over real HTTP: a local Ray Serve with two apps of a tiny 32 px pipeline, one
of a pipeline on a pretrained Stable Diffusion base and one of a cascade, one Ray + Serve start
for all four.

``main`` at ``/`` (no auth, batching on, small body/image limits to test 413s), ``strict``
at ``/strict`` (bearer auth, one request at a time and a queue of one, to test backpressure) and
``base`` at ``/base`` (tests/helpers/tiny_sd.py: captions as text through the export's own text
encoder, latents decoded and composited in a masked edit) and ``cascade`` at ``/cascade`` (a 16 px
base and a 16→32 upsampler: generation, edits and outpainting at 32 px, ``/v1/upscale``).
"""

from __future__ import annotations

import base64
import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from models import CONDITIONS
from pipelines.data.scene import render_sample
from tests.helpers.cascade import make_cascade
from tests.helpers.serve import run_app, serve_cluster

pytestmark = pytest.mark.slow

R = 32
TOKEN_ENV = "RECOMPOSE_TEST_SERVE_TOKEN"
TOKEN = "test-token-7f3a"


def png(a: np.ndarray, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def scene(i: int, size: int = 64) -> np.ndarray:
    return render_sample(0, "train", i, size).image


@pytest.fixture(scope="module")
def apps(tiny_model_dir, tmp_path_factory):
    from pipelines.conditions.backbone import load_base
    from tests.diffusion.test_base_pipeline import make_pipe
    from tests.helpers.tiny_sd import make_tiny_sd

    root = tmp_path_factory.mktemp("base-serve")
    make_pipe(load_base(make_tiny_sd(root / "sd"))).save_pretrained(str(root / "export"))
    os.environ[TOKEN_ENV] = TOKEN  # inherited by the Ray workers started below
    try:
        with serve_cluster() as port:
            main = run_app(
                port,
                tiny_model_dir,
                "main",
                "/",
                limits={
                    "max_body_bytes": 2_000_000,
                    "max_image_bytes": 1_000_000,
                    "max_image_pixels": 1_000_000,
                },
                default_steps=2,
            )
            strict = run_app(
                port,
                tiny_model_dir,
                "strict",
                "/strict",
                auth={"token_env": TOKEN_ENV},
                model_deployment={"num_cpus": 0.5, "max_ongoing_requests": 1, "max_queued_requests": 1},
                batching={"enabled": False},
                backpressure={"status_code": 503, "retry_after_s": 2},
            )
            base = run_app(port, str(root / "export"), "base", "/base", default_steps=2)
            cascade = run_app(
                port,
                str(make_cascade(root, prior=True, ensemble_base=True)),
                "cascade",
                "/cascade",
                default_steps=2,
                default_upsampler_steps=2,
                model_deployment={"num_cpus": 0.1},
                ingress={"num_cpus": 0.05},
            )
            yield {"main": main, "strict": strict, "base": base, "cascade": cascade}
    finally:
        os.environ.pop(TOKEN_ENV, None)


def post(url: str, path: str, body: dict, **kw) -> requests.Response:
    return requests.post(url + path, json=body, timeout=120, **kw)


def stats(url: str, **kw) -> dict:
    return requests.get(url + "v1/model", timeout=30, **kw).json()["stats"]


def test_health_model_info_and_openapi(apps):
    url = apps["main"]
    assert requests.get(url + "healthz", timeout=30).json() == {"status": "ok"}
    info = requests.get(url + "v1/model", timeout=30).json()
    assert info["resolution"] == R
    assert info["conditions"] == list(CONDITIONS)
    assert info["decomposable"]["sketch"] is True
    assert "depth" in info["decomposable"]["depth"]  # no depth weights: the reason, not True
    assert info["limits"]["max_body_bytes"] == 2_000_000 and info["auth"] is False
    spec = requests.get(url + "openapi.json", timeout=30).json()
    for path in ("/v1/generate", "/v1/edit", "/v1/decompose", "/v1/model", "/healthz"):
        assert path in spec["paths"], path
    assert "GenerateBody" in spec["components"]["schemas"]
    page = requests.get(url, timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()


SINGLE = {
    "text": {"text": "a red circle above a blue star"},
    "semantics": {"semantics": {"image": "a"}},
    "palette (colours)": {"palette": {"colors": ["#ff0000", "#00f"], "weights": [3, 1]}},
    "palette (image)": {"palette": {"image": "b"}},
    "sketch (image)": {"sketch": {"image": "a"}},
    "instances (image)": {"instances": {"image": "b"}},
    "intensity (image)": {"intensity": {"image": "a"}},
    "depth (map)": {"depth": {"map": png(np.tile(np.arange(R, dtype=np.uint8) * 8, (R, 1)))}},
    "sketch (map)": {"sketch": {"map": png((np.eye(R) * 255).astype(np.uint8))}},
    "mask": {"mask": {"mask": png(np.pad(np.full((8, 8), 255, np.uint8), 12)), "source": "a"}},
}


def test_generate_with_each_single_representation_and_a_mix(apps):
    url = apps["main"]
    images = {"a": png(scene(0)), "b": png(scene(1))}
    for label, cond in SINGLE.items():
        r = post(url, "v1/generate", {"images": images, "conditions": cond, "num_images": 2, "seed": 3})
        assert r.status_code == 200, (label, r.text)
        out = r.json()
        assert len(out["images"]) == 2 and out["steps"] == 2, label  # default_steps
        for im in out["images"]:
            assert decode(im).shape == (R, R, 3), label
        name = next(iter(cond))
        name = "caption" if name == "text" else name
        assert set(out["conditions"]) == {name}, label
        assert out["guidance"]["targets"][0]["c2"] == [name], label
        if name != "caption":
            assert decode(out["conditions"][name]["png"]).shape[:2] in ((R, R), (32, 256)), label
    mix = {
        k: v
        for c in ("text", "semantics", "palette (colours)", "sketch (image)", "depth (map)")
        for k, v in SINGLE[c].items()
    }
    body = {"images": images, "conditions": mix, "guidance": {"text": 4, "sketch": 2}, "steps": 3, "seed": 5}
    first = post(url, "v1/generate", body)
    assert first.status_code == 200, first.text
    out = first.json()
    assert set(out["conditions"]) == {"caption", "semantics", "palette", "sketch", "depth"}
    assert out["guidance"]["c1"] == ["depth", "palette", "semantics"] and out["guidance"]["branches"] == 3
    again = post(url, "v1/generate", body).json()
    assert again["images"] == out["images"]  # same seed, same images
    other = post(url, "v1/generate", {**body, "seed": 6}).json()
    assert other["images"] != out["images"]


def test_paint_with_words_and_guidance_schedules_through_the_api(apps):
    """``paint`` (phrase -> region PNG) changes the samples and is echoed; a phrase the caption
    lacks, paint without a caption and an empty region are 422s. A guidance schedule given as a
    mapping is the text form's, and a window that ends before it starts is refused."""
    url = apps["main"]
    region = np.zeros((R, R), np.uint8)
    region[: R // 2, : R // 2] = 255
    caption = {"text": "a red circle above a blue star"}
    body = {"conditions": caption, "steps": 3, "seed": 1}
    plain = post(url, "v1/generate", body).json()
    painted = post(url, "v1/generate", {**body, "paint": {"red circle": png(region)}, "paint_weight": 4})
    assert painted.status_code == 200, painted.text
    out = painted.json()
    assert out["paint"] == {"weight": 4.0, "phrases": ["red circle"]} and out["images"] != plain["images"]
    for bad, code in [
        ({"paint": {"green square": png(region)}}, "invalid_request"),
        ({"conditions": {}, "paint": {"red circle": png(region)}}, "invalid_request"),
        ({"paint": {"red circle": png(np.zeros((R, R), np.uint8))}}, "empty_mask"),
    ]:
        r = post(url, "v1/generate", {**body, **bad})
        assert r.status_code == 422 and r.json()["error"]["code"] == code, (bad, r.text)
    assert (
        "not in the caption"
        in post(url, "v1/generate", {**body, "paint": {"green square": png(region)}}).text
    )
    mapping = {"text": {"weight": 4, "window": [0, 0.5], "shape": "decay"}}
    a = post(url, "v1/generate", {**body, "guidance": mapping}).json()
    b = post(url, "v1/generate", {**body, "guidance": "text=4@0:0.5,decay"}).json()
    assert a["images"] == b["images"] and a["images"] != plain["images"]
    assert a["guidance"]["targets"][0] | {"c2": None} == {
        "c2": None,
        "weight": 4.0,
        "window": [0.0, 0.5],
        "shape": "decay",
    }
    r = post(url, "v1/generate", {**body, "guidance": {"text": {"weight": 4, "window": [0.8, 0.2]}}})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_guidance", r.text


def test_concurrent_requests_are_batched_and_match_single_runs(apps):
    url = apps["main"]
    bodies = [
        {"conditions": {"text": f"a red circle number {i}"}, "steps": 3, "seed": 100 + i, "num_images": 1}
        for i in range(6)
    ]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda b: post(url, "v1/generate", b), bodies))
    assert all(r.status_code == 200 for r in together), [r.text for r in together]
    assert max(r.json()["batch"]["requests"] for r in together) >= 2  # @serve.batch grouped some
    for body, r in zip(bodies, together, strict=True):
        alone = post(url, "v1/generate", body).json()
        assert alone["batch"]["requests"] == 1
        a, b = decode(alone["images"][0]).astype(int), decode(r.json()["images"][0]).astype(int)
        assert np.abs(a - b).max() <= 2  # the same noise and conditions; only float rounding differs


def test_decompose_and_maps_round_trip(apps):
    url = apps["main"]
    r = post(url, "v1/decompose", {"image": png(scene(2))})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["resolution"] == R and decode(out["image_png"]).shape == (R, R, 3)
    reps = out["representations"]
    assert set(reps) == {"semantics", "palette", "sketch", "instances", "intensity"}
    assert "depth" in out["unavailable"]
    assert len(reps["palette"]["values"]) == 156 and abs(sum(reps["palette"]["values"]) - 1) < 1e-2
    assert reps["palette"]["colors"] and reps["palette"]["colors"][0]["hex"].startswith("#")
    for name in ("sketch", "intensity", "instances"):
        assert decode(reps[name]["map_png"]).shape == (R, R)
        assert decode(reps[name]["png"]).shape[:2] == (R, R)
    # An exact map goes back in unchanged: the generation's picture of it is the same map.
    sketch = reps["sketch"]["map_png"]
    gen = post(url, "v1/generate", {"conditions": {"sketch": {"map": sketch}}}).json()
    assert np.array_equal(decode(gen["conditions"]["sketch"]["png"]), decode(sketch))
    only = post(
        url, "v1/decompose", {"image": png(scene(2)), "conditions": ["caption", "sketch"], "text": "hi"}
    )
    assert set(only.json()["representations"]) == {"caption", "sketch"}


def test_masked_edit_and_masked_generation_keep_outside_pixels_exactly(apps):
    url = apps["main"]
    source = scene(3, 48)  # not square to the model: decoded (resized) by the server
    mask = np.zeros((48, 48), np.uint8)
    mask[8:30, 10:40] = 255
    body = {
        "source": png(source),
        "conditions": {"text": "a green star", "palette": {"colors": ["#00ff00"]}},
        "mask": png(mask),
        "steps": 3,
        "num_images": 2,
    }
    r = post(url, "v1/edit", body)
    assert r.status_code == 200, r.text
    out = r.json()
    src = decode(out["source_png"])
    m = decode(out["conditions"]["mask"]["png"]) > 0  # the mask as the server framed it
    assert 0.2 < m.mean() < 0.6
    assert out["invert_guidance"]["c1"] == [] and out["invert_guidance"]["targets"][0]["c2"] == [
        "caption",
        "palette",
    ]
    for im in out["images"]:
        im = decode(im)
        assert np.array_equal(im[~m], src[~m])  # outside the mask: the source, bit for bit
        assert not np.array_equal(im[m], src[m])
    # The same guarantee through /v1/generate's mask condition.
    gen = post(
        url,
        "v1/generate",
        {
            "images": {"s": png(source)},
            "conditions": {"mask": {"mask": png(mask), "source": "s"}},
            "steps": 2,
        },
    ).json()
    assert np.array_equal(decode(gen["images"][0])[~m], src[~m])
    # Without a mask an edit may change everything (bidirectional guidance only).
    free = post(url, "v1/edit", {**body, "mask": None}).json()
    assert len(free["images"]) == 2


def _bad_cases(big: str, huge_pixels: str) -> list[tuple[str, dict | bytes, int, str]]:
    a = png(scene(0))
    return [
        ("v1/generate", {"conditions": {"colour": {"image": "a"}}}, 422, "unknown_condition"),
        ("v1/generate", {"conditions": {}, "stepz": 3}, 422, "unknown_field"),
        ("v1/generate", b'{"conditions": ', 400, "invalid_json"),
        (
            "v1/generate",
            {"images": {"a": "!!notbase64!!"}, "conditions": {"sketch": {"image": "a"}}},
            422,
            "invalid_image",
        ),
        (
            "v1/generate",
            {
                "images": {"a": base64.b64encode(b"GIF89a but not really").decode()},
                "conditions": {"sketch": {"image": "a"}},
            },
            422,
            "undecodable_image",
        ),
        (
            "v1/generate",
            {"images": {"a": a}, "conditions": {"sketch": {"image": "zz"}}},
            422,
            "unknown_image",
        ),
        (
            "v1/generate",
            {"images": {"a": a}, "conditions": {"depth": {"image": "a"}}},
            422,
            "unavailable_condition",
        ),
        (
            "v1/generate",
            {"images": {"a": a}, "conditions": {"sketch": {"image": "a", "map": a}}},
            422,
            "invalid_request",
        ),
        ("v1/generate", {"conditions": {"palette": {"colors": ["#12345g"]}}}, 422, "invalid_palette"),
        (
            "v1/generate",
            {"conditions": {"palette": {"colors": ["#fff"], "weights": [-1]}}},
            422,
            "invalid_palette",
        ),
        ("v1/generate", {"conditions": {"text": "x"}, "steps": 0}, 422, "out_of_range"),
        ("v1/generate", {"conditions": {"text": "x"}, "steps": 10_000}, 422, "out_of_range"),
        ("v1/generate", {"conditions": {"text": "x"}, "num_images": 99}, 422, "out_of_range"),
        ("v1/generate", {"conditions": {"text": "x"}, "seed": -1}, 422, "out_of_range"),
        ("v1/generate", {"conditions": {"text": "x" * 5000}}, 422, "out_of_range"),
        ("v1/generate", {"conditions": {"text": "x"}, "guidance": {"sketch": 2}}, 422, "invalid_guidance"),
        ("v1/generate", {"conditions": {"text": "x"}, "guidance": 1000}, 422, "out_of_range"),
        ("v1/generate", {"conditions": {"text": "x"}, "scheduler": "euler"}, 422, "invalid_request"),
        (
            "v1/generate",
            {
                "images": {"a": a},
                "conditions": {"mask": {"mask": png(np.zeros((8, 8), np.uint8)), "source": "a"}},
            },
            422,
            "empty_mask",
        ),
        (
            "v1/generate",
            {"images": {"a": big}, "conditions": {"sketch": {"image": "a"}}},
            413,
            "image_too_large",
        ),
        (
            "v1/generate",
            {"images": {"a": huge_pixels}, "conditions": {"sketch": {"image": "a"}}},
            413,
            "image_too_large",
        ),
        ("v1/generate", {"images": {"a": big, "b": big}, "conditions": {}}, 413, "body_too_large"),
        ("v1/edit", {"source": a, "conditions": {}}, 422, "invalid_request"),
        ("v1/edit", {"source": a, "conditions": {"text": "x"}, "scheduler": "dpm++"}, 422, "invalid_request"),
        ("v1/edit", {"conditions": {"text": "x"}}, 422, "missing_field"),
        ("v1/decompose", {"image": a, "conditions": ["sketch", "colour"]}, 422, "unknown_condition"),
        ("v1/decompose", {"image": a, "conditions": ["depth"]}, 422, "unavailable_condition"),
        ("v1/decompose", {"image": a, "conditions": ["caption"]}, 422, "invalid_request"),
    ]


def test_every_bad_request_gets_its_4xx_and_never_reaches_the_model(apps):
    url = apps["main"]
    rng = np.random.default_rng(0)
    big = png(rng.integers(0, 256, (700, 700, 3), dtype=np.uint8))  # ~1.4 MB of noise: over 1 MB
    huge_pixels = png(np.zeros((1100, 1000, 3), np.uint8))  # small file, 1.1 M pixels
    assert len(big) * 3 / 4 > 1_000_000 and len(huge_pixels) < 100_000
    before = stats(url)
    for path, body, status, code in _bad_cases(big, huge_pixels):
        if isinstance(body, bytes):
            r = requests.post(url + path, data=body, headers={"Content-Type": "application/json"}, timeout=60)
        else:
            r = post(url, path, body)
        assert r.status_code == status, (path, code, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert err["code"] == code, (path, code, err)
        assert err["message"]
    assert stats(url) == before  # none of them called the model


def test_backpressure_and_auth(apps):
    url, auth = apps["strict"], {"Authorization": f"Bearer {TOKEN}"}
    # auth: the page and the health check are open, the API is not
    assert requests.get(url + "healthz", timeout=30).status_code == 200
    assert requests.get(url, timeout=30).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = requests.get(url + "v1/model", headers=headers, timeout=30)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert r.json()["error"]["code"] == "unauthorized"
        r = post(url, "v1/generate", {"conditions": {"text": "x"}}, headers=headers)
        assert r.status_code == 401
    info = requests.get(url + "v1/model", headers=auth, timeout=30).json()
    assert info["auth"] is True and info["stats"]["jobs"] == 0  # the refused calls never got there
    # backpressure: one request running, one queued, the rest refused at once with Retry-After
    body = {"conditions": {"text": "a slow one"}, "steps": 60}
    with ThreadPoolExecutor(6) as pool:
        rs = list(pool.map(lambda i: post(url, "v1/generate", {**body, "seed": i}, headers=auth), range(6)))
    codes = sorted(r.status_code for r in rs)
    assert codes.count(200) >= 1 and codes.count(503) >= 3, codes
    for r in rs:
        if r.status_code == 503:
            assert r.headers["Retry-After"] == "2"
            assert r.json()["error"]["code"] == "overloaded"
    assert (
        post(url, "v1/generate", {"conditions": {"text": "x"}, "steps": 1}, headers=auth).status_code == 200
    )
    # and the main app needs no token
    assert requests.get(apps["main"] + "v1/model", timeout=30).status_code == 200


def test_a_base_model_generates_from_text_and_maps_and_edits_exactly(apps):
    url = apps["base"]
    info = requests.get(url + "v1/model", timeout=30).json()
    assert info["resolution"] == R and info["caption_encoder"] == "base"
    assert info["inputs"]["caption"] == "text" and info["decomposable"]["caption"] is True
    a = png(scene(0, R))
    for cond in (
        {"text": "a red circle"},
        {"sketch": {"image": "a"}},
        {"text": "a star", "intensity": {"image": "a"}},
    ):
        r = post(url, "v1/generate", {"images": {"a": a}, "conditions": cond, "seed": 1})
        assert r.status_code == 200, (cond, r.text)
        assert decode(r.json()["images"][0]).shape == (R, R, 3)
    mask = np.zeros((R, R), np.uint8)
    mask[5:19, 9:23] = 255
    r = post(
        url,
        "v1/edit",
        {"source": a, "conditions": {"text": "a blue square"}, "mask": png(mask), "num_images": 2},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    src, m = decode(out["source_png"]), decode(out["conditions"]["mask"]["png"]) > 0
    for im in out["images"]:
        im = decode(im)
        assert np.array_equal(im[~m], src[~m]) and not np.array_equal(im[m], src[m])


def test_a_cascade_generates_edits_outpaints_and_upscales_at_its_output_side(apps):
    url = apps["cascade"]
    info = requests.get(url + "v1/model", timeout=30).json()
    assert info["resolution"] == R and info["stages"] == [16, R] and info["upscale_factors"] == [2]
    # its base is an ensemble of experts (tests/helpers/cascade.py): served as any pipeline
    assert info["experts"] == [
        {"name": "expert-0", "noise_range": [500, 1000]},
        {"name": "expert-1", "noise_range": [0, 500]},
    ]
    assert requests.get(apps["main"] + "v1/model", timeout=30).json()["experts"] == []
    sketch = png((np.eye(R) * 255).astype(np.uint8))
    r = post(
        url,
        "v1/generate",
        {"conditions": {"text": "a red circle", "sketch": {"map": sketch}}, "num_images": 2},
    )
    assert r.status_code == 200, r.text
    out = r.json()
    assert [decode(im).shape for im in out["images"]] == [(R, R, 3)] * 2
    assert [s["resolution"] for s in out["stages"]] == [16, R]
    assert decode(out["conditions"]["sketch"]["png"]).shape == (R, R)

    # a masked edit and an outpainting keep the outside pixels exactly at 32 px
    source, mask = scene(3, R), np.zeros((R, R), np.uint8)
    mask[4:20, 6:26] = 255
    edit = post(
        url, "v1/edit", {"source": png(source), "conditions": {"text": "a star"}, "mask": png(mask)}
    ).json()
    m = decode(edit["conditions"]["mask"]["png"]) > 0
    assert np.array_equal(decode(edit["images"][0])[~m], source[~m])
    small = scene(4, R)[:20, :24]
    for app in ("cascade", "main"):
        side, outpaint = R, {"image": "s", "left": 4, "right": 4, "top": 6, "bottom": 6}
        body = {"images": {"s": png(small)}, "outpaint": outpaint}
        out = post(apps[app], "v1/generate", body).json()
        im = decode(out["images"][0])
        assert im.shape == (side, side, 3) and np.array_equal(im[6:26, 4:28], small), app
        m = decode(out["conditions"]["mask"]["png"]) > 0
        assert m.sum() == side * side - 20 * 24 and (im[m] != decode(out["source_png"])[m]).any()
    bad = post(url, "v1/generate", {"images": {"s": png(small)}, "outpaint": {"image": "s", "left": 40}})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "outpaint"

    # /v1/upscale: the image at the base's side, ×2 by the upsampler
    r = post(url, "v1/upscale", {"image": png(scene(5, 48)), "text": "a red circle", "num_images": 2})
    assert r.status_code == 200, r.text
    up = r.json()
    assert up["factor"] == 2 and decode(up["input_png"]).shape == (16, 16, 3)
    assert decode(up["bicubic_png"]).shape == (R, R, 3)
    assert [decode(im).shape for im in up["images"]] == [(R, R, 3)] * 2
    assert post(url, "v1/upscale", {"image": png(scene(5)), "factor": 4}).json()["error"]["field"] == "factor"
    plain = post(apps["main"], "v1/upscale", {"image": png(scene(5))})
    assert plain.status_code == 422 and plain.json()["error"]["code"] == "no_upsampler"

    # the prior samples the semantics from the caption
    assert info["prior"] is True
    body = {
        "conditions": {"text": "a red circle"},
        "prior": True,
        "prior_steps": 3,
        "guidance": {"semantics": 2},
    }
    r = post(url, "v1/generate", body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["conditions"]["semantics"]["from"] == "prior" and len(out["prior"]["semantics"]) == 8
    again = post(url, "v1/generate", body).json()
    assert again["prior"]["semantics"] == out["prior"]["semantics"] and again["images"] == out["images"]
    no = post(apps["main"], "v1/generate", body)
    assert no.status_code == 422 and no.json()["error"]["code"] == "no_prior"
