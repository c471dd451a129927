"""``benchmarks/cascade.py`` on the CPU with tiny settings: the JSON's figures (no timing bar)."""

from __future__ import annotations

import json

from benchmarks import cascade


def test_figures(capsys):
    args = [
        "--device",
        "cpu",
        "--base-side",
        "16",
        "--batch",
        "2",
        "--base-steps",
        "2",
        "--upsampler-steps",
        "2",
    ]
    assert cascade.main([*args, "--train-batch", "2", "--train-steps", "1", "--repeats", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["benchmark"] == "cascade" and [s["side"] for s in out["stages"]] == [16, 32]
    assert all(s["seconds"] > 0 for s in out["stages"]) and 0 < out["upsampler_share"] < 1
    train = out["train"]
    assert (
        train["side"] == 32
        and train["ours"]["preset"] == "upsampler-tiny"
        and train["theirs"]["preset"] == "tiny"
    )
    ratio = train["ours"]["images_per_s"] / train["theirs"]["images_per_s"]  # of the rounded rates
    assert abs(train["ratio"] - ratio) < 0.01 * ratio
