"""``benchmarks/upsampler_quality.py`` on tiny random models: its JSON and its picture."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from benchmarks import upsampler_quality
from tests.helpers.cascade import save_stage


def test_figures(tmp_path, capsys):
    up = save_stage(tmp_path / "up", "upsampler-tiny", 32, 2)
    base = save_stage(tmp_path / "base", "tiny", 16)
    figure = tmp_path / "quality.png"
    args = ["--upsampler", str(up), "--base", str(base), "--count", "3", "--steps", "2", "--base-steps", "2"]
    assert upsampler_quality.main([*args, "--levels", "0,50", "--figure", str(figure)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["factor"] == 2 and out["sides"] == [16, 32] and out["count"] == 3
    assert 5 < out["bicubic"]["psnr_db"] < 60 and 0 < out["bicubic"]["ssim"] <= 1
    assert set(out["upsampler_runs"]) == {
        "level 0, unconditional", "level 0, caption", "level 50, unconditional", "level 50, caption",
    }  # fmt: skip
    for run in out["upsampler_runs"].values():
        assert 0 <= run["beats_bicubic_psnr"] <= 1 and np.isfinite(run["psnr_db"])
    layout = out["layout"]
    assert 0 <= layout["sketch_f1_kept"] <= 1 and 0 <= layout["sketch_f1_unrelated"] <= 1
    assert np.asarray(Image.open(figure)).shape[1] > 4 * 128


def test_spacing_samples_an_export_with_other_timesteps(tmp_path, capsys):
    """``--spacing``: the saved spacing by default, else the one given (what a run with
    ``model.timestep_spacing`` set would have saved); one trailing step differs from one leading."""
    up = save_stage(tmp_path / "up", "upsampler-tiny", 32, 2)
    base = save_stage(tmp_path / "base", "tiny", 16)
    args = ["--upsampler", str(up), "--base", str(base), "--count", "2", "--steps", "1", "--base-steps", "1"]
    runs = {}
    for spacing in ("saved", "trailing"):
        assert upsampler_quality.main([*args, "--levels", "0", "--spacing", spacing]) == 0
        out = json.loads(capsys.readouterr().out)
        runs[out["timestep_spacing"]] = out["upsampler_runs"]["level 0, unconditional"]["psnr_db"]
    assert set(runs) == {"leading", "trailing"} and runs["leading"] != runs["trailing"]
