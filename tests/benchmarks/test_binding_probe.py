"""``benchmarks/binding_probe.py`` on the tiny random test model: two JSON lines and a picture."""

from __future__ import annotations

import json

from PIL import Image

from benchmarks import binding_probe
from pipelines.data.scene import parse_caption


def test_scenes_have_several_objects():
    rows = binding_probe.scenes(6, 32)
    assert len(rows) == 6 and all(len(parse_caption(r.caption)["objects"]) >= 2 for r in rows)


def test_lines_and_picture(tmp_path, capsys, tiny_model_dir):
    binding_probe.main(str(tiny_model_dir), 3, 3.0, 2, tmp_path)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["given"] for line in lines] == ["instances", "instances+caption"]
    assert all(line["n_images"] == 3 and 0 <= line["pairs"] <= 1 for line in lines)
    picture = Image.open(tmp_path / "binding-probe-g3.png")
    assert picture.size[0] == picture.size[1] > 0  # three rows (render, map, map + caption) of three
