"""``recompose generate`` end to end, in-process, on a tiny random pipeline (32 px, few steps)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from pipelines.data.decode import DecodeConfig, decode_image
from pipelines.data.decomposer import ImageDecomposer
from pipelines.data.scene import render_sample

R = 32
# generate.json's keys, which other tools read; a bidirectional run adds BIDIRECTIONAL.
RECORD_KEYS = {
    "format", "model", "arguments", "seed", "steps", "num_images", "resolution", "scheduler",
    "threshold", "device", "guidance", "bidirectional", "decompose", "conditions", "images",
    "files", "phases_s", "wall_time_s",
}  # fmt: skip
BIDIRECTIONAL = {"invert_guidance", "inverted_from_source", "source"}
# No weights anywhere: canny sketches, clustered instances, no depth model.
DECOMPOSE = {"resolution": R, "sketch": {"method": "canny"}, "instances": {"method": "cluster"}}


def _save_pipeline(directory: Path, decompose: dict, **model_kw) -> Path:
    import torch

    from models import build_model
    from pipelines.diffusion.pipeline import ComposerPipeline
    from pipelines.diffusion.schedulers import default_scheduler

    torch.manual_seed(0)
    model = build_model("tiny", sample_size=R, **model_kw).eval()
    ComposerPipeline(model, default_scheduler(), decompose=decompose).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("generate")
    out = {"model": _save_pipeline(root / "model", DECOMPOSE)}
    for i in range(2):  # 48 px, so decoding really resizes
        out[f"img{i}"] = root / f"img{i}.png"
        Image.fromarray(render_sample(0, "train", i, 48).image).save(out[f"img{i}"])
    mask = np.zeros((48, 48), np.uint8)
    mask[12:36, 6:30] = 255  # white = regenerate
    out["mask"] = root / "mask.png"
    Image.fromarray(mask).save(out["mask"])
    return out


def _generate(files, output: Path, *extra: str, steps: int = 2) -> int:
    return main(
        ["generate", "--model", str(files["model"]), "--output", str(output), "--steps", str(steps), *extra]
    )


def _full_args(files) -> list[str]:
    img0, img1 = str(files["img0"]), str(files["img1"])
    return [
        "--text", "a red circle above a blue star",
        "--palette", "#ff0000,#00ff00",
        "--sketch-from", img0,
        "--instances-from", img0,
        "--intensity-from", img1,
        "--semantics-from", img1,
        "--num-images", "2",
        "--seed", "7",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def full_run(files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "out"
    assert _generate(files, out, *_full_args(files)) == 0
    return out


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _samples(out: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(out.glob("sample-*.png"))]


def test_full_run_writes_samples_pictures_grid_and_record(files, full_run, capsys):
    names = {"semantics", "palette", "sketch", "instances", "intensity"}
    assert {p.stem for p in (full_run / "conditions").glob("*.png")} == names
    for p in [full_run / "sample-0000.png", full_run / "sample-0001.png"] + [
        full_run / "conditions" / f"{n}.png" for n in ("sketch", "instances", "intensity", "semantics")
    ]:
        assert Image.open(p).size == (R, R), p
    assert Image.open(full_run / "conditions" / "sketch.png").mode == "L"
    grid = Image.open(full_run / "grid.png")
    assert grid.width > 5 * R and grid.height > 2 * R

    rec = json.loads((full_run / "generate.json").read_text())
    assert set(rec) == RECORD_KEYS
    assert rec["model"] == str(files["model"].resolve())
    assert rec["seed"] == 7 and rec["steps"] == 2 and rec["num_images"] == 2 and rec["resolution"] == R
    assert rec["scheduler"] == "ddim" and rec["threshold"] == "clip"
    assert rec["guidance"]["text"] == "3"
    assert rec["guidance"]["targets"] == [{"c2": sorted(names | {"caption"}), "weight": 3.0}]
    assert set(rec["conditions"]) == names | {"caption"}
    assert rec["conditions"]["sketch"] == {
        "from": f"--sketch-from {files['img0']}",
        "picture": "conditions/sketch.png",
    }
    assert rec["conditions"]["caption"]["picture"] is None
    assert rec["arguments"]["text"] == "a red circle above a blue star"
    assert rec["decompose"] == DECOMPOSE
    assert [i["file"] for i in rec["images"]] == ["sample-0000.png", "sample-0001.png"]
    for name, sha in rec["files"].items():
        assert _sha(full_run / name) == sha, name
    assert rec["wall_time_s"] > 0 and set(rec["phases_s"]) == {"load_s", "decompose_s", "sample_s", "write_s"}
    assert not list(full_run.rglob("*.tmp"))


def test_condition_pictures_go_back_in_unchanged(files, full_run):
    dec = ImageDecomposer(DECOMPOSE, R)
    made = dec.decompose(dec.load_image(files["img0"]), ["sketch", "instances"])
    assert made["instances"].max() >= 2  # a real test of the colour -> id mapping
    for name in ("sketch", "instances"):
        back = dec.load_map(name, full_run / "conditions" / f"{name}.png")
        np.testing.assert_array_equal(back, made[name], err_msg=name)


def test_same_seed_same_images_other_seed_other_images(files, full_run, tmp_path):
    assert _generate(files, tmp_path / "again", *_full_args(files)) == 0
    assert _samples(tmp_path / "again") == _samples(full_run)
    args = _full_args(files)
    args[args.index("--seed") + 1] = "8"
    args[args.index("--num-images") + 1] = "1"  # sample i depends on the seed, not on their number
    assert _generate(files, tmp_path / "other", *args) == 0
    assert _samples(tmp_path / "other")[0] != _samples(full_run)[0]


def test_masked_edit_keeps_every_pixel_outside_the_mask(files, tmp_path):
    out = tmp_path / "edit"
    extra = ["--mask", str(files["mask"]), "--source", str(files["img1"]), "--text", "a green star"]
    assert _generate(files, out, *extra, "--num-images", "2", steps=1) == 0
    source = decode_image(files["img1"].read_bytes(), R, DecodeConfig())
    mask = np.asarray(Image.open(out / "conditions" / "mask.png")) > 0
    assert 0.2 < mask.mean() < 0.4  # the 24x24 of 48x48 box, at 32 px
    assert not mask[:6].any() and not mask[:, 22:].any()
    np.testing.assert_array_equal(np.asarray(Image.open(out / "conditions" / "source.png")), source)
    for p in sorted(out.glob("sample-*.png")):
        sample = np.asarray(Image.open(p))
        assert (sample[~mask] == source[~mask]).all(), p
        assert (sample[mask] != source[mask]).any(), p  # the region is really regenerated
    assert json.loads((out / "generate.json").read_text())["guidance"]["targets"][0]["c2"] == [
        "caption",
        "mask",
    ]


def test_bidirectional_with_an_edited_sketch(files, full_run, tmp_path):
    sketch = np.asarray(Image.open(full_run / "conditions" / "sketch.png")).copy()
    sketch[R // 2, :] = 255  # the edit: a horizontal line
    edited = tmp_path / "sketch-edited.png"
    Image.fromarray(sketch).save(edited)
    out = tmp_path / "bi"
    extra = ["--bidirectional", "--source", str(files["img0"]), "--sketch-map", str(edited)]
    assert (
        _generate(files, out, *extra, "--text", "a red ring", "--source-text", "a red circle", steps=1) == 0
    )
    rec = json.loads((out / "generate.json").read_text())
    assert set(rec) == RECORD_KEYS | BIDIRECTIONAL
    assert rec["bidirectional"] is True and rec["threshold"] == "none"
    assert rec["inverted_from_source"] == {
        "caption": "--source-text",
        "sketch": f"sketch of --source {files['img0']}",
    }
    assert rec["conditions"]["sketch"]["from"] == f"--sketch-map {edited}"
    np.testing.assert_array_equal(np.asarray(Image.open(out / "conditions" / "sketch.png")), sketch)
    assert Image.open(out / "sample-0000.png").size == (R, R)


def test_depth_without_weights_is_a_clear_error(files, tmp_path, capsys):
    out = tmp_path / "depth"
    assert _generate(files, out, "--depth-from", str(files["img0"])) == 2
    err = capsys.readouterr().err
    assert "depth cannot be decomposed with this pipeline's settings" in err
    assert "depth needs a depth model" in err  # the extractor's own reason
    assert not (out / "generate.json").exists()


def test_existing_output_is_refused_then_replaced_with_overwrite(files, full_run, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(full_run, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert _generate(files, out, "--text", "anything") == 2
    assert "already holds a generation" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    assert _generate(files, out, "--text", "anything", "--overwrite", steps=1) == 0
    rec = json.loads((out / "generate.json").read_text())
    assert rec["arguments"]["text"] == "anything"
    # The previous run's files this run did not write are gone; nothing else is left over.
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(
        [*rec["files"], "generate.json"]
    )


def test_config_file_flags_set_and_json(files, tmp_path, capsys):
    """defaults < --config < flags < --set; --json prints generate.json; an interrupted run's
    leftovers (samples, conditions/, temporary files) are generated over."""
    config = tmp_path / "generate.yaml"
    config.write_text(f"model: {files['model']}\nsteps: 5\nseed: 7\ntext: a red circle\n")
    out = tmp_path / "out"
    (out / "conditions").mkdir(parents=True)
    (out / "sample-0000.png").write_bytes(b"cut short")
    (out / ".grid.png.x1y2.tmp").write_bytes(b"cut short")
    args = ["--config", str(config), "--output", str(out), "--steps", "1", "--set", "seed=3", "--json"]
    assert main(["generate", *args]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "generate.json").read_text())
    assert (printed["steps"], printed["seed"], printed["arguments"]["text"]) == (1, 3, "a red circle")


def test_a_directory_of_other_files_is_refused(files, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("not a generation")
    assert _generate(files, out, "--text", "x") == 2
    assert "holds no generation" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--palette", "#ff0000,notacolour"], "--palette"),
        (["--palette", ""], "--palette"),
        (["--text", "x", "--guidance", "text=lots"], "--guidance"),
        (["--text", "x", "--guidance", "sketch=2"], "--guidance"),
        (["--mask", "m.png"], "--mask needs --source"),
        (["--steps", "0"], "--steps"),
        (["--num-images", "0"], "--num-images"),
        (["--set", "steps=0"], "steps: Input should be greater than or equal to 1"),
    ],
)
def test_bad_flags_exit_2(files, tmp_path, capsys, args, message):
    assert _generate(files, tmp_path / "out", *args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_or_invalid_model_dir_exits_2(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "--model", str(tmp_path / "nope"), "--output", str(out)]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path), "--output", str(out)]) == 2
    assert "no model_index.json" in capsys.readouterr().err
    assert _generate(files, out, "--sketch-from", str(tmp_path / "missing.png")) == 2
    assert "no such file" in capsys.readouterr().err


def test_clip_encoders_decompose_text_and_semantics_with_clip(files, tmp_path, no_network):
    from tests.helpers.tiny_clip import TINY_CLIP_CFG, make_tiny_open_clip

    clip = make_tiny_open_clip(tmp_path / "clip")
    dim, width = TINY_CLIP_CFG["embed_dim"], TINY_CLIP_CFG["text_cfg"]["width"]
    length = TINY_CLIP_CFG["text_cfg"]["context_length"]
    decompose = {**DECOMPOSE, "caption": {"clip_model": clip}, "semantics": {"clip_model": clip}}
    model = _save_pipeline(
        tmp_path / "model",
        decompose,
        caption_encoder="clip",
        semantics_encoder="clip",
        caption_sentence_dim=dim,
        caption_token_dim=width,
        caption_length=length,
        semantics_dim=dim,
    )
    dec = ImageDecomposer(decompose, R, "clip", "clip")
    made = {**dec.caption("a red circle"), **dec.semantics(dec.load_image(files["img1"]))}
    assert {k: v.shape for k, v in made.items()} == {
        "caption.clip_sentence": (dim,),
        "caption.clip_tokens": (length, width),
        "semantics": (dim,),
    }
    out = tmp_path / "out"
    args = ["--model", str(model), "--output", str(out), "--steps", "2"]
    assert main(["generate", *args, "--text", "a red circle", "--semantics-from", str(files["img1"])]) == 0
    assert set(json.loads((out / "generate.json").read_text())["conditions"]) == {"caption", "semantics"}
    assert no_network == []


def test_clip_and_t5_captions_together(files, tmp_path, no_network):
    """caption_encoder="clip+t5": both frozen embeddings, joined as model_inputs.join_tokens says."""
    from pipelines.diffusion.inputs import to_conditions
    from tests.helpers.tiny_clip import TINY_CLIP_CFG, make_tiny_open_clip
    from tests.helpers.tiny_t5 import make_tiny_t5

    clip, t5 = make_tiny_open_clip(tmp_path / "clip"), make_tiny_t5(tmp_path / "t5")
    dim, width = TINY_CLIP_CFG["embed_dim"], TINY_CLIP_CFG["text_cfg"]["width"]
    length, t5_len, t5_dim = TINY_CLIP_CFG["text_cfg"]["context_length"], 8, 16
    decompose = {**DECOMPOSE, "caption": {"clip_model": clip, "t5_model": t5, "t5_max_length": t5_len}}
    model_dir = _save_pipeline(
        tmp_path / "model",
        decompose,
        caption_encoder="clip+t5",
        caption_sentence_dim=dim + t5_dim,
        caption_token_dim=width + t5_dim,
        caption_length=length + t5_len,
    )
    dec = ImageDecomposer(decompose, R, "clip+t5", "trainable")
    made = dec.caption("a red circle")
    assert {k: v.shape for k, v in made.items()} == {
        "caption.clip_sentence": (dim,),
        "caption.clip_tokens": (length, width),
        "caption.t5_sentence": (t5_dim,),
        "caption.t5_tokens": (t5_len, t5_dim),
    }
    from pipelines.diffusion.pipeline import ComposerPipeline

    pipe = ComposerPipeline.from_pretrained(model_dir)
    rows = {k: v[None] for k, v in made.items()}
    c = to_conditions(pipe.unet, rows)
    assert c.caption_sentence.shape == (1, dim + t5_dim)
    tokens = c.caption_tokens[0].numpy()
    assert np.array_equal(tokens[:length, :width], made["caption.clip_tokens"].astype(np.float32))
    assert np.array_equal(tokens[length:, width:], made["caption.t5_tokens"].astype(np.float32))
    assert not tokens[:length, width:].any() and not tokens[length:, :width].any()
    out = tmp_path / "out"
    assert (
        main(["generate", "--model", str(model_dir), "--output", str(out), "--steps", "2", "--text", "a cat"])
        == 0
    )
    # paint-with-words finds a phrase with both tokenizers: CLIP's after its start token, T5's after
    # the CLIP tokens (join_tokens)
    assert pipe.phrase_tokens("a red circle", "red circle") == [2, 3, length + 1, length + 2]
    region = np.zeros((R, R), np.uint8)
    region[:, : R // 2] = 255
    Image.fromarray(region).save(tmp_path / "left.png")
    args = ["generate", "--model", str(model_dir), "--steps", "2", "--text", "a red circle"]
    painted = ["--paint", f"red circle={tmp_path / 'left.png'}", "--output", str(tmp_path / "painted")]
    assert main([*args, *painted]) == 0
    assert (
        main([*args, "--paint", f"blue star={tmp_path / 'left.png'}", "--output", str(tmp_path / "x")]) == 2
    )
    assert no_network == []


def test_without_model_the_shipped_reference_model_generates(tmp_path):
    out = tmp_path / "gen"
    assert main(["generate", "--output", str(out), "--text", "a red circle", "--steps", "2"]) == 0
    record = json.loads((out / "generate.json").read_text())
    assert record["model"] == "recompose:reference" and record["arguments"]["model"] == "recompose:reference"
    assert np.asarray(Image.open(out / "sample-0000.png")).shape == (32, 32, 3)
