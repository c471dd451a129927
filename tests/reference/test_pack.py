"""pipelines/reference/pack.py: the reference README's training time."""

from __future__ import annotations

import pytest

from pipelines.reference.pack import step_seconds


def test_training_time_is_the_sum_of_the_logged_step_windows():
    # windows of 10 steps at 2 s, then 10 at 3 s: 50 s; no history: unknown
    assert step_seconds([(10, 2.0), (20, 3.0)]) == pytest.approx(50.0)
    assert step_seconds([]) is None


def test_a_run_resumed_after_a_pause_is_timed_in_steps_alone():
    # stopped after step 30, resumed from the checkpoint at 20: steps 21-30 ran twice and their
    # window is logged twice; the later sitting's figure counts, once, and the pause not at all
    logged = [(10, 2.0), (20, 2.0), (30, 2.0), (30, 4.0), (40, 2.0)]
    assert step_seconds(logged) == pytest.approx(20 + 20 + 40 + 20)
