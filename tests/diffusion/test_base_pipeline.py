"""A ComposerPipeline on a pretrained Stable Diffusion base (tests/helpers/tiny_sd.py): the export
carries the base's VAE, text encoder and tokenizer; captions given as text are encoded by it;
masked editing keeps every outside pixel at the source's resolution, bit for bit; save and load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models import ComposerModel
from pipelines.conditions.backbone import load_base
from pipelines.data.scene import render_sample
from pipelines.diffusion.pipeline import ComposerPipeline
from tests.helpers.tiny_sd import make_tiny_sd

R = 32  # the tiny base's images: 8×8 latents, VAE scale factor 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return load_base(make_tiny_sd(tmp_path_factory.mktemp("sd") / "base"))


def make_pipe(base) -> ComposerPipeline:
    from diffusers import DDIMScheduler

    null, _ = base.encode_text([""])
    torch.manual_seed(0)
    model = ComposerModel.from_base(
        base.unet if base.unet is not None else load_base(base.path, ("unet",)).unet,
        null[0],
        sentence_dim=base.text_encoder.config.hidden_size,
        local_downsample=base.vae_scale_factor,
    )
    # move the zero-start paths off zero, as training does, so every condition changes the output
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("embed_out.", "unet.conv_in.local.")) or "to_v_extra" in name:
                p.normal_(0, 0.02)
    pipe = ComposerPipeline(
        model.eval(),
        DDIMScheduler.from_config(dict(base.scheduler.config)),
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_text_is_encoded_by_the_base_and_matches_stored_embeddings(base):
    pipe = make_pipe(base)
    s = render_sample(3, "train", 0, R)
    out = pipe({"text": s.caption, "palette": np.full(156, 1 / 156, np.float32)}, num_inference_steps=3)
    assert out.images.shape == (1, R, R, 3) and out.threshold == "none"
    tokens, sentence = base.encode_text([s.caption])
    stored = {
        "caption.base_tokens": tokens[0].numpy().astype(np.float16),
        "caption.base_sentence": sentence[0].numpy().astype(np.float16),
        "palette": np.full(156, 1 / 156, np.float32),
    }
    again = pipe(stored, num_inference_steps=3)
    np.testing.assert_array_equal(out.images, again.images)
    other = pipe({"text": "a blue square", "palette": stored["palette"]}, num_inference_steps=3)
    assert np.abs(other.images.astype(int) - out.images.astype(int)).max() > 0


def test_masked_edit_keeps_every_outside_pixel_bit_for_bit(base):
    pipe = make_pipe(base)
    s = render_sample(3, "train", 1, R)
    mask = np.zeros((R, R), np.uint8)
    mask[5:19, 9:23] = 1  # not aligned to the 4-pixel latent grid
    out = pipe({"text": s.caption}, source=s.image, mask=mask, num_inference_steps=3, num_images=2)
    keep = mask == 0
    for im in out.images:
        np.testing.assert_array_equal(im[keep], s.image[keep])
    assert (out.images[0][mask == 1] != s.image[mask == 1]).any()


def test_save_and_load_carry_the_base_components(base, tmp_path):
    pipe = make_pipe(base)
    pipe.save_pretrained(str(tmp_path / "export"))
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tmp_path / "export" / part).is_dir(), part
    loaded = ComposerPipeline.from_pretrained(str(tmp_path / "export"))
    loaded.set_progress_bar_config(disable=True)
    cond = {"text": "a red circle on a blue background"}
    a = pipe(cond, num_inference_steps=3, seed=5).images
    b = loaded(cond, num_inference_steps=3, seed=5).images
    np.testing.assert_array_equal(a, b)


def test_a_text_encoder_without_a_base_model_is_refused(base):
    from models import build_model
    from pipelines.diffusion.schedulers import default_scheduler

    with pytest.raises(ValueError, match="pretrained base"):
        ComposerPipeline(
            build_model("tiny"), default_scheduler(), text_encoder=base.text_encoder, tokenizer=base.tokenizer
        )
    pipe = make_pipe(base)
    bare = ComposerPipeline(pipe.unet, pipe.scheduler, vae=pipe.vae)
    with pytest.raises(ValueError, match="no text encoder"):
        bare({"text": "a red circle"}, num_inference_steps=2)


def test_bidirectional_guidance_inverts_in_latent_space(base):
    pipe = make_pipe(base)
    s = render_sample(3, "train", 2, R)
    common = {"num_inference_steps": 4, "seed": 0}
    out = pipe({"text": "a blue square"}, source=s.image, invert_conditions={"text": s.caption}, **common)
    plain = pipe({"text": "a blue square"}, **common)
    assert out.images.shape == (1, R, R, 3) and out.invert_guidance is not None
    assert not np.array_equal(out.images, plain.images)  # it started from the source's inversion


def test_set_guidance_per_condition_weights_and_recipes_work_on_a_base(base):
    from pipelines.diffusion.recipes import colorize, translate

    pipe = make_pipe(base)
    s = render_sample(3, "train", 5, R)
    common = {"num_inference_steps": 3, "seed": 0}
    conditions = {"text": s.caption, "intensity": s.image.mean(-1).astype(np.uint8)}
    joint = pipe(conditions, guidance=3.0, **common)
    each = pipe(conditions, guidance="caption=2,intensity=4", **common)
    assert each.guidance["branches"] == 3 and joint.guidance["branches"] == 2
    assert not np.array_equal(each.images, joint.images)
    # guidance schedules: a whole constant window is the number; a window that drops a condition
    # for part of the run changes the images
    whole = pipe(conditions, guidance="caption=2,intensity=4@0:1", **common)
    assert np.array_equal(whole.images, each.images)
    part = pipe(conditions, guidance="caption=2,intensity=4@0:0.5,decay", **common)
    assert not np.array_equal(part.images, each.images) and part.guidance["targets"][1]["shape"] == "decay"
    out = translate(pipe, s.image, "a green star on a black background", layout=("sketch",), **common)
    assert out.images.shape == (1, R, R, 3)
    palette = np.full(156, 1 / 156, np.float32)
    out = colorize(pipe, s.image, palette, text="a red circle", guidance="palette+intensity=3", **common)
    assert out.images.shape == (1, R, R, 3) and {"intensity", "palette"} <= set(
        out.guidance["targets"][0]["c2"]
    )
