"""A Stable Diffusion–family UNet turned into Composer's UNet (models/backbone.py): exactly the base
at step 0 for every subset of conditions, with or without LoRA, after a save and a load; the adapter
mode's trainable part; bases it cannot keep exact are refused by name."""

from __future__ import annotations

import itertools

import pytest
import torch
from diffusers import UNet2DConditionModel

from models import CONDITIONS, ComposerModel
from models.backbone import check_base_unet, is_new_parameter
from models.composer import random_conditions

L, W = 7, 32  # the base text encoder's context length and width


def _base(**changes) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        **{
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": (32, 64),
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "layers_per_block": 1,
            "cross_attention_dim": W,
            "attention_head_dim": 4,
            "norm_num_groups": 8,
            **changes,
        }
    )


def _composer(base: UNet2DConditionModel, null: torch.Tensor, **kw) -> ComposerModel:
    return ComposerModel.from_base(
        base, null, sentence_dim=W, local_downsample=4, semantics_encoder="clip", semantics_dim=16, **kw
    )


@pytest.fixture(scope="module")
def base_and_inputs():
    base = _base().eval()
    g = torch.Generator().manual_seed(1)
    b = 3
    null = torch.randn(L, W, generator=g)
    x = torch.randn(b, 4, 8, 8, generator=g)
    t = torch.tensor([1, 500, 999])
    caption = torch.randn(b, L, W, generator=g)
    with torch.no_grad():
        with_caption = base(x, t, encoder_hidden_states=caption).sample
        without = base(x, t, encoder_hidden_states=null.expand(b, -1, -1)).sample
    return base, null, x, t, caption, with_caption, without


def _subsets():
    """Every subset of the 8 conditions would be 256 forwards; every size 0..8 with a few each."""
    for k in range(len(CONDITIONS) + 1):
        yield from itertools.islice(itertools.combinations(CONDITIONS, k), 4)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_step_zero_is_exactly_the_base_for_every_subset(base_and_inputs, lora_rank, tmp_path):
    base, null, x, t, caption, with_caption, without = base_and_inputs
    model = _composer(base, null, lora_rank=lora_rank).eval()
    cond = random_conditions(model, x.shape[0], torch.Generator().manual_seed(2))
    cond.caption_tokens = caption
    model.save_pretrained(str(tmp_path / "m"))
    reloaded = ComposerModel.from_pretrained(str(tmp_path / "m")).eval()
    worst = 0.0
    with torch.no_grad():
        for subset in _subsets():
            presence = torch.tensor([[c in subset for c in CONDITIONS]] * x.shape[0])
            want = with_caption if "caption" in subset else without
            for m in (model, reloaded):
                worst = max(worst, (m(x, t, conditions=cond, presence=presence) - want).abs().max().item())
    assert worst <= 1e-5


def test_new_paths_train_and_move_the_output(base_and_inputs):
    base, null, x, t, caption, with_caption, _ = base_and_inputs
    model = _composer(base, null, lora_rank=2)
    new = {n for n, _ in model.named_parameters() if is_new_parameter(n)}
    # what the adapter mode trains: the condition paths, the zero-start layers, LoRA; nothing of the base's
    assert any(n.startswith("unet.conv_in.local.") for n in new)
    assert any(".processor.to_v_extra" in n for n in new) and any("lora_B" in n for n in new)
    assert any(n.startswith("embed_out.") for n in new) and any(n.startswith("local.") for n in new)
    assert not any(n.startswith("unet.") and not is_new_parameter(n) for n in new)
    base_names = {n for n, _ in model.named_parameters()} - new
    assert len(base_names) == len(list(base.parameters()))
    cond = random_conditions(model, x.shape[0], torch.Generator().manual_seed(3))
    cond.caption_tokens = caption
    presence = torch.ones(x.shape[0], len(CONDITIONS), dtype=torch.bool)
    for n, p in model.named_parameters():
        p.requires_grad_(n in new)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(x, t, conditions=cond, presence=presence)
    (out - torch.randn_like(out)).pow(2).mean().backward()
    for name in ("unet.conv_in.local.weight", "embed_out.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name
    extra_v = [p for n, p in model.named_parameters() if n.endswith("to_v_extra.weight")]
    assert all(p.grad.abs().sum() > 0 for p in extra_v)
    opt.step()
    with torch.no_grad():
        moved = (model(x, t, conditions=cond, presence=presence) - with_caption).abs().max().item()
    assert moved > 1e-4  # the trained paths now steer the output


@pytest.mark.parametrize(
    "change, message",
    [
        ({"addition_embed_type": "text_time", "projection_class_embeddings_input_dim": 96}, "SDXL"),
        ({"class_embed_type": "timestep"}, "class_embed_type"),
        ({"time_cond_proj_dim": 8}, "time_cond_proj_dim"),
    ],
)
def test_bases_it_cannot_keep_exact_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        check_base_unet({**dict(_base().config), **change})


def test_base_settings_are_checked():
    base = _base()
    with pytest.raises(ValueError, match="null_caption"):
        _composer(base, torch.zeros(L, W + 1))
    with pytest.raises(ValueError, match="caption_encoder 'base'"):
        ComposerModel(caption_encoder="base")
    with pytest.raises(ValueError, match="lora_rank"):
        ComposerModel(lora_rank=4)
    with pytest.raises(ValueError, match="load_base"):
        ComposerModel().load_base(base, torch.zeros(L, W))
