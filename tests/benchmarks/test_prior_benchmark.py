"""``benchmarks/prior_benchmark.py`` on a tiny random cascade with a prior: its JSON and picture."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from benchmarks import prior_benchmark
from tests.helpers.cascade import make_cascade


def test_figures(tmp_path, capsys):
    cascade = make_cascade(tmp_path, prior=True)
    figure = tmp_path / "prior.png"
    args = [
        "--cascade",
        str(cascade),
        "--count",
        "2",
        "--steps",
        "2",
        "--prior-steps",
        "2",
        "--figure",
        str(figure),
    ]
    assert prior_benchmark.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["side"] == 16 and out["count"] == 2
    for side in ("seen", "heldout"):
        for way in ("caption", "caption+prior", "caption+truth", "none"):
            assert 0 <= out[f"{side}/{way}"]["colour"] <= 1 and 0 <= out[f"{side}/{way}"]["shape"] <= 1
    assert np.asarray(Image.open(figure)).shape[0] > 4 * 96
