"""The training metrics: loss per condition subset, a window's figures on one worker."""

from __future__ import annotations

import pytest
import torch

from models import CONDITIONS
from pipelines.train.metrics import (
    LossNotFinite,
    LossWatch,
    Window,
    loss_group_names,
    progress_line,
    subset_losses,
)


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


def _feed(watch: LossWatch, losses: list[float], first_step: int = 10) -> dict[int, str]:
    """The warnings ``watch`` returns over ``losses``, one window every 10 steps, by step."""
    out = {}
    for i, loss in enumerate(losses):
        step = first_step + 10 * i
        if (w := watch.check(step, loss)) is not None:
            out[step] = w
    return out


def test_loss_watch_flags_a_blow_up_once_after_its_patience():
    w = LossWatch(factor=3.0, patience=5, min_history=10)
    steady = [0.10, 0.12, 0.09, 0.11, 0.10] * 4  # 20 windows around 0.1
    assert _feed(w, steady) == {}
    warnings = _feed(w, [0.73] * 8, first_step=210)  # the lr 2e-3 run: 0.10 -> 0.73, and stays
    assert list(warnings) == [250]  # the 5th window in a row over 3x the median, and only then
    assert "blown up" in warnings[250] and "0.73 at step 250" in warnings[250] and "optim.lr" in warnings[250]
    # back under the bar: the next blow-up is flagged again, against the same baseline
    assert _feed(w, [0.1, 0.11]) == {}
    assert list(_feed(w, [0.5] * 5, first_step=400)) == [440]


def test_loss_watch_leaves_falling_noisy_and_short_runs_alone():
    falling = [1.0 / (1 + i) for i in range(60)]
    assert _feed(LossWatch(), falling) == {}
    w = LossWatch(factor=3.0, patience=5)
    noisy = [0.1, 0.35] * 15 + [0.35, 0.35, 0.35]  # 3.5x spikes, 4 in a row at most
    assert _feed(w, [0.1] * 10 + noisy) == {}
    assert _feed(LossWatch(min_history=10), [0.01] * 9 + [1.0] * 5) == {}  # no baseline yet
    assert LossWatch().check(10, None) is None  # a window without a loss


@pytest.mark.parametrize("loss", [float("nan"), float("inf")])
def test_loss_watch_stops_on_a_loss_that_is_not_a_number(loss):
    w = LossWatch()
    _feed(w, [0.1] * 3)
    with pytest.raises(LossNotFinite, match=rf"the training loss is {loss} at step 40: the run stops"):
        w.check(40, loss)


def test_a_blow_up_is_logged_and_tagged_on_the_mlflow_run(tmp_path, caplog, request, monkeypatch):
    """``log_window`` on one worker, the rank-0 tracker over a real SQLite MLflow store read back
    with ``MlflowClient``: the window that completes the blow-up puts a warning in the log and the
    tag ``recompose.loss_blowup`` on the run; the windows before it do neither."""
    import logging
    import types

    import mlflow
    from mlflow import MlflowClient

    from pipelines import tracking
    from pipelines.train.config import TrainConfig
    from pipelines.train.loop import TrainerArgs, log_window
    from pipelines.train.state import Progress
    from pipelines.train.tracking import RankZeroTracker

    uri = tracking.sqlite_uri(tmp_path)
    client = MlflowClient(uri)
    run_id = client.create_run(tracking.experiment_id(client, "recompose", uri)).info.run_id
    cfg = TrainConfig(progress=False, mlflow={"system_metrics": False})
    args = TrainerArgs(cfg, None, str(tmp_path), {}, "h", run_id, uri, [], {})  # type: ignore[arg-type]
    tracker = RankZeroTracker(args, torch.device("cpu"))
    # start() sets this process's tracking URI (and MLFLOW_TRACKING_URI) and active run, as in a
    # worker: both are put back after the test, so later tests keep their own stores
    uris = mlflow.tracking._tracking_service.utils
    monkeypatch.setattr(uris, "_tracking_uri", uris._tracking_uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # what start() sets; the old value comes back after
    tracker.start(0)
    request.addfinalizer(mlflow.end_run)
    scheduler = types.SimpleNamespace(get_last_lr=lambda: [2e-3])
    t = types.SimpleNamespace(lr_scheduler=scheduler, progress=Progress())
    s = types.SimpleNamespace(global_batch=2, cfg=cfg)
    watch, available = LossWatch(), torch.ones(2, len(CONDITIONS), dtype=torch.bool)
    tags = []
    with caplog.at_level(logging.WARNING, logger="pipelines.train.loop"):
        for i, loss in enumerate([0.1] * 10 + [0.73] * 5):
            window = Window(torch.device("cpu"))
            window.add(torch.tensor([loss, loss]), available, available)
            window.steps, window.time = 1, 1.0
            t.progress.step = 10 * (i + 1)
            log_window(t, s, window, 1, tracker, watch)
            tags.append(client.get_run(run_id).data.tags.get("recompose.loss_blowup"))
    assert tags[:-1] == [None] * 14
    assert tags[-1].startswith("step 150: the training loss has blown up: 0.73 at step 150")
    warnings = [r.getMessage() for r in caplog.records if r.name == "pipelines.train.loop"]
    assert warnings == [tags[-1].removeprefix("step 150: ")]
    assert [m.value for m in client.get_metric_history(run_id, "loss")][-1] == pytest.approx(0.73)
