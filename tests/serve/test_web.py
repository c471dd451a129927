"""The Serve app's web page, driven in headless Chromium against a running app (CPU, tiny model)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.data.decomposer import ImageDecomposer
from pipelines.data.scene import parse_caption, render_sample
from pipelines.serve.examples import EXAMPLES_DIR, MANIFEST, MAP_NAMES, write_examples

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def urls(tiny_model_dir, tmp_path_factory):
    """Two apps on one real local Serve: the tiny model under /web and a cascade (16→32 px, with
    a prior) under /cascade."""
    from tests.helpers.cascade import make_cascade
    from tests.helpers.serve import run_app, serve_cluster

    cascade = make_cascade(tmp_path_factory.mktemp("web-cascade"), prior=True)
    with serve_cluster() as port:
        web = run_app(port, tiny_model_dir, "web", "/web")
        small = {"model_deployment": {"num_cpus": 0.5}, "ingress": {"num_cpus": 0.1}}
        yield {"web": web, "cascade": run_app(port, str(cascade), "cascade", "/cascade", **small)}


@pytest.fixture(scope="module")
def base_url(urls):
    """The page's URL on a real local Serve app (under a route prefix) holding the tiny model."""
    return urls["web"]


@pytest.fixture
def driver(monkeypatch):
    # A missing browser fails, not skips: .ci/run installs both, and the page is only tested here.
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.fail(f"the web page test needs {', '.join(missing)}: apt-get install chromium chromium-driver")
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium-manager must not reach for the network
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1800"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


