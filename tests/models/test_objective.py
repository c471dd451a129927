"""The training objective (models/objective.py): ε-MSE and its v-prediction weighting."""

from __future__ import annotations

import pytest
import torch

from models import CONDITIONS, build_model
from models.conditioning import Conditions
from models.objective import diffusion_loss
from pipelines.diffusion.schedulers import default_scheduler


def _rows(weighting: str, max_weight: float = 20.0) -> torch.Tensor:
    torch.manual_seed(0)
    model = build_model("tiny", sample_size=16).eval()
    x0 = torch.rand(6, 3, 16, 16) * 2 - 1
    presence = torch.zeros(6, len(CONDITIONS), dtype=torch.bool)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return diffusion_loss(
            model, default_scheduler(), x0, Conditions(), presence, g, "none", weighting, max_weight
        )


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
