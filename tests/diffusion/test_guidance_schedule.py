"""Per-condition guidance schedules (pipelines/diffusion/guidance.py): a target's window and shape.

A schedule constant over the whole run is today's number, bit for bit; a target with an empty
window gives the images of the request without that condition, bit for bit; each step evaluates only the
branches its active targets need (no forward rows for dropped conditions); bad forms are refused.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.diffusion.guidance import Guidance, Window
from tests.diffusion.test_pipeline import conditions, make_pipe

GIVEN = ("caption", "sketch", "palette")


def test_text_forms_windows_and_shapes():
    g = Guidance.parse("text=5,sketch=2@0:0.6,palette=3@0.2:1,linear", GIVEN)
    assert g.windows == (None, Window(0.0, 0.6), Window(0.2, 1.0, "linear"))
    assert g.describe()["targets"][1] == {
        "c2": ["sketch"],
        "weight": 2.0,
        "window": [0.0, 0.6],
        "shape": "constant",
    }
    assert g.describe()["targets"][2]["shape"] == "linear"
    # the whole run at a constant weight is no schedule at all
    assert Guidance.parse("sketch=2@0:1", GIVEN) == Guidance.parse("sketch=2", GIVEN)
    assert not Guidance.parse("text=5,sketch=2@0:1,constant", GIVEN).windows
    for bad, match in [
        ("sketch=2@0.7:0.2", "need 0 <= start <= end <= 1"),
        ("sketch=2@0:1.5", "need 0 <= start"),
        ("sketch=2@half", "not START:END"),
        ("sketch=2,linear", "follows no NAME=WEIGHT@START:END"),
        ("sketch=2@0:1,wiggle", "not a number"),
        ("linear", "expected a number"),
    ]:
        with pytest.raises(ValueError, match=match):
            Guidance.parse(bad, GIVEN)


def test_window_weights_over_the_steps():
    n = 10
    assert [Window(0, 0.6).factor(i, n) is not None for i in range(n)] == [True] * 6 + [False] * 4
    ramp = [Window(0.2, 1.0, "linear").factor(i, n) for i in range(n)]
    assert (
        ramp[:2] == [None, None] and ramp[2] == pytest.approx(0.5 / 8) and ramp[-1] == pytest.approx(7.5 / 8)
    )
    assert np.all(np.diff(ramp[2:]) > 0)
    decay = [Window(0, 1, "decay").factor(i, n) for i in range(n)]
    assert np.all(np.diff(decay) < 0) and decay[0] == pytest.approx(0.95)
    cosine = [Window(0, 1, "cosine").factor(i, n) for i in range(n)]
    assert cosine[0] < 0.05 and cosine[-1] > 0.95 and np.all(np.diff(cosine) > 0)
    assert all(Window(0.3, 0.3).factor(i, n) is None for i in range(n))  # an empty window never acts
    # the step guidance: targets outside their window drop out, weights follow the shape
    g = Guidance.parse("text=5,sketch=2@0:0.6,palette=3@0.2:1,linear", GIVEN)
    first, branches = g.at(0, n)
    assert [w for _, w in first.terms] == [5.0, 2.0] and branches == [0, 1, 2]
    last, branches = g.at(9, n)
    assert [w for _, w in last.terms] == [5.0, pytest.approx(3 * 7.5 / 8)] and branches == [0, 1, 3]
    assert Guidance.parse("text=5", GIVEN).at(3, n) == (Guidance.parse("text=5", GIVEN), None)


def test_a_whole_constant_window_is_todays_number_bit_for_bit():
    pipe, cond = make_pipe(), conditions(1)
    a = pipe(cond, guidance="text=4,sketch=2", num_inference_steps=8, num_images=2, seed=3).images
    for spec in ("text=4,sketch=2@0:1", "text=4@0:1,constant,sketch=2@0:1"):
        b = pipe(cond, guidance=spec, num_inference_steps=8, num_images=2, seed=3).images
        assert np.array_equal(a, b), spec


def test_an_empty_window_gives_the_images_without_that_condition():
    pipe = make_pipe()
    cond = {k: v for k, v in conditions(2).items() if k in ("text", "sketch")}
    without = {"text": cond["text"]}
    a = pipe(without, guidance=4.0, num_inference_steps=8, num_images=2, seed=5).images
    b = pipe(cond, guidance="text=4,sketch=2@0.5:0.5", num_inference_steps=8, num_images=2, seed=5).images
    assert np.array_equal(a, b)  # each branch is encoded on its own: the same rows, bit for bit
    # and a window that does act changes them
    c = pipe(cond, guidance="text=4,sketch=2@0:0.5", num_inference_steps=8, num_images=2, seed=5).images
    assert np.abs(a.astype(int) - c.astype(int)).max() > 20


def test_each_step_evaluates_only_the_branches_it_needs():
    pipe = make_pipe()
    rows: list[int] = []
    forward = pipe.unet.forward

    def spy(sample, timestep, *a, **k):
        rows.append(sample.shape[0])
        return forward(sample, timestep, *a, **k)

    pipe.unet.forward = spy
    cond = {k: v for k, v in conditions(3).items() if k in ("text", "sketch", "palette")}
    n, b = 10, 2
    pipe(cond, guidance="text=5,sketch=2@0:0.6,palette=3@0.2:1,linear", num_inference_steps=n, num_images=b)
    # c1 = {} and three targets: 4 branches at steps 2-5, 3 before (no palette) and after (no sketch)
    assert rows == [3 * b] * 2 + [4 * b] * 4 + [3 * b] * 4
    rows.clear()
    pipe(cond, guidance="text=5,sketch=2@0:0", num_inference_steps=n, num_images=b)
    assert rows == [2 * b] * n  # c1 and the caption target: the sketch branch is never run
    rows.clear()
    pipe(cond, guidance="text=5,sketch=2,palette=3", num_inference_steps=n, num_images=b)
    assert rows == [4 * b] * n  # no schedule: every branch at every step, as before


def test_schedules_apply_to_the_inversion_of_bidirectional_guidance():
    pipe = make_pipe()
    cond = {k: v for k, v in conditions(4).items() if k in ("text", "sketch")}
    source = np.asarray(conditions(4)["semantics.image"])
    args = dict(source=source, num_inference_steps=6, seed=2, guidance=3.0)
    plain = pipe(cond, invert_conditions=cond, invert_guidance="text=2,sketch=1", **args).images
    same = pipe(cond, invert_conditions=cond, invert_guidance="text=2,sketch=1@0:1", **args).images
    windowed = pipe(cond, invert_conditions=cond, invert_guidance="text=2,sketch=1@0.5:1", **args).images
    assert np.array_equal(plain, same) and not np.array_equal(plain, windowed)
