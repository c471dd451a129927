"""A ``ComposerPipeline`` around an upsampler (``upsample_factor`` 2): the low-resolution image is
an input beside the conditions, its augmentation level is seeded, masked editing stays exact at
the output resolution, and a missing or misshapen low-resolution image is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import build_model
from pipelines.data.scene import render_sample
from pipelines.diffusion.pipeline import ComposerPipeline
from pipelines.diffusion.schedulers import default_scheduler

R, F = 32, 2


@pytest.fixture(scope="module")
def pipe() -> ComposerPipeline:
    torch.manual_seed(0)
    p = ComposerPipeline(build_model("tiny", sample_size=R, upsample_factor=F).eval(), default_scheduler())
    p.set_progress_bar_config(disable=True)
    return p


def _low(i: int = 0) -> np.ndarray:
    return render_sample(0, "train", i, R // F).image


def test_it_upsamples_with_conditions_seeded_and_level_aware(pipe):
    low = _low()
    a = pipe({"low_res": low, "text": "a red circle"}, num_inference_steps=3, num_images=2, seed=1).images
    assert a.shape == (2, R, R, 3) and a.dtype == np.uint8
    again = pipe({"low_res": low, "text": "a red circle"}, num_inference_steps=3, num_images=2, seed=1).images
    assert np.array_equal(a, again)
    noised = pipe(
        {"low_res": low, "low_res.level": 300, "text": "a red circle"}, num_inference_steps=3, seed=1
    )
    assert not np.array_equal(noised.images[0], a[0])
    other = pipe({"low_res": _low(1), "text": "a red circle"}, num_inference_steps=3, seed=1).images
    assert not np.array_equal(other[0], a[0])
    # guidance over condition sets: the low-resolution image is in every branch, not a condition
    out = pipe({"low_res": low, "text": "a red circle"}, guidance=3.0, num_inference_steps=2)
    assert out.guidance["targets"] == [{"c2": ["caption"], "weight": 3.0}] and out.guidance["branches"] == 2


def test_masked_edit_is_exact_at_the_output_resolution(pipe):
    source = render_sample(0, "train", 3, R).image
    mask = np.zeros((R, R), np.uint8)
    mask[4:20, 8:28] = 1
    out = pipe({"low_res": _low(3)}, source=source, mask=mask, num_inference_steps=3, num_images=2)
    for im in out.images:
        assert np.array_equal(im[mask == 0], source[mask == 0])


def test_a_missing_or_misshapen_low_resolution_image_is_refused(pipe):
    with pytest.raises(ValueError, match=r"upsamples ×2: give the image to upsample as low_res \(16×16\)"):
        pipe({"text": "a red circle"}, num_inference_steps=2)
    with pytest.raises(ValueError, match=r"this upsampler takes \(16, 16, 3\)"):
        pipe({"low_res": np.zeros((8, 8, 3), np.uint8)}, num_inference_steps=2)
    with pytest.raises(ValueError, match="low_res.level must be in"):
        pipe({"low_res": _low(), "low_res.level": 1000}, num_inference_steps=2)
    plain = ComposerPipeline(build_model("tiny", sample_size=R).eval(), default_scheduler())
    with pytest.raises(ValueError, match="not an upsampler"):
        plain({"low_res": _low()}, num_inference_steps=2)


def test_saved_and_loaded_it_upsamples_the_same(pipe, tmp_path):
    pipe.save_pretrained(str(tmp_path / "up"))
    back = ComposerPipeline.from_pretrained(str(tmp_path / "up"))
    back.set_progress_bar_config(disable=True)
    assert back.unet.config.upsample_factor == F
    a = pipe({"low_res": _low()}, num_inference_steps=2, seed=4).images
    b = back({"low_res": _low()}, num_inference_steps=2, seed=4).images
    assert np.array_equal(a, b)


def test_a_residual_upsampler_adds_the_bicubic_base_and_edits_exactly():
    """``upsample_residual``: x_0 is the image minus the bicubic upsampling of its clean input,
    so a model that denoises to a zero residual returns exactly that upsampling; masked edits
    stay exact; the training target is that residual."""
    from models.objective import residual_target
    from pipelines.diffusion.inputs import image_to_tensor, tensor_to_image, upsample_bicubic

    torch.manual_seed(0)
    model = build_model("upsampler-tiny", sample_size=R, upsample_factor=F, upsample_residual=True).eval()
    with pytest.raises(ValueError, match="upsample_residual is for an upsampler"):
        build_model("tiny", sample_size=R, upsample_residual=True)
    x0 = image_to_tensor(render_sample(0, "train", 5, R).image[None])
    target = residual_target(model, x0)
    low_x = models_downsample(x0)
    base = torch.nn.functional.interpolate(low_x, size=(R, R), mode="bicubic", align_corners=False)
    assert torch.allclose(target, x0 - base, atol=1e-6)
    # the base is the bicubic baseline (upsample_bicubic of the input rounded to uint8), up to rounding
    diff = tensor_to_image(base).astype(int) - upsample_bicubic(tensor_to_image(low_x), R).astype(int)
    assert np.abs(diff).max() <= 1
    assert target.abs().mean() < 0.5 * x0.abs().mean()  # a residual is small
    # A network whose x_0 prediction is always 0 (ε = x_t / σ_t) gives exactly the base.
    scheduler = default_scheduler()  # ε-prediction
    pipe = ComposerPipeline(model, scheduler)
    pipe.set_progress_bar_config(disable=True)

    class ZeroResidual(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, x, t, encoded=None, **kw):
            a = scheduler.alphas_cumprod.to(x)[torch.as_tensor(t).long()].view(-1, 1, 1, 1)
            return x / (1 - a).sqrt()

    low = render_sample(0, "train", 5, R // F).image
    expected = upsample_bicubic(low[None], R)[0]
    real_forward = model.forward
    model.forward = ZeroResidual(model).forward
    try:
        out = pipe({"low_res": low}, num_inference_steps=4).images[0]
    finally:
        model.forward = real_forward
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 1
    assert out.shape == (R, R, 3)
    source = render_sample(0, "train", 6, R).image
    mask = np.zeros((R, R), np.uint8)
    mask[8:24, 8:24] = 1
    edited = pipe({"low_res": low}, source=source, mask=mask, num_inference_steps=3).images[0]
    assert np.array_equal(edited[mask == 0], source[mask == 0])


def models_downsample(x0):
    from models.objective import downsample

    return downsample(x0, F)
