"""An upsampler of the cascade (``ComposerModel(upsample_factor=f)``): the low-resolution image and
its augmentation level steer the output, the eight conditions stay optional, bad inputs are refused,
and Imagen's noise-conditioning augmentation (``noise_low_res``) leaves level-0 rows exactly clean."""

from __future__ import annotations

import pytest
import torch

from models import CONDITIONS, ComposerModel, build_model, random_conditions
from models.objective import diffusion_loss, downsample, noise_low_res, noise_to_level
from pipelines.diffusion.schedulers import default_scheduler
from tests.models.inputs import replace

SIZE = 32
FACTOR = 2


@pytest.fixture(scope="module")
def model() -> ComposerModel:
    torch.manual_seed(0)
    return build_model("tiny", sample_size=SIZE, upsample_factor=FACTOR).eval()


def _inputs(model: ComposerModel, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    conditions = random_conditions(model, batch, g)
    x = torch.randn(batch, 3, SIZE, SIZE, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t, conditions, g


@torch.no_grad()
def test_the_low_resolution_image_and_its_level_steer_the_output(model):
    x, t, c, _ = _inputs(model, 4)
    assert c.low_res.shape == (4, 3, SIZE // FACTOR, SIZE // FACTOR)
    none = torch.zeros(4, len(CONDITIONS), dtype=torch.bool)
    out = model(x, t, conditions=c, presence=none)
    assert out.shape == (4, 3, SIZE, SIZE) and torch.isfinite(out).all()
    other = model(x, t, conditions=replace(c, low_res=-c.low_res), presence=none)
    assert (other - out).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # every row reads its image
    level = model(x, t, conditions=replace(c, low_res_level=c.low_res_level + 300), presence=none)
    assert (level - out).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    # the conditions still act on top of it, and the low-resolution image is in every branch
    every = model(x, t, conditions=c, presence=torch.ones(4, len(CONDITIONS), dtype=torch.bool))
    assert (every - out).abs().amax() > 1e-4
    # each row alone gives what it gave in the batch
    alone = model(x[1:2], t[1:2], conditions=c.map(lambda v: v[1:2]), presence=none[1:2])
    torch.testing.assert_close(alone, out[1:2], atol=1e-5, rtol=1e-4)


def test_bad_low_resolution_inputs_are_refused(model):
    x, t, c, _ = _inputs(model, 2)
    none = torch.zeros(2, len(CONDITIONS), dtype=torch.bool)
    with pytest.raises(ValueError, match="needs low_res and low_res_level"):
        model(x, t, conditions=replace(c, low_res=None), presence=none)
    with pytest.raises(ValueError, match=r"low_res must be \(2, 3, 16, 16\)"):
        model(x, t, conditions=replace(c, low_res=torch.zeros(2, 3, 8, 8)), presence=none)
    with pytest.raises(ValueError, match="low_res_level must be"):
        model(x, t, conditions=replace(c, low_res_level=torch.zeros(2, 1, dtype=torch.long)), presence=none)
    plain = build_model("tiny", sample_size=SIZE)
    with pytest.raises(ValueError, match="upsampler's input"):
        plain(x, t, conditions=replace(c), presence=none)
    with pytest.raises(ValueError, match="upsample_factor must be 1"):
        build_model("tiny", sample_size=SIZE, upsample_factor=8)
    with pytest.raises(ValueError, match="not a multiple of upsample_factor"):
        build_model("tiny", sample_size=SIZE, upsample_factor=3)
    with pytest.raises(ValueError, match="pixel-space model"):
        build_model("tiny", sample_size=SIZE, upsample_factor=2, local_downsample=2)


def test_saved_and_loaded_it_is_the_same_upsampler(model, tmp_path):
    model.save_pretrained(str(tmp_path / "up"))
    back = ComposerModel.from_pretrained(str(tmp_path / "up")).eval()
    assert back.config.upsample_factor == FACTOR
    x, t, c, _ = _inputs(model, 2)
    none = torch.zeros(2, len(CONDITIONS), dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(
            back(x, t, conditions=c, presence=none), model(x, t, conditions=c, presence=none)
        )


def test_noise_conditioning_augmentation():
    scheduler = default_scheduler()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(64, 3, SIZE, SIZE, generator=g) * 2 - 1
    low, level = noise_low_res(scheduler, x0, FACTOR, max_level=200, generator=g)
    assert low.shape == (64, 3, SIZE // FACTOR, SIZE // FACTOR) and level.dtype == torch.int64
    assert 0 <= int(level.min()) and int(level.max()) <= 200 and len(level.unique()) > 20
    clean = downsample(x0, FACTOR)
    assert torch.equal(low[level == 0], clean[level == 0])  # level 0: exactly the downsampled image
    noisy = level > 100
    assert (low - clean)[noisy].pow(2).mean() > (low - clean)[(level > 0) & (level < 20)].pow(2).mean()
    # a uniform image downsamples to itself
    flat = torch.full((1, 3, SIZE, SIZE), 0.25)
    torch.testing.assert_close(downsample(flat, FACTOR), torch.full((1, 3, 16, 16), 0.25))
    # the sampling-time augmentation: seeded, level 0 untouched
    a = noise_to_level(scheduler, clean[:2], torch.tensor([0, 150]), torch.Generator().manual_seed(3))
    b = noise_to_level(scheduler, clean[:2], torch.tensor([0, 150]), torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(a[0], clean[0]) and not torch.equal(a[1], clean[1])
    with pytest.raises(ValueError, match="max_level must be in"):
        noise_low_res(scheduler, x0, FACTOR, max_level=1000)


def test_an_upsampler_learns_from_its_low_resolution_input():
    """60 steps on 8 flat-coloured images: the loss falls, and the noise is predicted better with
    each image's own low-resolution input than with another image's (the network reads it)."""
    torch.manual_seed(0)
    up = build_model("tiny", sample_size=16, upsample_factor=2)
    scheduler = default_scheduler()
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(8, 3, 1, 1, generator=g) * 2 - 1).expand(8, 3, 16, 16).contiguous()
    opt = torch.optim.AdamW(up.parameters(), lr=2e-3)
    presence = torch.zeros(8, len(CONDITIONS), dtype=torch.bool)
    losses = []
    for _ in range(60):
        low, level = noise_low_res(scheduler, x0, 2, max_level=100, generator=g)
        c = replace(random_conditions(up, 8, g), low_res=low, low_res_level=level)
        loss = diffusion_loss(up, scheduler, x0, c, presence, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < sum(losses[:10]) * 0.5

    @torch.no_grad()
    def eps_error(low: torch.Tensor) -> float:
        e, t, total = torch.Generator().manual_seed(1), torch.full((8,), 300), 0.0
        for _ in range(4):
            noise = torch.randn(x0.shape, generator=e)
            clean = torch.zeros(8, dtype=torch.long)
            c = replace(random_conditions(up, 8, e), low_res=low, low_res_level=clean)
            total += (
                (up(scheduler.add_noise(x0, noise, t), t, conditions=c, presence=presence) - noise)
                .pow(2)
                .mean()
                .item()
            )
        return total / 4

    own = downsample(x0, 2)
    assert eps_error(own) < 0.8 * eps_error(own.roll(1, dims=0))  # measured: 0.067 vs 0.108
