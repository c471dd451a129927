"""ComposerPipeline: set guidance (Eq. 2), masked editing, save/load, seeds, schedulers."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from models import CONDITIONS, build_model
from pipelines.data.scene import render_sample
from pipelines.diffusion.guidance import Guidance
from pipelines.diffusion.inputs import to_conditions
from pipelines.diffusion.pipeline import ComposerPipeline
from pipelines.diffusion.sampling import guided_noise
from pipelines.diffusion.schedulers import default_scheduler

R = 32


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_pipe(seed: int = 0, **overrides) -> ComposerPipeline:
    torch.manual_seed(seed)
    pipe = ComposerPipeline(build_model("tiny", sample_size=R, **overrides).eval(), default_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def scene(index: int = 0, r: int = R):
    s = render_sample(7, "train", index, r)
    return s.image, s.caption


def conditions(index: int = 0) -> dict:
    image, caption = scene(index)
    rng = np.random.default_rng(index)
    return {
        "text": caption,
        "semantics.image": image,
        "palette": rng.dirichlet(np.ones(156)).astype(np.float32),
        "sketch": (rng.random((R, R)) > 0.9).astype(np.uint8) * 255,
        "instances": rng.integers(0, 4, (R, R)).astype(np.uint8),
        "depth": rng.integers(0, 256, (R, R)).astype(np.uint8),
        "intensity": image.mean(-1).astype(np.uint8),
    }


def presence_of(names, b: int) -> torch.Tensor:
    return torch.tensor([[n in names for n in CONDITIONS]] * b, dtype=torch.bool)


def eps_under(pipe, cond: dict, names, x, t) -> torch.Tensor:
    """ε(x_t, c) with the conditions ``names`` present: one separate forward."""
    rows = pipe._rows(cond, x.shape[0])
    encoded = pipe.unet.encode(to_conditions(pipe.unet, rows), presence_of(names, x.shape[0]))
    return pipe.unet(x, t, encoded=encoded)


# -- Composer Eq. 2 -------------------------------------------------------------------------------
def test_guidance_text_forms():
    given = {"caption", "sketch", "palette"}
    g = Guidance.parse("3", given)
    assert g.base == frozenset() and g.terms == ((frozenset(given), 3.0),)
    g = Guidance.parse("text=5,sketch=2", given)
    assert g.base == {"palette"}
    assert g.terms == ((frozenset({"palette", "caption"}), 5.0), (frozenset({"palette", "sketch"}), 2.0))
    g = Guidance.parse("text+palette=4", given)
    assert g.base == {"sketch"} and g.terms == ((frozenset(given), 4.0),)
    assert Guidance.parse(1, given).sets() == [frozenset(given)]  # ω = 1 needs no c1 branch
    for bad in ("depth=2", "colour=2", "text=x", "strong"):
        with pytest.raises(ValueError):
            Guidance.parse(bad, given)


def test_set_guidance_with_empty_c1_is_standard_cfg_in_one_batched_forward():
    # float64, so "equal" can be checked to 1e-10 whatever the batch size's rounding
    pipe, cond = make_pipe(), conditions()
    pipe.unet.double()
    x, t = (
        torch.randn(3, 3, R, R, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
        torch.tensor(500),
    )
    given = [n for n in CONDITIONS if n != "mask"]
    g = Guidance.parse(4.0, given)
    with torch.no_grad():
        ours = guided_noise(pipe.unet, x, t, pipe.encode_conditions(cond, g, 3), g)
        uncond, full = eps_under(pipe, cond, [], x, t), eps_under(pipe, cond, given, x, t)
    cfg = uncond + 4.0 * (full - uncond)
    assert torch.allclose(ours, cfg, atol=1e-10), (ours - cfg).abs().max()
    assert (full - uncond).abs().max() > 1e-3  # the conditions do change the prediction


def test_eq2_between_two_condition_sets_and_per_condition_weights():
    pipe, cond = make_pipe(), conditions(1)
    pipe.unet.double()
    x, t = (
        torch.randn(2, 3, R, R, generator=torch.Generator().manual_seed(2), dtype=torch.float64),
        torch.tensor(300),
    )
    with torch.no_grad():
        g = Guidance.parse("text+palette=2.5", ["sketch", "caption", "palette"])
        c1, c2 = (
            eps_under(pipe, cond, ["sketch"], x, t),
            eps_under(pipe, cond, ["sketch", "caption", "palette"], x, t),
        )
        ours = guided_noise(pipe.unet, x, t, pipe.encode_conditions(cond, g, 2), g)
        assert torch.allclose(ours, 2.5 * c2 + (1 - 2.5) * c1, atol=1e-10)  # Eq. 2
        g = Guidance.parse("text=5,depth=2", ["caption", "depth", "intensity"])
        base = eps_under(pipe, cond, ["intensity"], x, t)
        e_text = eps_under(pipe, cond, ["intensity", "caption"], x, t)
        e_depth = eps_under(pipe, cond, ["intensity", "depth"], x, t)
        ours = guided_noise(pipe.unet, x, t, pipe.encode_conditions(cond, g, 2), g)
    expected = base + 5 * (e_text - base) + 2 * (e_depth - base)
    assert torch.allclose(ours, expected, atol=1e-10), (ours - expected).abs().max()


# -- region-restricted editing -------------------------------------------------------------------
def box_mask(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.zeros((R, R), np.uint8)
    y, x = rng.integers(0, R // 2, 2)
    m[y : y + rng.integers(4, R // 2), x : x + rng.integers(4, R // 2)] = 1
    return m


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++"])
def test_masked_editing_keeps_every_outside_pixel(scheduler):
    pipe = make_pipe()
    source, caption = scene(3)
    for seed in range(3):
        mask = box_mask(seed)
        out = pipe(
            {"text": caption},
            source=source,
            mask=mask,
            num_inference_steps=6,
            num_images=2,
            seed=seed,
            scheduler=scheduler,
        )
        for img in out.images:
            assert np.array_equal(img[mask == 0], source[mask == 0])
            assert not np.array_equal(img[mask == 1], source[mask == 1])  # the inside is regenerated


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=R,
    ).eval()


def latent_pipe() -> ComposerPipeline:
    torch.manual_seed(0)
    model = build_model("tiny", sample_size=R // 4, image_channels=4, local_downsample=4).eval()
    pipe = ComposerPipeline(model, default_scheduler(), vae=tiny_vae())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_latent_space_generation_and_masked_editing():
    pipe = latent_pipe()
    assert pipe.image_size == R
    source, caption = scene(4)
    cond = {"text": caption, "sketch": conditions()["sketch"]}
    out = pipe(cond, num_inference_steps=4, num_images=2, seed=0)
    assert out.images.shape == (2, R, R, 3) and out.images.dtype == np.uint8
    mask = box_mask(5)
    out = pipe(cond, source=source, mask=mask, num_inference_steps=4, seed=1)
    assert np.array_equal(out.images[0][mask == 0], source[mask == 0])
    with pytest.raises(ValueError, match="pixel-space"):
        pipe(cond, num_inference_steps=2, threshold="clip")


# -- persistence and reproducibility -------------------------------------------------------------
def test_save_pretrained_from_pretrained_gives_identical_samples(tmp_path):
    pipe = make_pipe()
    pipe.register_to_config(decompose={"sketch": {"method": "canny"}})
    cond = conditions(2)
    before = pipe(cond, guidance="text=3,sketch=2", num_inference_steps=5, num_images=2, seed=11).images
    pipe.save_pretrained(tmp_path / "p")
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "p") for f in fs]
    weights = [f for f in files if f.endswith((".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
    assert weights and all(f.endswith(".safetensors") for f in weights)
    loaded = ComposerPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.decompose == {"sketch": {"method": "canny"}}
    after = loaded(cond, guidance="text=3,sketch=2", num_inference_steps=5, num_images=2, seed=11).images
    assert np.array_equal(before, after)
    with pytest.raises(ValueError, match="safetensors"):
        ComposerPipeline.from_pretrained(tmp_path / "p", use_safetensors=False)


def test_latent_pipeline_round_trip(tmp_path):
    pipe = latent_pipe()
    cond = {"text": "a red circle"}
    before = pipe(cond, num_inference_steps=3, seed=4).images
    pipe.save_pretrained(tmp_path / "p")
    loaded = ComposerPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.vae, AutoencoderKL)
    assert np.array_equal(before, loaded(cond, num_inference_steps=3, seed=4).images)


def test_same_seed_same_images_other_seed_other_images():
    pipe, cond = make_pipe(), conditions(5)
    a = pipe(cond, num_inference_steps=4, num_images=2, seed=3).images
    b = pipe(cond, num_inference_steps=4, num_images=2, seed=3).images
    c = pipe(cond, num_inference_steps=4, num_images=2, seed=4).images
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[1])  # the samples of one call differ from each other
    g = pipe(cond, num_inference_steps=4, num_images=2, generator=torch.Generator().manual_seed(3)).images
    assert np.array_equal(a, g)


def test_training_mode_model_samples_as_in_eval_and_is_restored():
    pipe, cond = make_pipe(), conditions(6)
    a = pipe(cond, num_inference_steps=3, seed=0).images
    pipe.unet.train()
    b = pipe(cond, num_inference_steps=3, seed=0).images
    assert pipe.unet.training and np.array_equal(a, b)


@pytest.mark.parametrize(
    "scheduler,threshold", [("ddim", "dynamic"), ("ddim", "none"), ("dpm++", "clip"), ("dpm++", "dynamic")]
)
def test_schedulers_and_thresholds(scheduler, threshold):
    pipe, cond = make_pipe(), conditions(7)
    out = pipe(cond, num_inference_steps=5, seed=0, scheduler=scheduler, threshold=threshold)
    assert out.images.shape == (1, R, R, 3)
    s = pipe._scheduler(scheduler, threshold)
    assert type(s).__name__ == {"ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler"}[scheduler]
    assert bool(getattr(s.config, "thresholding", False)) == (
        threshold == "dynamic" or (scheduler, threshold) == ("dpm++", "clip")
    )


@pytest.mark.parametrize(
    "scheduler,spacing,want",
    [
        ("ddim", "leading", {1: [1], 4: [751, 501, 251, 1]}),
        ("ddim", "trailing", {1: [999], 4: [999, 749, 499, 249]}),
        ("dpm++", "trailing", {1: [999], 4: [999, 749, 499, 249]}),
    ],
)
def test_a_saved_timestep_spacing_is_what_sampling_visits(tmp_path, monkeypatch, spacing, want, scheduler):
    """``model.timestep_spacing`` is saved with the pipeline and every sampler follows it: trailing
    starts even one step at t = T - 1 (pure noise: the model's posterior mean), DDIM's leading at
    t = 1."""
    import pipelines.diffusion.sampling as sampling

    seen: list[int] = []
    guided = sampling.guided_noise

    def record(model, x, t, *args, **kwargs):
        seen.append(int(t))
        return guided(model, x, t, *args, **kwargs)

    monkeypatch.setattr(sampling, "guided_noise", record)
    torch.manual_seed(0)
    ComposerPipeline(
        build_model("tiny", sample_size=R).eval(), default_scheduler(spacing=spacing)
    ).save_pretrained(tmp_path / "p")
    pipe = ComposerPipeline.from_pretrained(tmp_path / "p")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.timestep_spacing == spacing
    for steps, timesteps in want.items():
        seen.clear()
        pipe(conditions(3), guidance=1.0, num_inference_steps=steps, seed=0, scheduler=scheduler)
        assert seen == timesteps, (steps, seen)


def test_bad_inputs_raise_clear_errors():
    pipe, cond = make_pipe(), conditions(8)
    source, _ = scene(8)
    with pytest.raises(ValueError, match="sketch"):
        pipe({"sketch": np.zeros((R + 1, R), np.uint8)}, num_inference_steps=2)
    with pytest.raises(ValueError, match="source"):
        pipe(cond, mask=box_mask(0), num_inference_steps=2)
    with pytest.raises(ValueError, match="source"):
        pipe(cond, invert_conditions=cond, num_inference_steps=2)
    with pytest.raises(ValueError, match="unknown condition inputs"):
        pipe({"colour": 1}, num_inference_steps=2)
    with pytest.raises(ValueError, match="not given"):
        pipe({"text": "a"}, guidance="sketch=2", num_inference_steps=2)
    with pytest.raises(ValueError, match="scheduler"):
        pipe(cond, scheduler="euler", num_inference_steps=2)
    with pytest.raises(ValueError, match="DDIM"):
        pipe(cond, source=source, invert_conditions=cond, scheduler="dpm++", num_inference_steps=2)


def test_unconditional_generation_is_one_branch():
    g = Guidance.parse(3.0, [])
    assert g.sets() == [frozenset()]
    pipe = make_pipe()
    out = pipe({}, guidance=3.0, num_inference_steps=3, seed=0)
    assert out.guidance["branches"] == 1 and out.images.shape == (1, R, R, 3)


# -- batched sampling (what Ray Serve's @serve.batch groups) -------------------------------------
def test_sample_batch_gives_each_request_what_it_would_get_alone():
    from pipelines.diffusion.requests import SampleRequest

    pipe = make_pipe()
    source, _ = scene(5)
    full = [conditions(i) for i in range(3)]
    requests = [
        SampleRequest(
            {k: c[k] for k in ("text", "palette", "sketch")}, guidance="text=4,sketch=2", num_images=n, seed=s
        )
        for c, n, s in zip(full, (1, 2, 1), (5, 6, 7), strict=True)
    ]
    together = pipe.sample_batch(requests, 4)
    assert [len(o.images) for o in together] == [1, 2, 1]
    for req, out in zip(requests, together, strict=True):
        alone = pipe(
            req.conditions,
            guidance=req.guidance,
            num_inference_steps=4,
            num_images=req.num_images,
            seed=req.seed,
        )
        assert np.abs(alone.images.astype(int) - out.images.astype(int)).max() <= 1
        assert out.guidance == alone.guidance
    # masked editing and bidirectional guidance batch too, each with its own source and mask
    edits = [
        SampleRequest(
            {"text": c["text"]},
            source=source,
            mask=box_mask(i),
            invert_conditions={"text": "a scene"},
            seed=i,
        )
        for i, c in enumerate(full[:2])
    ]
    outs = pipe.sample_batch(edits, 3)
    for req, out in zip(edits, outs, strict=True):
        assert np.array_equal(out.images[0][req.mask == 0], source[req.mask == 0])
        alone = pipe(
            req.conditions,
            source=source,
            mask=req.mask,
            invert_conditions={"text": "a scene"},
            num_inference_steps=3,
            seed=req.seed,
        )
        assert np.abs(alone.images.astype(int) - out.images.astype(int)).max() <= 1
    # incompatible requests (other condition keys) must be grouped by the caller
    with pytest.raises(ValueError, match="not compatible"):
        pipe.sample_batch([requests[0], SampleRequest({"text": "x"})], 2)
    assert pipe.prepare(requests[0]).compatible_key() == pipe.prepare(requests[2]).compatible_key()
