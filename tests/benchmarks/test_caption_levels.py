"""``benchmarks/caption_levels.py`` on the tiny random test model: a line per level and a picture."""

from __future__ import annotations

import json

from PIL import Image

from benchmarks import caption_levels


def test_lines_picture_and_the_render_kept_at_the_lowest_level(tmp_path, capsys, tiny_model_dir):
    lines = caption_levels.main(str(tiny_model_dir), 3, [999, 1], 3.0, 4, tmp_path)
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed == lines and [line["level"] for line in lines] == [999, 1]
    assert all(line["n_images"] == 3 for line in lines)
    # From level 1 only the last DDIM step runs on the render noised to t = 1: even an untrained
    # model gives the render back, which the parser reads as the caption says; from pure noise
    # an untrained model draws no scene.
    assert lines[1]["colour"] == 1.0 and lines[1]["shape"] >= 2 / 3 and lines[1]["fit"] > 0.8
    assert lines[0]["colour"] < 0.5
    picture = Image.open(tmp_path / "caption-levels-g3.png")
    assert picture.size == (3 * 3 * 32, 3 * 3 * 32)  # renders + two levels, three images each
