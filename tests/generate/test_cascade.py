"""Composer's cascade end to end, in-process, on tiny random models: ``recompose cascade``
assembles a 16 px base and a 16→32 upsampler; ``generate`` runs it from every condition kind,
to any of its resolutions, edits and outpaints exactly at the output resolution; ``upscale``
super-resolves a user's image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from pipelines.data.decode import DecodeConfig, decode_image
from pipelines.data.scene import render_sample
from tests.helpers.cascade import save_stage as _save

BASE, R = 16, 32


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cascade")
    out = {
        "base": _save(root / "base", "tiny", BASE),
        "upsampler": _save(root / "upsampler", "upsampler-tiny", R, 2),
        "other": _save(root / "other", "upsampler-tiny", 48, 3),  # 16→48: not after a 32 px stage
    }
    for i in range(2):
        out[f"img{i}"] = root / f"img{i}.png"
        Image.fromarray(render_sample(0, "train", i, 48).image).save(out[f"img{i}"])
    mask = np.zeros((48, 48), np.uint8)
    mask[12:36, 6:30] = 255
    out["mask"] = root / "mask.png"
    Image.fromarray(mask).save(out["mask"])
    out["small"] = root / "small.png"  # 24x20: the box that left=4,right=4,top=6,bottom=6 leaves at 32
    Image.fromarray(render_sample(0, "train", 5, 48).image[:20, :24]).save(out["small"])
    out["cascade"] = root / "cascade"
    assert (
        _run("cascade", "--base", out["base"], "--upsampler", out["upsampler"], "--output", out["cascade"])
        == 0
    )
    return out


def _run(*args) -> int:
    return main([str(a) for a in args])


def _generate(files, out: Path, *extra, model: str = "cascade") -> int:
    common = ("--model", files[model], "--output", out, "--steps", 2, "--upsampler-steps", 2)
    return _run("generate", *common, *extra)


def _png(p: Path) -> np.ndarray:
    return np.asarray(Image.open(p))


def test_cascade_assembles_and_refuses_a_broken_chain(files, tmp_path, capsys):
    index = json.loads((files["cascade"] / "cascade.json").read_text())
    assert index["format"] == "recompose.cascade/1"
    assert index["stages"] == ["base", "upsampler-1"] and index["resolutions"] == [BASE, R]
    assert (files["cascade"] / "upsampler-1" / "unet" / "config.json").is_file()
    cases = [
        (("--base", files["upsampler"], "--upsampler", files["upsampler"]), "must be a base model"),
        (("--base", files["base"], "--upsampler", files["base"]), "is a base model"),
        (
            ("--base", files["base"], "--upsampler", files["upsampler"], "--upsampler", files["other"]),
            "upsamples 16→48 px, but the stage before it makes 32 px",
        ),
        (("--base", files["base"], "--upsampler", files["upsampler"]), "already exists"),
    ]
    for args, message in cases:
        out = files["cascade"] if message == "already exists" else tmp_path / "bad"
        assert _run("cascade", *args, "--output", out) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()


def test_the_cascade_generates_at_the_last_stage_from_every_condition_kind(files, tmp_path):
    img0, img1 = files["img0"], files["img1"]
    conditions = (
        "--text", "a red circle", "--palette", "#ff0000,#00ff00", "--sketch-from", img0,
        "--instances-from", img0, "--intensity-from", img1, "--semantics-from", img1,
        "--guidance", "3", "--upsampler-guidance", "text=2,sketch=1",
    )  # fmt: skip
    out = tmp_path / "full"
    assert _generate(files, out, *conditions, "--num-images", 2, "--seed", 3) == 0
    record = json.loads((out / "generate.json").read_text())
    assert record["resolution"] == R
    assert [s["resolution"] for s in record["cascade"]] == [BASE, R]
    assert record["cascade"][1]["guidance"]["text"] == "text=2,sketch=1"
    for i in range(2):
        assert _png(out / f"sample-{i:04d}.png").shape == (R, R, 3)
        assert _png(out / "stages" / "base" / f"sample-{i:04d}.png").shape == (BASE, BASE, 3)
    assert _png(out / "conditions" / "sketch.png").shape == (R, R)  # the maps of the output stage
    assert set(record["files"]) >= {"stages/base/sample-0001.png", "grid.png"}

    # --resolution 16 runs the base alone: the same samples as the full run's base stage
    base_only = tmp_path / "base-only"
    assert _generate(files, base_only, *conditions, "--num-images", 2, "--seed", 3, "--resolution", BASE) == 0
    assert "cascade" not in json.loads((base_only / "generate.json").read_text())
    for i in range(2):
        a, b = base_only / f"sample-{i:04d}.png", out / "stages" / "base" / f"sample-{i:04d}.png"
        assert np.array_equal(_png(a), _png(b))


def test_masked_edit_is_exact_at_the_output_resolution(files, tmp_path):
    out = tmp_path / "edit"
    extra = ("--mask", files["mask"], "--source", files["img1"], "--text", "a green star")
    assert _generate(files, out, *extra, "--num-images", 2) == 0
    source = decode_image(files["img1"].read_bytes(), R, DecodeConfig())
    mask = _png(out / "conditions" / "mask.png") > 0
    assert mask.shape == (R, R) and 0.2 < mask.mean() < 0.4
    for i in range(2):
        sample = _png(out / f"sample-{i:04d}.png")
        assert (sample[~mask] == source[~mask]).all()
        assert (sample[mask] != source[mask]).any()


def test_outpainting_keeps_the_source_pixels_exactly(files, tmp_path):
    small = _png(files["small"])
    for model, side in (("cascade", R), ("base", BASE)):
        out = tmp_path / model
        pad = "left=4,right=4,top=6,bottom=6" if side == R else "left=2,right=2,top=3,bottom=3"
        assert _generate(files, out, "--outpaint", pad, "--source", files["small"], model=model) == 0
        sample = _png(out / "sample-0000.png")
        mask = _png(out / "conditions" / "mask.png") > 0
        assert sample.shape == (side, side, 3) and mask.sum() == side * side - (side * 3 // 4) * (
            side * 5 // 8
        )
        source = _png(out / "conditions" / "source.png")  # the canvas: the source, edges repeated
        assert np.array_equal(sample[~mask], source[~mask])
        if side == R:  # given at the box's size, the source is kept bit for bit
            assert np.array_equal(sample[6:26, 4:28], small)
        assert (sample[mask] != source[mask]).any()  # the border is really generated
    assert _generate(files, tmp_path / "x", "--outpaint", "left=20,right=20", "--source", files["small"]) == 2
    assert _generate(files, tmp_path / "y", "--outpaint", "up=3", "--source", files["small"]) == 2
    assert _generate(files, tmp_path / "z", "--outpaint", "left=3") == 2


def test_bidirectional_runs_at_every_stage(files, tmp_path):
    out = tmp_path / "bi"
    extra = ("--bidirectional", "--source", files["img0"], "--sketch-from", files["img1"], "--text", "a star")
    assert _generate(files, out, *extra) == 0
    record = json.loads((out / "generate.json").read_text())
    assert record["bidirectional"] and record["resolution"] == R
    assert _png(out / "sample-0000.png").shape == (R, R, 3)


def test_bad_cascade_settings_exit_2(files, tmp_path, capsys):
    cases = [
        (("--resolution", 24), "this cascade makes 16, 32 px"),
        (("--upsampler-steps", "2,3"), "2 values for a cascade with 1 upsampler"),
        (("--upsampler-steps", "two"), "not whole numbers"),
        (("--upsampler-guidance", "sketch=2", "--text", "x"), "--upsampler-guidance"),
    ]
    for args, message in cases:
        assert _generate(files, tmp_path / "bad", *args) == 2
        assert message in capsys.readouterr().err
    assert _generate(files, tmp_path / "bad", model="upsampler") == 2
    assert "is an upsampler (×2)" in capsys.readouterr().err


def test_upscale_with_an_upsampler_or_a_cascade(files, tmp_path, capsys):
    for model in ("upsampler", "cascade"):
        out = tmp_path / model
        args = ("--model", files[model], "--input", files["img0"], "--output", out, "--steps", 2)
        assert _run("upscale", *args, "--text", "a red circle", "--num-images", 2, "--json") == 0
        record = json.loads(capsys.readouterr().out)
        assert record == json.loads((out / "upscale.json").read_text())
        assert record["factor"] == 2 and (record["input_side"], record["output_side"]) == (BASE, R)
        assert _png(out / "input.png").shape == (BASE, BASE, 3)
        assert _png(out / "bicubic.png").shape == (R, R, 3)
        assert [_png(out / f"sample-{i:04d}.png").shape for i in range(2)] == [(R, R, 3)] * 2
        assert _png(out / "grid.png").shape[1] > 4 * R
    assert (
        _run(
            "upscale", "--model", files["upsampler"], "--input", files["img0"], "--output", out, "--steps", 2
        )
        == 2
    )
    assert "already holds an upscale" in capsys.readouterr().err
    bad = [
        (("--model", files["base"]), "is a base model, not an upsampler"),
        (("--model", files["cascade"], "--factor", 4), "--factor 4: this model upsamples by ×2"),
        (("--model", files["upsampler"], "--guidance", "sketch=2"), "--guidance"),
    ]
    for args, message in bad:
        assert _run("upscale", *args, "--input", files["img0"], "--output", tmp_path / "bad") == 2
        assert message in capsys.readouterr().err
