"""The training objective (models/objective.py): ε or v targets, and the v and Min-SNR-γ weightings."""

from __future__ import annotations

import pytest
import torch

from models import CONDITIONS, build_model
from models.conditioning import Conditions
from models.objective import diffusion_loss
from pipelines.diffusion.schedulers import default_scheduler


def _rows(weighting: str, max_weight: float = 20.0, prediction: str = "epsilon", model=None) -> torch.Tensor:
    torch.manual_seed(0)
    model = model or build_model("tiny", sample_size=16).eval()
    x0 = torch.rand(6, 3, 16, 16) * 2 - 1
    presence = torch.zeros(6, len(CONDITIONS), dtype=torch.bool)
    g = torch.Generator().manual_seed(1)
    sched = default_scheduler(prediction)
    with torch.no_grad():
        return diffusion_loss(model, sched, x0, Conditions(), presence, g, "none", weighting, max_weight)


def _draws() -> tuple[torch.Tensor, torch.Tensor]:
    """The loss's own timesteps and noise for _rows (the same generator, drawn in the same order)."""
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 1000, (6,), generator=g)
    return t, torch.randn((6, 3, 16, 16), generator=g)


class _Constant(torch.nn.Module):
    """A "model" predicting zeros: its loss is the target's own mean square."""

    def forward(self, x_t, t, conditions=None, presence=None):
        return torch.zeros_like(x_t)


def test_v_weighting_scales_each_row_by_one_over_alpha_bar_capped():
    eps, v = _rows("eps"), _rows("v", max_weight=20.0)
    t = torch.randint(0, 1000, (6,), generator=torch.Generator().manual_seed(1))  # the loss's own draw
    alpha_bar = default_scheduler().alphas_cumprod[t].float()
    expected = (1 / alpha_bar).clamp(max=20.0)
    assert torch.allclose(v / eps, expected, rtol=1e-4)
    assert (expected >= 1).all() and expected.max() > 1  # never below plain ε-MSE, more at high noise


def test_unknown_weighting_is_refused():
    with pytest.raises(ValueError, match="weighting"):
        _rows("snr")


def test_v_prediction_regresses_the_velocity():
    torch.manual_seed(0)
    x0 = torch.rand(6, 3, 16, 16) * 2 - 1  # _rows' x0
    t, noise = _draws()
    a = default_scheduler().alphas_cumprod[t].float()[:, None, None, None]
    velocity = a.sqrt() * noise - (1 - a).sqrt() * x0
    got = _rows("eps", prediction="v_prediction", model=_Constant())
    assert torch.allclose(got, velocity.pow(2).flatten(1).mean(1), rtol=1e-5)
    eps = _rows("eps", prediction="epsilon", model=_Constant())
    assert torch.allclose(eps, noise.pow(2).flatten(1).mean(1), rtol=1e-5)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_clips_the_x0_weight_at_gamma(prediction):
    plain, weighted = _rows("eps", prediction=prediction), _rows("min_snr", prediction=prediction)
    t, _ = _draws()
    a = default_scheduler().alphas_cumprod[t].float()
    snr = a / (1 - a)
    expected = snr.clamp(max=5.0) / (snr if prediction == "epsilon" else snr + 1)
    assert torch.allclose(weighted / plain, expected, rtol=1e-4)
    assert (expected <= 1 + 1e-6).all() and expected.min() < 0.5  # low-noise rows down-weighted


def test_unknown_prediction_is_refused():
    from pipelines.train.config import ModelSection

    with pytest.raises(ValueError, match="prediction_type"):
        _rows("eps", prediction="sample")
    with pytest.raises(ValueError, match="prediction"):
        ModelSection(prediction="x0")


def test_scale_shift_resnets_train_and_bad_values_are_refused():
    from pipelines.train.config import OptimSection

    torch.manual_seed(0)
    model = build_model("tiny", sample_size=16, resnet_time_scale_shift="scale_shift")
    assert model.unet.config.resnet_time_scale_shift == "scale_shift"
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    presence = torch.zeros(2, len(CONDITIONS), dtype=torch.bool)
    loss = diffusion_loss(
        model, default_scheduler(), x0, Conditions(), presence, torch.Generator().manual_seed(0)
    )
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        build_model("tiny", sample_size=16, resnet_time_scale_shift="film")
    with pytest.raises(ValueError, match="loss_weighting"):
        OptimSection(loss_weighting="snr")
    with pytest.raises(ValueError, match="max_loss_weight"):
        OptimSection(max_loss_weight=0.5)


def test_an_expert_draws_its_timesteps_from_its_noise_range_only():
    """``timesteps=(lo, hi)`` (an expert's noise_range): every row's t in [lo, hi); the full range
    draws exactly what the default does, so runs without experts are unchanged."""
    seen: list[torch.Tensor] = []

    class Spy(_Constant):
        def forward(self, x_t, t, conditions=None, presence=None):
            seen.append(t.clone())
            return super().forward(x_t, t)

    x0 = torch.zeros(256, 3, 4, 4)
    presence = torch.zeros(256, len(CONDITIONS), dtype=torch.bool)
    for r in [(0, 250), (600, 1000), (0, 1000), None]:
        g = torch.Generator().manual_seed(1)
        diffusion_loss(Spy(), default_scheduler(), x0, Conditions(), presence, g, timesteps=r)
    low, high, full, default = seen
    assert low.min() >= 0 and low.max() < 250 and high.min() >= 600 and high.max() < 1000
    assert high.max() > 900 and low.max() > 200  # the whole interval, not a corner of it
    assert torch.equal(full, default)
    with pytest.raises(ValueError, match=r"not inside \[0, 1000\)"):
        diffusion_loss(Spy(), default_scheduler(), x0, Conditions(), presence, timesteps=(500, 1001))
