"""Every task recipe runs end to end on the tiny preset and keeps its task's guarantees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import build_model
from pipelines.conditions.palette import palette_from_hex
from pipelines.data.scene import render_sample
from pipelines.diffusion import recipes
from pipelines.diffusion.pipeline import ComposerPipeline
from pipelines.diffusion.schedulers import default_scheduler

R = 32
STEPS = dict(num_inference_steps=3)


@pytest.fixture(scope="module")
def pipe() -> ComposerPipeline:
    torch.manual_seed(0)
    p = ComposerPipeline(
        build_model("tiny", sample_size=R).eval(),
        default_scheduler(),
        decompose={"sketch": {"method": "canny"}, "instances": {"method": "cluster"}},
    )
    p.set_progress_bar_config(disable=True)
    return p


def image(i: int) -> np.ndarray:
    return render_sample(11, "train", i, R).image


def check(out, n: int = 1) -> np.ndarray:
    assert out.images.shape == (n, R, R, 3) and out.images.dtype == np.uint8
    return out.images


def test_variation_uses_the_image_semantics(pipe):
    out = recipes.variation(pipe, image(0), **STEPS, num_images=2)
    check(out, 2)
    assert out.guidance["targets"][0]["c2"] == ["semantics"]


def test_interpolation_endpoints_are_the_two_images_semantics(pipe):
    a, b = image(1), image(2)
    outs = recipes.interpolate(pipe, a, b, alphas=(0.0, 0.5, 1.0), **STEPS)
    assert len(outs) == 3
    ends = [recipes.variation(pipe, x, conditions=("semantics", "palette"), **STEPS).images for x in (a, b)]

    # Equal up to float rounding: the embedding is computed on one row here, inside a batch there.
    def diff(x, y):
        return np.abs(x.astype(float) - y.astype(float)).mean()

    assert diff(outs[0].images, ends[0]) < 1 and diff(outs[2].images, ends[1]) < 1
    assert diff(outs[1].images, outs[0].images) > 5 and diff(outs[1].images, outs[2].images) > 5
    ea, eb = recipes.semantics_embedding(pipe, a), recipes.semantics_embedding(pipe, b)
    mid = recipes.slerp(ea, eb, 0.5)
    assert np.isclose(np.linalg.norm(mid), 1.0, atol=1e-5)  # the encoder's embeddings are unit-norm


def test_style_transfer_pose_transfer_translate_colorize(pipe):
    check(recipes.style_transfer(pipe, image(3), image(4), layout=("sketch", "instances"), **STEPS))
    check(recipes.pose_transfer(pipe, image(3), image(4), **STEPS))
    out = recipes.translate(pipe, image(5), "a blue square", layout=("sketch",), **STEPS)
    assert "caption" in out.guidance["targets"][0]["c2"]
    palette = palette_from_hex(["#ff0000", "#00ff00"])
    out = recipes.colorize(pipe, image(6), palette, **STEPS)
    assert out.guidance["targets"][0]["c2"] == ["intensity", "palette"]


def test_virtual_try_on_keeps_the_person_outside_the_mask(pipe):
    person, garment = image(7), image(8)
    mask = np.zeros((R, R), np.uint8)
    mask[8:24, 10:22] = 1
    out = check(recipes.virtual_try_on(pipe, person, garment, mask, **STEPS, num_images=2), 2)
    for img in out:
        assert np.array_equal(img[mask == 0], person[mask == 0])


def test_reconfigure_inverts_under_the_original_map_and_samples_under_the_edit(pipe):
    src = image(9)
    edited = np.zeros((R, R), np.uint8)
    edited[R // 2, :] = 255
    out = check(recipes.reconfigure(pipe, src, {"sketch": edited}, **STEPS))
    unchanged = recipes.reconfigure(
        pipe, src, {"sketch": recipes._decomposer(pipe, None).decompose(src, ["sketch"])["sketch"]}, **STEPS
    )
    assert not np.array_equal(out, unchanged.images)
    with pytest.raises(ValueError, match="layout"):
        recipes.reconfigure(pipe, src, {"palette": np.zeros(156)})
