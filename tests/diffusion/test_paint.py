"""Paint-with-words (eDiffi §4.3; models/paint.py, pipelines/diffusion/paint.py): the bias formula,
phrase -> token positions for every caption encoder, the pipeline painting (only rows with the
caption, processors restored), on a pixel model and on a pretrained latent base, and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.cli import main
from models.paint import PaintAttnProcessor, Painting
from pipelines.diffusion.paint import (
    PaintError,
    base_positions,
    clip_positions,
    t5_positions,
    trainable_positions,
)
from tests.diffusion.test_pipeline import make_pipe

CAPTION = "a red circle above a blue star on a white background"


def test_the_bias_is_w_log1p_sigma_max_logit_inside_the_region_for_the_phrase_tokens():
    regions = torch.zeros(1, 1, 4, 4)
    regions[0, 0, :2, :] = 1  # the top half
    tokens = torch.zeros(1, 1, 3, dtype=torch.bool)
    tokens[0, 0, 1] = True  # token 1 is the phrase
    p = Painting(regions, tokens, weight=2.0, sigma=3.0, rows=torch.tensor([0, -1]))
    logits = torch.randn(2, 2, 16, 5)  # 2 rows, 2 heads, a 4×4 grid, 5 tokens (2 not caption)
    bias = p.bias(logits)
    top = logits.amax(dim=(-2, -1)).clamp(min=0)
    expected = 2.0 * math.log1p(3.0) * top[0]  # (heads,)
    assert torch.allclose(bias[0, :, :8, 1], expected[:, None].expand(2, 8))  # the top half, token 1
    assert bias[0, :, 8:, :].abs().max() == 0 and bias[0, :, :, [0, 2, 3, 4]].abs().max() == 0
    assert bias[1].abs().max() == 0  # a row without the caption is never painted
    # regions resize to each layer's grid by area: at 2×2 the top half is still exactly painted
    assert torch.allclose(
        p.mask(4, 5, torch.device("cpu"), torch.float32)[0, 0, :, 1], torch.tensor([1.0, 1, 0, 0])
    )
    with pytest.raises(ValueError, match="square query grid"):
        p.mask(6, 5, torch.device("cpu"), torch.float32)


def test_phrases_map_to_each_encoders_token_positions(tmp_path):
    assert trainable_positions(CAPTION, "red circle", 24) == [1, 2]
    assert trainable_positions(CAPTION, "Blue  STAR", 24) == [5, 6]
    with pytest.raises(PaintError, match="not in the caption"):
        trainable_positions(CAPTION, "green square", 24)
    with pytest.raises(PaintError, match="not in the caption"):  # past the tokens the model reads
        trainable_positions(CAPTION, "blue star", 4)
    # a base's CLIPTokenizer: position 0 is the start token
    from tests.helpers.tiny_sd import make_tiny_tokenizer

    make_tiny_tokenizer(tmp_path / "tok", max_length=16)
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tmp_path / "tok"))
    pos = base_positions(tok, "a red circle", "red circle")
    ids = tok("a red circle").input_ids
    core = tok("red circle", add_special_tokens=False).input_ids
    assert pos[0] >= 1 and [ids[i] for i in pos] == core
    # open_clip's tokenizer (start and end tokens, 0-padded)
    import open_clip

    tokenize = open_clip.get_tokenizer("ViT-B-32")
    assert clip_positions(tokenize, CAPTION, "blue star") == [6, 7]
    # T5's SentencePiece-style tokenizer (no start token, an end token)
    from transformers import AutoTokenizer

    from tests.helpers.tiny_t5 import make_tiny_t5

    t5 = AutoTokenizer.from_pretrained(make_tiny_t5(tmp_path / "t5"), local_files_only=True)
    assert t5_positions(t5, "a red circle on a blue square", "blue square", 16) == [5, 6]


def _region(side: int) -> np.ndarray:
    m = np.zeros((side, side), np.uint8)
    m[: side // 2, : side // 2] = 1
    return m


def test_painting_changes_the_samples_and_restores_the_attention_processors():
    pipe = make_pipe()
    r = pipe.image_size
    cond = {"text": CAPTION}
    processors = {k: type(v) for k, v in pipe.unet.unet.attn_processors.items()}
    plain = pipe(cond, num_inference_steps=6, num_images=2, seed=1).images
    painted = pipe(
        cond, num_inference_steps=6, num_images=2, seed=1, paint={"red circle": _region(r)}, paint_weight=4
    ).images
    assert np.abs(painted.astype(int) - plain.astype(int)).max() > 10
    assert {k: type(v) for k, v in pipe.unet.unet.attn_processors.items()} == processors
    # weight 0 adds nothing (the painted path computes attention by hand: float rounding only)
    zero = pipe(
        cond, num_inference_steps=6, num_images=2, seed=1, paint={"red circle": _region(r)}, paint_weight=0
    ).images
    assert np.abs(zero.astype(int) - plain.astype(int)).max() <= 1
    # requests that paint and requests that do not batch together, each as it would alone
    from pipelines.diffusion.requests import SampleRequest

    both = pipe.sample_batch(
        [
            SampleRequest(cond, num_images=2, seed=1, paint={"red circle": _region(r)}, paint_weight=4),
            SampleRequest(cond, num_images=2, seed=1, paint={}, paint_weight=4),
        ],
        6,
    )
    assert np.abs(both[0].images.astype(int) - painted.astype(int)).max() <= 1
    assert np.abs(both[1].images.astype(int) - plain.astype(int)).max() <= 1
    with pytest.raises(PaintError, match="not in the caption"):
        pipe(cond, num_inference_steps=2, paint={"green square": _region(r)})
    with pytest.raises(PaintError, match="give a caption"):
        pipe({}, num_inference_steps=2, paint={"red circle": _region(r)})
    with pytest.raises(PaintError, match="is empty"):
        pipe(cond, num_inference_steps=2, paint={"red circle": np.zeros((r, r), np.uint8)})


def test_only_rows_holding_the_caption_are_painted():
    """With guidance 'text=3,sketch=2' the c1 (no caption) branch must see no bias: its rows' mask is zero."""
    pipe = make_pipe()
    r = pipe.image_size
    seen: list[torch.Tensor] = []
    original = PaintAttnProcessor.__call__

    def spy(self, *a, **k):
        seen.append(self.painting.rows.clone())
        return original(self, *a, **k)

    PaintAttnProcessor.__call__ = spy
    try:
        sketch = (np.eye(r) * 255).astype(np.uint8)
        pipe(
            {"text": CAPTION, "sketch": sketch},
            guidance="text=3,sketch=2",
            num_inference_steps=2,
            num_images=2,
            paint={"red circle": _region(r)},
        )
    finally:
        PaintAttnProcessor.__call__ = original
    # branches c1 = {}, {caption}, {sketch}: rows 0-1, 2-3, 4-5; only the caption branch is painted
    assert seen and all(row.tolist() == [-1, -1, 0, 1, -1, -1] for row in seen)