def _severe(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _type(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


WHITE_PIXELS = (
    "const c = document.getElementById('mask-canvas');"
    "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
    "let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] > 200 && d[i+1] > 200 && d[i+2] > 200) n++;"
    "return n;"
)


def test_page_generates_with_mixed_conditions(base_url, driver, tmp_path):
    """Upload two images, see their decompositions, mix caption + semantics (a) + sketch (b) + a
    custom palette + a painted mask on a, with per-condition guidance; generate on CPU; the results
    decode and download as PNGs, and the browser logged no error."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    paths = []
    for i in range(2):
        path = tmp_path / f"scene{i}.png"
        Image.fromarray(render_sample(0, "train", i, 64).image).save(path)
        paths.append(str(path))

    driver.get(base_url)
    wait = WebDriverWait(driver, 60)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "body[data-ready=true]")))
    assert driver.find_element(By.ID, "error").is_displayed() is False

    # Upload both images: each gets a name and its decomposition previews.
    driver.find_element(By.ID, "files").send_keys("\n".join(paths))
    for name in "ab":
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f"#image-{name}[data-state=done]")))
        previews = driver.find_elements(By.CSS_SELECTOR, f"#image-{name} .rep img")
        assert len(previews) >= 2, f"image {name} shows no decomposition"
        wait.until(
            lambda d, name=name: all(
                d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
                for img in d.find_elements(By.CSS_SELECTOR, f"#image-{name} .rep img")
            )
        )

    # Conditions: caption, semantics from a, sketch from b, a custom two-colour palette.
    driver.find_element(By.ID, "text").send_keys("a red circle above a blue star")
    Select(driver.find_element(By.ID, "cond-semantics")).select_by_value("a")
    Select(driver.find_element(By.ID, "cond-sketch")).select_by_value("b")
    Select(driver.find_element(By.ID, "cond-palette")).select_by_value("custom")
    assert driver.find_element(By.ID, "palette-editor").is_displayed()
    for _ in range(2):
        driver.find_element(By.ID, "palette-add").click()
    hexes = driver.find_elements(By.CSS_SELECTOR, "#palette-colors .palette-hex")
    weights = driver.find_elements(By.CSS_SELECTOR, "#palette-colors .palette-weight")
    assert len(hexes) == 2
    for field, hex_ in zip(hexes, ["#ff0000", "#0000ff"], strict=True):
        driver.execute_script("arguments[0].value = arguments[1]", field, hex_)  # no colour picker headless
    for field, weight in zip(weights, ["3", "1"], strict=True):
        field.clear()
        field.send_keys(weight)

    # Mask: regenerate a stroke across the middle of image a.
    Select(driver.find_element(By.ID, "cond-mask")).select_by_value("a")
    canvas = driver.find_element(By.ID, "mask-canvas")
    wait.until(lambda d: canvas.is_displayed())
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)  # actions do not scroll
    white_before = driver.execute_script(WHITE_PIXELS)
    ActionChains(driver).move_to_element_with_offset(canvas, -80, 0).click_and_hold().move_by_offset(
        80, 20
    ).move_by_offset(80, -20).release().perform()
    assert driver.execute_script(WHITE_PIXELS) > white_before + 1000, "the stroke did not paint the mask"

    _type(driver, "steps", "4")
    _type(driver, "seed", "7")
    _type(driver, "num-images", "2")
    _type(driver, "weight-sketch", "2")  # per-condition guidance; the others together at the global 3
    # a guidance window: the palette acts from 20% of the steps on, its weight (the global 3) rising
    start = driver.find_element(By.ID, "window-start-palette")
    driver.execute_script("arguments[0].value = '0.2'; arguments[0].dispatchEvent(new Event('input'))", start)
    Select(driver.find_element(By.ID, "window-shape-palette")).select_by_value("linear")
    assert driver.find_element(By.ID, "window-label-palette").text == "steps 0.2–1"
    # paint with words: "red circle" brushed onto the top left of its canvas
    driver.find_element(By.ID, "paint-add").click()
    _type(driver, "paint-phrase-0", "red circle")
    paint = driver.find_element(By.ID, "paint-canvas-0")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", paint)
    ActionChains(driver).move_to_element_with_offset(paint, -50, -50).click_and_hold().move_by_offset(
        30, 10
    ).release().perform()
    assert paint.get_attribute("data-painted") == "true"

    button = driver.find_element(By.ID, "generate")
    button.click()
    if not driver.find_elements(By.CSS_SELECTOR, "#results img"):  # still running: the busy state
        assert not button.is_enabled()
        assert "generating" in driver.find_element(By.ID, "status").text
    WebDriverWait(driver, 120).until(
        lambda d: (
            d.find_elements(By.CSS_SELECTOR, "#results img") or d.find_element(By.ID, "error").is_displayed()
        )
    )
    error = driver.find_element(By.ID, "error")
    assert not error.is_displayed(), error.text
    wait.until(lambda d: button.is_enabled())

    results = driver.find_elements(By.CSS_SELECTOR, "#results img")
    assert len(results) == 2
    for i, img in enumerate(results):
        wait.until(lambda d, img=img: d.execute_script("return arguments[0].complete", img))
        assert driver.execute_script("return arguments[0].naturalWidth", img) > 0
        link = driver.find_element(By.ID, f"download-{i}")
        assert link.get_attribute("download") == f"sample-{i}.png"
        href = link.get_attribute("href")
        assert href.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(href.split(",", 1)[1]))).verify()
    info = driver.find_element(By.ID, "result-info").text
    assert "seed 7" in info and "4 steps" in info, info
    assert "sketch=2" in info and "text+semantics+mask=3" in info, info
    assert "palette=3.0@0.2:1.0,linear" in info, info
    assert "painted red circle (weight 1)" in info, info
    used = {
        e.get_attribute("data-rep") for e in driver.find_elements(By.CSS_SELECTOR, "#result-conditions .rep")
    }
    assert {"caption", "semantics", "sketch", "palette", "mask"} <= used, used

    assert _severe(driver) == []

    driver.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "page.png"
    driver.save_screenshot(str(shot))
    if os.environ.get("RECOMPOSE_SCREENSHOT_DIR"):
        out = Path(os.environ["RECOMPOSE_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / "serve_web_page.png")
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[0] > 500 and pixels.shape[1] > 500
    assert pixels.reshape(-1, 3).std(0).max() > 10, "blank screenshot"


# -- the example images -----------------------------------------------------------------------------
def _shipped_manifest() -> dict:
    return json.loads((EXAMPLES_DIR / MANIFEST).read_text())


def test_shipped_examples_regenerate_exactly(tmp_path):
    """The shipped example PNGs and manifest are what ``python -m pipelines.serve.examples``
    writes (same pixels, same manifest), the folder holds nothing else, each image's true maps
    are its ground truth as the server reads a map file back, and the six show variety."""
    manifest = write_examples(tmp_path)
    assert (tmp_path / MANIFEST).read_bytes() == (EXAMPLES_DIR / MANIFEST).read_bytes()
    assert _shipped_manifest() == manifest
    listed = [e["file"] for e in manifest["examples"]] + [
        f for e in manifest["examples"] for f in e["maps"].values()
    ]
    assert sorted(p.name for p in EXAMPLES_DIR.iterdir()) == sorted([MANIFEST, *listed])
    reader = ImageDecomposer({}, manifest["resolution"])
    for e in manifest["examples"]:
        shipped = np.asarray(Image.open(EXAMPLES_DIR / e["file"]))
        assert np.array_equal(shipped, np.asarray(Image.open(tmp_path / e["file"]))), e["file"]
        sample = render_sample(e["seed"], e["split"], e["index"], manifest["resolution"])
        assert np.array_equal(shipped, sample.image), e["file"]
        assert shipped.shape == (64, 64, 3)
        assert e["caption"] == sample.caption
        parse_caption(e["caption"])
        assert {"file", "caption", "split", "seed", "maps"} <= set(e)
        assert set(e["maps"]) == set(MAP_NAMES)
        for name in MAP_NAMES:
            shipped_map = (EXAMPLES_DIR / e["maps"][name]).read_bytes()
            assert shipped_map == (tmp_path / e["maps"][name]).read_bytes(), e["maps"][name]
        # Read back as v1/generate reads a map: the scene's objects, numbered by decreasing
        # area (1 = the largest), background 0; depth levels 0 (background) to 255 * z / 3.
        ids = reader.load_map("instances", EXAMPLES_DIR / e["maps"]["instances"])
        depth = reader.load_map("depth", EXAMPLES_DIR / e["maps"]["depth"])
        assert np.array_equal(ids > 0, sample.instances > 0), e["file"]
        areas = [int((ids == k).sum()) for k in range(1, int(ids.max()) + 1)]
        assert len(areas) == e["objects"] and areas == sorted(areas, reverse=True), (e["file"], areas)
        assert np.array_equal(depth, sample.depth), e["file"]
    examples = manifest["examples"]
    assert len(examples) == 6
    assert [e["split"] for e in examples].count("train") == 3
    chosen = [e for e in examples if e["split"] != "train"]
    assert sorted(e["objects"] for e in chosen) == [1, 2, 3]
    assert {e["background"] for e in chosen} == {"plain", "gradient"}


def test_examples_routes(base_url):
    """GET examples/examples.json and the PNGs it lists (no auth); anything else, including path
    traversal, is a 404 that serves no file."""
    import requests

    r = requests.get(base_url + "examples/examples.json", timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == _shipped_manifest()
    for e in r.json()["examples"]:
        img = requests.get(base_url + "examples/" + e["file"], timeout=30)
        assert img.status_code == 200, e["file"]
        assert img.headers["content-type"] == "image/png"
        assert img.content == (EXAMPLES_DIR / e["file"]).read_bytes()
        for name in e["maps"].values():
            m = requests.get(base_url + "examples/" + name, timeout=30)
            assert m.status_code == 200 and m.headers["content-type"] == "image/png", name
            assert m.content == (EXAMPLES_DIR / name).read_bytes(), name
    for path in (
        "examples/nope.png",
        "examples/app.py",
        "examples/index.html",
        "examples/",
        "examples/..%2Fapp.py",
        "examples/..%2F..%2Fapp.py",
        "examples/%2e%2e%2fapp.py",
        "examples/..%5Capp.py",
        "examples/%2e%2e",
        "examples/.%2Fexamples.json",
        "examples/train-00000.png%00.py",
    ):
        bad = requests.get(base_url + path, timeout=30)
        assert bad.status_code == 404, (path, bad.status_code)
        assert b"import" not in bad.content and b"<html" not in bad.content, path


def _wait_images_loaded(driver, wait, selector: str) -> None:
    from selenium.webdriver.common.by import By

    wait.until(
        lambda d: (
            d.find_elements(By.CSS_SELECTOR, selector)
            and all(
                d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", img)
                for img in d.find_elements(By.CSS_SELECTOR, selector)
            )
        )
    )


def test_page_composes_from_an_example(base_url, driver):
    """Without uploading anything: click an example (it becomes image a, its caption fills the
    caption box), take semantics, sketch and palette from it; a second example replaces it in
    every input that took an image; generate; the results appear with the conditions used,
    decomposed by v1/decompose from the example (maps as pictures, the palette as swatches, the
    caption as text), labelled."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    examples = _shipped_manifest()["examples"]
    driver.get(base_url)
    wait = WebDriverWait(driver, 60)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "body[data-ready=true]")))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#example-list button.example")) == 6)
    buttons = driver.find_elements(By.CSS_SELECTOR, "#example-list button.example")
    wait.until(lambda d: all(b.is_enabled() for b in buttons))
    assert driver.find_element(By.ID, "examples").is_displayed()
    _wait_images_loaded(driver, wait, "#example-list img")
    alts = [img.get_attribute("alt") for img in driver.find_elements(By.CSS_SELECTOR, "#example-list img")]
    assert alts == [f"example: {e['caption']}" for e in examples]

    # First example: image a, its caption; choose three conditions from it.
    buttons[0].click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image-a[data-state=done]")))
    assert driver.find_element(By.ID, "text").get_attribute("value") == examples[0]["caption"]
    assert buttons[0].get_attribute("aria-pressed") == "true"
    for cond in ("semantics", "sketch", "palette"):
        Select(driver.find_element(By.ID, f"cond-{cond}")).select_by_value("a")

    # Another example: image b replaces a wherever a was chosen; "none" stays none.
    pick = 3
    buttons[pick].click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image-b[data-state=done]")))
    caption = examples[pick]["caption"]
    assert driver.find_element(By.ID, "text").get_attribute("value") == caption
    assert [b.get_attribute("aria-pressed") for b in buttons] == [str(i == pick).lower() for i in range(6)]
    for cond in ("semantics", "sketch", "palette"):
        assert (
            Select(driver.find_element(By.ID, f"cond-{cond}")).first_selected_option.get_attribute("value")
            == "b"
        ), cond
    assert (
        Select(driver.find_element(By.ID, "cond-instances")).first_selected_option.get_attribute("value")
        == ""
    )
    buttons[pick].click()  # the same example again: no new image
    assert len(driver.find_elements(By.CSS_SELECTOR, "#images .image-card")) == 2
    # Its true instances and depth maps: shown on its card instead of what the server extracts
    # (clusters; no depth without a depth model), offered even where images give no depth.
    for cond in MAP_NAMES:
        card_map = driver.find_element(By.CSS_SELECTOR, f"#image-b .rep[data-rep={cond}]")
        assert card_map.get_attribute("data-from") == "example-map", cond
        assert card_map.find_element(By.TAG_NAME, "figcaption").text == f"{cond} (true map)"
        select = Select(driver.find_element(By.ID, f"cond-{cond}"))
        option = next(o for o in select.options if o.get_attribute("value") == "b")
        assert option.is_enabled() and option.text == "image b (true map)", (cond, option.text)
        select.select_by_value("b")
    assert "no depth" not in driver.find_element(By.CSS_SELECTOR, "#image-b .unavailable").text

    _type(driver, "steps", "3")
    _type(driver, "seed", "11")
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, 180).until(
        lambda d: (
            d.find_elements(
                By.CSS_SELECTOR, "#result-conditions[data-state=done], #result-conditions[data-state=error]"
            )
            or d.find_element(By.ID, "error").is_displayed()
        )
    )
    error = driver.find_element(By.ID, "error")
    assert not error.is_displayed(), error.text
    assert driver.find_element(By.ID, "result-conditions").get_attribute("data-state") == "done"
    results = driver.find_elements(By.CSS_SELECTOR, "#results img")
    assert len(results) == 1
    _wait_images_loaded(driver, wait, "#results img")
    assert "seed 11" in driver.find_element(By.ID, "result-info").text

    # The conditions used, next to the result: the title, and a labelled figure per condition.
    assert driver.find_element(By.ID, "result-conditions-title").is_displayed()
    figures = {
        f.get_attribute("data-rep"): f
        for f in driver.find_elements(By.CSS_SELECTOR, "#result-conditions .rep")
    }
    assert set(figures) == {"caption", "semantics", "sketch", "palette", *MAP_NAMES}, set(figures)
    assert figures["caption"].find_element(By.CSS_SELECTOR, ".textbox").text == caption
    assert figures["caption"].find_element(By.TAG_NAME, "figcaption").text == "caption ← text"
    for cond in ("semantics", "sketch", "palette"):
        fig = figures[cond]
        assert fig.get_attribute("data-from") == "decompose", cond
        assert fig.get_attribute("data-image") == "b", cond
        assert fig.find_element(By.TAG_NAME, "figcaption").text == f"{cond} ← image b"
        img = fig.find_element(By.TAG_NAME, "img")
        assert img.get_attribute("alt"), cond
    _wait_images_loaded(driver, wait, "#result-conditions .rep img")
    swatches = figures["palette"].find_elements(By.CSS_SELECTOR, ".swatches span")
    assert swatches, "the palette shows no swatches"
    assert (
        figures["palette"]
        .find_element(By.CSS_SELECTOR, ".swatches")
        .get_attribute("aria-label")
        .startswith("palette colours: #")
    )
    # The sketch shown is the example's, as decomposed: a 2-D map at the model's resolution.
    src = figures["sketch"].find_element(By.TAG_NAME, "img").get_attribute("src")
    sketch = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))
    assert sketch.ndim == 2 and sketch.shape[0] == sketch.shape[1] and sketch.std() > 0
    # Instances and depth went as the example's true maps (the request carried the map files),
    # and the result shows what the model received: one instance per object, the true depth.
    for cond in MAP_NAMES:
        fig = figures[cond]
        assert fig.get_attribute("data-from") == "example-map", cond
        assert fig.get_attribute("data-image") == "b", cond
        assert fig.find_element(By.TAG_NAME, "figcaption").text == f"{cond} ← image b (true map)"
    shown = {
        cond: np.asarray(
            Image.open(
                io.BytesIO(
                    base64.b64decode(
                        figures[cond].find_element(By.TAG_NAME, "img").get_attribute("src").split(",", 1)[1]
                    )
                )
            )
        )
        for cond in MAP_NAMES
    }
    size = sketch.shape[0]
    maps = examples[pick]["maps"]
    want_depth = ImageDecomposer({}, size).load_map("depth", EXAMPLES_DIR / maps["depth"])
    assert np.array_equal(shown["depth"], want_depth)
    want_ids = ImageDecomposer({}, size).load_map("instances", EXAMPLES_DIR / maps["instances"])
    colours = np.unique(shown["instances"].reshape(-1, shown["instances"].shape[-1]), axis=0)
    assert len(colours) == examples[pick]["objects"] + 1 == len(np.unique(want_ids)), colours

    assert _severe(driver) == []
    if os.environ.get("RECOMPOSE_SCREENSHOT_DIR"):
        out = Path(os.environ["RECOMPOSE_SCREENSHOT_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(out / "serve_web_examples.png"))


def test_page_outpaints_with_the_prior_on_a_cascade(urls, driver, tmp_path):
    """On a cascade with a prior: pick an uploaded image to outpaint, give two sides, tick the
    prior, generate: the result is at the cascade's output side and comes back with the border's
    mask and the prior's semantics among the conditions used."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    path = tmp_path / "scene.png"
    Image.fromarray(render_sample(0, "train", 2, 64).image).save(path)
    driver.get(urls["cascade"])
    wait = WebDriverWait(driver, 60)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "body[data-ready=true]")))
    driver.find_element(By.ID, "files").send_keys(str(path))
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#image-a[data-state=done]")))
    assert not driver.find_element(By.ID, "outpaint-sides").is_displayed()
    Select(driver.find_element(By.ID, "outpaint-image")).select_by_value("a")
    wait.until(lambda d: d.find_element(By.ID, "outpaint-sides").is_displayed())
    _type(driver, "outpaint-left", "8")
    _type(driver, "outpaint-right", "8")
    _type(driver, "steps", "2")
    driver.find_element(By.ID, "text").send_keys("a red circle")
    assert "cascade 16→32" in driver.find_element(By.ID, "model-info").text
    prior = driver.find_element(By.ID, "prior")
    assert prior.is_displayed()
    prior.click()
    driver.find_element(By.ID, "generate").click()
    WebDriverWait(driver, 120).until(
        lambda d: (
            d.find_elements(By.CSS_SELECTOR, "#results img") or d.find_element(By.ID, "error").is_displayed()
        )
    )
    error = driver.find_element(By.ID, "error")
    assert not error.is_displayed(), error.text
    img = driver.find_element(By.CSS_SELECTOR, "#results img")
    wait.until(lambda d: d.execute_script("return arguments[0].complete", img))
    assert driver.execute_script("return arguments[0].naturalWidth", img) == 32
    used = {
        e.get_attribute("data-rep") for e in driver.find_elements(By.CSS_SELECTOR, "#result-conditions .rep")
    }
    assert {"caption", "mask", "semantics"} <= used, used
    assert _severe(driver) == []
