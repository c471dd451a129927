"""``benchmarks/plain_unet_control.py``: a tiny run from rendered scenes, its copy check and its data."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from benchmarks import plain_unet_control as control
from pipelines.data.synth import write_synth


def test_render_gives_the_pixels_of_a_synth_folder(tmp_path):
    write_synth(tmp_path / "synth", count=5, resolution=64, seed=0, split="train", progress=False)
    assert torch.equal(control.load_images(tmp_path / "synth"), control.render_images(0, 5))


def test_nearest_is_zero_for_a_copy_and_positive_for_a_fresh_scene():
    data = control.render_images(0, 8)
    assert control.nearest(data[:3], data) == 0.0
    assert control.nearest(control.render_images(8, 11), data) > 0.05


def test_a_tiny_run_prints_its_lines_and_saves_its_pictures(tmp_path, capsys):
    argv = ["--render", "24", "--max-images", "32", "--batch", "16", "--samples", "2", "--threads", "1"]
    argv += ["--channels", "16,32", "--dtype", "bfloat16", "--device", "cpu", "--out", str(tmp_path)]
    control.main(argv)
    head, *lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert head["images"] == 24 and head["channels"] == [16, 32] and head["dtype"] == "bfloat16"
    assert head["fresh_nearest"] > 0.05
    assert [line["images"] for line in lines] == [32]  # stopped by --max-images, sampled once
    (last,) = lines
    for name in ("ema", "raw"):
        assert last[f"{name}_fit"] is None or 0 <= last[f"{name}_fit"] <= 1
        assert last[f"{name}_nearest"] > 0
        assert Image.open(tmp_path / f"{name}-2.png").size == (2 * 96, 96)


@pytest.mark.parametrize(
    "argv",
    [
        [],  # no data
        ["some/folder", "--render", "4"],  # both
        ["--render", "0"],
        ["--render", "4", "--every", "0"],
        ["--render", "4", "--channels", "32,60"],  # not a multiple of 8
    ],
)
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit) as e:
        control.main(argv)
    assert e.value.code == 2
