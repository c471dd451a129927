"""The synthetic dataset: determinism, captions and ground truth agree, held-out split, files."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.data.scene import RELATIONS, render_scene, shape_mask
from pipelines.data.synth import (
    COLOURS,
    DEPTH_LEVELS,
    FORMAT,
    HELDOUT_PAIRS,
    SCHEMA,
    SHAPES,
    parse_caption,
    render_sample,
    write_synth,
)
from pipelines.files import OutputInUse

REPO = Path(__file__).resolve().parents[2]


def _expected_relation(a: dict, b: dict) -> str:
    dx, dy = b["centre"][0] - a["centre"][0], b["centre"][1] - a["centre"][1]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def _png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_palette_and_heldout_constants():
    assert {"circle", "square", "triangle", "star", "ring"} <= set(SHAPES)
    chromatic = [c for c in COLOURS if c not in ("white", "gray", "black")]
    assert len(chromatic) >= 8
    rgb = np.array(list(COLOURS.values()), float)
    dist = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(len(rgb)) * 1e9
    assert dist.min() >= 100  # every two named colours are far apart
    assert 5 <= len(HELDOUT_PAIRS) <= 8 and len(set(HELDOUT_PAIRS)) == len(HELDOUT_PAIRS)
    for colour, shape in HELDOUT_PAIRS:
        assert colour in chromatic and shape in SHAPES
    assert DEPTH_LEVELS == (0, 85, 170, 255)


def test_render_is_deterministic_and_seeded():
    a, b = render_sample(7, "train", 3, 64), render_sample(7, "train", 3, 64)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.instances, b.instances)
    assert np.array_equal(a.depth, b.depth) and a.scene == b.scene and a.caption == b.caption
    other = [render_sample(8, "train", i, 64) for i in range(4)]
    mine = [render_sample(7, "train", i, 64) for i in range(4)]
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(mine, other, strict=True))
    assert render_sample(7, "heldout", 3, 64).scene != a.scene


def test_sample_depends_only_on_index():
    forward = [render_sample(1, "train", i, 32) for i in range(6)]
    backward = [render_sample(1, "train", i, 32) for i in reversed(range(6))][::-1]
    for x, y in zip(forward, backward, strict=True):
        assert np.array_equal(x.image, y.image) and x.caption == y.caption


@pytest.mark.parametrize("resolution", [16, 48, 64, 97])
def test_any_resolution(resolution):
    for i in range(10):
        s = render_sample(0, "train", i, resolution)
        assert s.image.shape == (resolution, resolution, 3) and s.image.dtype == np.uint8
        assert s.instances.shape == s.depth.shape == (resolution, resolution)
        assert s.instances.dtype == s.depth.dtype == np.uint8
        assert set(np.unique(s.instances)) == set(range(len(s.scene["objects"]) + 1))


def _check_sample(s) -> None:
    scene, objs = s.scene, sorted(s.scene["objects"], key=lambda o: o["z"])
    assert [o["z"] for o in objs] == list(range(1, len(objs) + 1)) and 1 <= len(objs) <= 3
    # The caption parses back to exactly the scene.
    parsed = parse_caption(s.caption)
    assert [(o["colour"], o["shape"]) for o in parsed["objects"]] == [(o["colour"], o["shape"]) for o in objs]
    assert parsed["background"]["kind"] == scene["background"]["kind"]
    assert parsed["background"]["colours"] == scene["background"]["colours"]
    assert len(parsed["relations"]) == len(objs) - 1
    for r in parsed["relations"]:
        assert r["relation"] in RELATIONS
        assert r["relation"] == _expected_relation(objs[r["subject"]], objs[r["object"]])
    # Instance map, colours and depth agree with the scene; objects are visible enough.
    res = s.image.shape[0]
    for o in objs:
        visible = s.instances == o["z"]
        assert visible.any(), f"object {o['z']} not drawn"
        assert (s.image[visible] == o["rgb"]).all()
        assert tuple(o["rgb"]) == COLOURS[o["colour"]]
        own = shape_mask(o["shape"], o["centre"], o["size"], o["rotation"], res)
        assert visible.sum() >= 0.4 * own.sum() and not (visible & ~own).any()
    assert np.array_equal(s.depth, np.asarray(DEPTH_LEVELS, np.uint8)[s.instances])
    # Background pixels are far from every object colour in the image.
    bg = s.image[s.instances == 0].astype(float)
    for o in objs:
        assert np.linalg.norm(bg - o["rgb"], axis=-1).min() > 80
    # The JSON scene re-renders to the same pixels.
    image, instances, depth = render_scene(json.loads(json.dumps(scene)), res)
    assert np.array_equal(image, s.image) and np.array_equal(instances, s.instances)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_captions_and_ground_truth_agree(split):
    for i in range(150):
        _check_sample(render_sample(3, split, i, 48 if i % 2 else 64))


def test_captions_at_low_resolution():
    for i in range(40):
        _check_sample(render_sample(0, "train", i, 16))


def test_grammar_covers_every_form():
    caps = [render_sample(0, "train", i, 32).caption for i in range(150)]
    assert any(" gradient background" in c for c in caps) and any(" gradient" not in c for c in caps)
    counts = {len(parse_caption(c)["objects"]) for c in caps}
    assert counts == {1, 2, 3}
    assert any(c.startswith("an orange") for c in caps)
    assert parse_caption(
        "a red circle to the left of a blue square, which is above a green star, on a yellow background"
    ) == {
        "objects": [
            {"colour": "red", "shape": "circle"},
            {"colour": "blue", "shape": "square"},
            {"colour": "green", "shape": "star"},
        ],
        "relations": [
            {"subject": 0, "relation": "to the left of", "object": 1},
            {"subject": 1, "relation": "above", "object": 2},
        ],
        "background": {"kind": "plain", "colours": ["yellow"]},
    }
    for bad in ("a red circle", "a red blob on a yellow background", "two red circles on a white background"):
        with pytest.raises(ValueError, match="not a synth caption"):
            parse_caption(bad)


def test_heldout_pairs_split():
    held = set(HELDOUT_PAIRS)
    for i in range(300):
        objs = render_sample(0, "train", i, 16).scene["objects"]
        assert not any((o["colour"], o["shape"]) in held for o in objs), i
    for i in range(100):
        objs = render_sample(0, "heldout", i, 16).scene["objects"]
        assert any((o["colour"], o["shape"]) in held for o in objs), i


def test_occlusion_happens():
    occluded = 0
    for i in range(200):
        s = render_sample(0, "train", i, 32)
        for o in s.scene["objects"]:
            own = shape_mask(o["shape"], o["centre"], o["size"], o["rotation"], 32)
            occluded += int((own & (s.instances != o["z"])).any())
    assert occluded >= 20


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        render_sample(0, "test", 0, 64)
    with pytest.raises(ValueError, match="resolution"):
        render_sample(0, "train", 0, 8)
    with pytest.raises(ValueError, match="seed"):
        render_sample(-1, "train", 0, 64)
    with pytest.raises(ValueError, match="count"):
        write_synth("/nonexistent/never", 0, 64, 0, "train")


def test_written_files(tmp_path):
    out = tmp_path / "synth"
    summary = write_synth(out, 5, 48, 2, "heldout", rows_per_file=2, progress=False)
    assert summary.files == 3 and summary.written == 3 and summary.count == 5
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    manifest = json.loads((out / "synth.json").read_text())
    assert manifest["format"] == FORMAT
    assert {k: manifest[k] for k in ("count", "resolution", "seed", "split")} == {
        "count": 5,
        "resolution": 48,
        "seed": 2,
        "split": "heldout",
    }
    assert manifest["shapes"] == list(SHAPES) and manifest["colours"]["red"] == list(COLOURS["red"])
    assert [tuple(p) for p in manifest["heldout_pairs"]] == list(HELDOUT_PAIRS)
    assert [f["path"] for f in manifest["files"]] == parts and [f["rows"] for f in manifest["files"]] == [
        2,
        2,
        1,
    ]
    # Readers take the shards by name: the directory also holds synth.json and preview.png.
    table = pq.ParquetDataset([str(out / p) for p in parts]).read()
    assert table.schema.names == SCHEMA.names
    assert [f.type for f in table.schema] == [f.type for f in SCHEMA]
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == [f"heldout-{i:08d}" for i in range(5)]
    for i, r in enumerate(rows):
        s = render_sample(2, "heldout", i, 48)
        img, inst, depth = _png(r["image"]), _png(r["gt_instances"]), _png(r["gt_depth"])
        assert img.mode == "RGB" and inst.mode == "L" and depth.mode == "L"
        assert np.array_equal(np.asarray(img), s.image) and np.array_equal(np.asarray(inst), s.instances)
        assert np.array_equal(np.asarray(depth), s.depth)
        assert r["caption"] == s.caption and json.loads(r["scene"]) == s.scene and r["split"] == "heldout"
    preview = _png((out / "preview.png").read_bytes())
    assert preview.format == "PNG" and preview.width > 0


def test_bytes_deterministic_and_idempotent(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_synth(a, 4, 32, 0, "train", rows_per_file=3, progress=False)
    write_synth(b, 4, 32, 0, "train", rows_per_file=3, progress=False)
    write_synth(c, 4, 32, 1, "train", rows_per_file=3, progress=False)
    for name in ("part-00000.parquet", "part-00001.parquet", "synth.json", "preview.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "part-00000.parquet").read_bytes() != (c / "part-00000.parquet").read_bytes()
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in a.iterdir()}
    again = write_synth(a, 4, 32, 0, "train", rows_per_file=3, progress=False)
    assert again.written == 0 and again.skipped == 2
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in a.iterdir()} == before
    # An interrupted run (one shard and the manifest missing) resumes to the same bytes.
    (a / "part-00001.parquet").unlink()
    (a / "synth.json").unlink()
    resumed = write_synth(a, 4, 32, 0, "train", rows_per_file=3, progress=False)
    assert resumed.written == 1
    assert {p.name: p.read_bytes() for p in a.iterdir()} == {k: v[0] for k, v in before.items()}


def test_refuses_foreign_output(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputInUse, match="not empty and holds no synth output"):
        write_synth(foreign, 2, 16, 0, "train", progress=False)
    assert sorted(os.listdir(foreign)) == ["notes.txt"]
    other = tmp_path / "other"
    write_synth(other, 2, 16, 0, "train", progress=False)
    for kwargs in ({"count": 3}, {"seed": 1}, {"resolution": 32}):
        args = {"count": 2, "resolution": 16, "seed": 0, **kwargs}
        (key,) = kwargs
        with pytest.raises(OutputInUse, match=f"holds a synth output with another {key}"):
            write_synth(other, split="train", progress=False, **args)
    # A shard from another run without a manifest is refused too.
    (other / "synth.json").unlink()
    with pytest.raises(OutputInUse, match="was written with"):
        write_synth(other, 2, 16, 1, "train", progress=False)
    file_out = tmp_path / "file"
    file_out.write_text("x")
    with pytest.raises(OutputInUse, match="not a directory"):
        write_synth(file_out, 2, 16, 0, "train", progress=False)


def test_job_end_to_end(tmp_path, capsys):
    out = tmp_path / "job"
    cmd = [sys.executable, "-m", "jobs.synth", "--output", str(out), "--count", "3", "--resolution", "24"]
    done = subprocess.run([*cmd, "--json"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["count"], summary["written"], summary["preview"]) == (3, 1, str(out / "preview.png"))
    assert "[data] 3 samples in 1 files" in done.stderr
    assert json.loads((out / "synth.json").read_text())["split"] == "train"
    assert pq.read_table(out / "part-00000.parquet").num_rows == 3
    for bad in (["--count", "0"], ["--count", "2", "--split", "test"], ["--count", "2", "--resolution", "4"]):
        done = subprocess.run(
            [sys.executable, "-m", "jobs.synth", "--output", str(tmp_path / "bad"), *bad],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and "error" in done.stderr
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    from jobs.synth import main

    assert main(["--output", str(tmp_path / "busy"), "--count", "2"]) == 2
    assert "recompose synth: error:" in capsys.readouterr().err
    # Settings also come from --set, like every other verb's.
    assert main(["--output", str(tmp_path / "set"), "--set", "count=2", "--set", "rows_per_file=1"]) == 0
    assert len(json.loads((tmp_path / "set" / "synth.json").read_text())["files"]) == 2
