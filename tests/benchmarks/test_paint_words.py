"""``benchmarks/paint_words.py`` on the tiny random test model: its JSON lines and its picture."""

from __future__ import annotations

import json

from PIL import Image

from benchmarks import paint_words


def test_figures(tmp_path, capsys, tiny_model_dir):
    figure = tmp_path / "paint.png"
    args = ["--model", str(tiny_model_dir), "--count", "3", "--weights", "0,2", "--steps", "2"]
    assert paint_words.main([*args, "--figure", str(figure)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["weight"] for line in lines] == [0.0, 2.0] and all(
        0 <= line["inside"] <= 1 for line in lines
    )
    assert Image.open(figure).size[0] > 4 * 96
