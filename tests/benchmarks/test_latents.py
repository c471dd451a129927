"""``benchmarks/latents.py`` on the CPU with the tiny SD: the JSON's figures (no timing bar)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import latents


def test_figures(capsys):
    threads = torch.get_num_threads()
    try:
        code = latents.main(["--device", "cpu", "--batch-size", "2", "--batches", "2", "--repeats", "1"])
    finally:
        torch.set_num_threads(threads)  # main sets it for the whole process
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["benchmark"] == "latents"
    for key in (
        "vae",
        "device",
        "dtype",
        "resolution",
        "latent_shape",
        "ours",
        "theirs",
        "ratio",
        "goal_met",
    ):
        assert key in out, key
    assert (out["device"], out["dtype"], out["resolution"], out["latent_shape"]) == (
        "cpu",
        "float32",
        32,
        [4, 8, 8],
    )
    assert out["ratio"] > 0 and out["ours"]["images_per_s"] > 0 and out["theirs"]["images_per_s"] > 0
    assert out["max_abs_diff"] == 0.0  # the extractor computes exactly the plain loop's latents


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="at least 1"):
        latents.run_latents_benchmark(str(tmp_path), "cpu", 0, 1)
