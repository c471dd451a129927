"""``benchmarks/caption_probe.py`` on the tiny random test model: a JSON line per scale and a picture."""

from __future__ import annotations

import json

from PIL import Image

from benchmarks import caption_probe
from pipelines.data.scene import render_sample
from pipelines.evaluate.scene_parser import parse_scene


def test_template_fit_tells_shapes_from_blobs():
    renders = [render_sample(7, "train", i, 32).image for i in range(4)]
    fit = caption_probe.template_fit([o.fit for im in renders for o in parse_scene(im).objects])
    assert fit is not None and fit > 0.9
    assert caption_probe.template_fit([]) is None


def test_lines_and_picture(tmp_path, capsys, tiny_model_dir):
    caption_probe.main(str(tiny_model_dir), 3, [1.0, 3.0], 2, tmp_path)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["guidance"] for line in lines] == [1.0, 3.0]
    assert all(0 <= line["colour"] <= 1 and 0 <= line["shape"] <= 1 for line in lines)
    assert all(line["fit"] is None or 0 <= line["fit"] <= 1 for line in lines)
    assert Image.open(tmp_path / "caption-probe-g3.0.png").size == (3 * 3 * 32, 2 * 3 * 32)
