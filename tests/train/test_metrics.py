"""The training metrics: loss per condition subset, a window's figures on one worker."""

from __future__ import annotations

import pytest
import torch

from models import CONDITIONS
from pipelines.train.metrics import Window, loss_group_names, progress_line, subset_losses


def test_loss_groups():
    per_row = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    available = torch.ones(3, len(CONDITIONS), dtype=torch.bool)
    presence = torch.zeros(3, len(CONDITIONS), dtype=torch.bool)
    presence[1] = True  # row 1: everything kept
    presence[2, 3] = True  # row 2: sketch only
    sums = subset_losses(per_row, presence, available).view(-1, 2)
    got = dict(zip(loss_group_names(), sums.tolist(), strict=True))
    assert got["loss"] == [7.0, 3.0] and got["loss/none"] == [1.0, 1.0] and got["loss/all"] == [2.0, 1.0]
    assert got["loss/with_sketch"] == [6.0, 2.0] and got["loss/with_caption"] == [2.0, 1.0]


def test_window_on_one_worker():
    w = Window(torch.device("cpu"))
    available = torch.ones(2, len(CONDITIONS), dtype=torch.bool)
    w.add(torch.tensor([1.0, 3.0]), torch.zeros_like(available), available)
    w.steps, w.time, w.wait = 2, 4.0, 1.0
    w.grad_norm += 6.0
    m = w.reduce(world=1, global_batch=8)
    assert m["loss"] == 2.0 and m["loss/none"] == 2.0 and "loss/all" not in m  # no row kept all
    assert m["images_per_s"] == pytest.approx(4.0) and m["data_wait_fraction"] == pytest.approx(0.25)
    assert m["step_time_s"] == pytest.approx(2.0) and m["grad_norm"] == pytest.approx(3.0)
    assert progress_line(3, 10, m) == "step 3/10  loss 2.0000  4.0 img/s  data wait 25.0%"