def test_painting_on_a_pretrained_latent_base():
    import tempfile
    from pathlib import Path

    from pipelines.conditions.backbone import load_base
    from tests.diffusion.test_base_pipeline import make_pipe as make_base_pipe
    from tests.helpers.tiny_sd import make_tiny_sd

    with tempfile.TemporaryDirectory() as d:
        base = load_base(make_tiny_sd(Path(d) / "base"))
        pipe = make_base_pipe(base)
        r = pipe.image_size
        cond = {"text": "a red circle on a blue background"}
        plain = pipe(cond, num_inference_steps=4, seed=2).images
        painted = pipe(
            cond, num_inference_steps=4, seed=2, paint={"red circle": _region(r)}, paint_weight=8
        ).images
        assert not np.array_equal(plain, painted)
        from models.backbone import ExtraTokensAttnProcessor

        procs = [p for p in pipe.unet.modules() if isinstance(p, ExtraTokensAttnProcessor)]
        assert procs and all(p.painting is None for p in procs)


def test_the_cli_paints_and_records_it(tmp_path, tiny_model_dir):
    region = np.zeros((64, 64), np.uint8)
    region[:, :32] = 255
    Image.fromarray(region).save(tmp_path / "left.png")
    out = tmp_path / "out"
    args = [
        "generate",
        "--model",
        str(tiny_model_dir),
        "--text",
        CAPTION,
        "--steps",
        "3",
        "--output",
        str(out),
    ]
    assert main([*args, "--paint", f"red circle={tmp_path / 'left.png'}", "--paint-weight", "3"]) == 0
    record = json.loads((out / "generate.json").read_text())
    assert record["paint"] == {
        "weight": 3.0,
        "phrases": {"red circle": {"from": str(tmp_path / "left.png"), "picture": "conditions/paint-0.png"}},
    }
    picture = np.asarray(Image.open(out / "conditions" / "paint-0.png"))
    assert picture[:, :2].min() == 255 and picture[:, -2:].max() == 0
    bad = tmp_path / "bad"
    assert main([*args[:-1], str(bad), "--paint", f"green square={tmp_path / 'left.png'}"]) == 2
    assert main([*args[:-1], str(bad), "--paint", "red circle"]) == 2
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_model_dir),
                "--output",
                str(bad),
                "--paint",
                f"x={tmp_path / 'left.png'}",
            ]
        )
        == 2
    )


def test_every_stage_of_a_cascade_paints(tmp_path):
    """On a cascade the regions go to each stage at its side: the base's samples and the
    upsampler's differ from the unpainted run's (same seed)."""
    from tests.helpers.cascade import make_cascade

    cascade = make_cascade(tmp_path)
    region = np.zeros((64, 64), np.uint8)
    region[:32, :] = 255
    Image.fromarray(region).save(tmp_path / "top.png")
    args = ["generate", "--model", str(cascade), "--text", CAPTION, "--steps", "3", "--upsampler-steps", "3"]
    assert main([*args, "--output", str(tmp_path / "plain")]) == 0
    painted = ["--paint", f"red circle={tmp_path / 'top.png'}", "--paint-weight", "8"]
    assert main([*args, *painted, "--output", str(tmp_path / "painted")]) == 0

    def image(run: str, name: str) -> np.ndarray:
        return np.asarray(Image.open(tmp_path / run / name)).astype(int)

    base = "stages/base/sample-0000.png"
    assert np.abs(image("plain", base) - image("painted", base)).max() > 0
    # the upsampler paints too: its output moves more than the painted base alone explains
    from pipelines.diffusion.loading import load_cascade

    up = load_cascade(str(cascade), "cpu").stages[1]
    up.set_progress_bar_config(disable=True)
    low = image("painted", base).astype(np.uint8)
    cond = {"text": CAPTION, "low_res": low}
    unpainted = up(cond, num_inference_steps=3, seed=0).images[0].astype(int)
    with_paint = up(
        cond, num_inference_steps=3, seed=0, paint={"red circle": region[::2, ::2] > 0}, paint_weight=8
    )
    assert np.abs(with_paint.images[0].astype(int) - unpainted).max() > 0
