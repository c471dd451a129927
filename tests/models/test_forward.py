"""``ComposerModel``: shapes for every presence pattern, presence respected both ways, errors."""

from __future__ import annotations

import inspect
import zlib

import pytest
import torch
from diffusers.models.attention_processor import Attention

from models import (
    CONDITIONS,
    PRESETS,
    ComposerModel,
    Conditions,
    EncodedConditions,
    build_model,
    preset_config,
    random_conditions,
)
from models.encoders import HashTokenizer
from tests.models.inputs import FIELDS, all_patterns, replace, rows

SIZE = 16


@pytest.fixture(scope="module")
def model() -> ComposerModel:
    torch.manual_seed(0)
    return build_model("tiny", sample_size=SIZE).eval()


def noisy(batch: int, generator: torch.Generator, channels: int = 3, size: int = SIZE):
    x = torch.randn(batch, channels, size, size, generator=generator)
    return x, torch.randint(0, 1000, (batch,), generator=generator)


# -- shapes and batch invariance -----------------------------------------------------------------
@torch.no_grad()
def test_every_presence_pattern_in_one_batch(model):
    g = torch.Generator().manual_seed(0)
    presence = all_patterns()
    assert presence.shape == (256, len(CONDITIONS)) and presence.unique(dim=0).shape[0] == 256
    conditions = random_conditions(model, 256, g)
    x, t = noisy(256, g)
    out = model(x, t, conditions=conditions, presence=presence)
    assert out.shape == (256, 3, SIZE, SIZE)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()

    # Each row alone gives what it gave in the batch: nothing leaks between rows.
    picked = torch.cat([torch.tensor([0, 255]), torch.randperm(254, generator=g)[:6] + 1])
    for i in picked.tolist():
        alone = model(
            x[i : i + 1],
            t[i : i + 1],
            conditions=rows(conditions, slice(i, i + 1)),
            presence=presence[i : i + 1],
        )
        torch.testing.assert_close(alone, out[i : i + 1], atol=1e-5, rtol=0, msg=f"row {i}")


@torch.no_grad()
def test_integer_timestep_and_unconditional(model):
    g = torch.Generator().manual_seed(1)
    x, _ = noisy(2, g)
    presence = torch.zeros(2, len(CONDITIONS), dtype=torch.bool)
    out = model(x, 500, presence=presence)
    torch.testing.assert_close(
        out, model(x, torch.tensor([500, 500]), conditions=Conditions(), presence=presence)
    )
    assert out.shape == x.shape


# -- absent means absent; present means used ----------------------------------------------------
@pytest.mark.parametrize("name", CONDITIONS)
@torch.no_grad()
def test_presence_is_respected_both_ways(model, name):
    g = torch.Generator().manual_seed(2)
    conditions = random_conditions(model, 2, g)
    other = random_conditions(model, 2, g)
    changed = replace(conditions, **{f: getattr(other, f) for f in FIELDS[name]})
    x, t = noisy(2, g)
    k = CONDITIONS.index(name)
    presence = torch.ones(2, len(CONDITIONS), dtype=torch.bool)
    presence[0, k] = False  # row 0: absent, row 1: present

    before = model(x, t, conditions=conditions, presence=presence)
    after = model(x, t, conditions=changed, presence=presence)
    torch.testing.assert_close(
        after[0], before[0], atol=1e-6, rtol=0, msg=f"absent {name} changed the output"
    )
    assert (after[1] - before[1]).abs().max() > 1e-3, f"present {name} did not reach the output"

    # Absent in every row: the field may as well be missing.
    presence[:, k] = False
    given = model(x, t, conditions=conditions, presence=presence)
    missing = model(x, t, conditions=replace(conditions, **dict.fromkeys(FIELDS[name])), presence=presence)
    torch.testing.assert_close(missing, given, atol=1e-6, rtol=0)
    # ... and absent is not the same as present.
    assert (given[1] - before[1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", CONDITIONS)
def test_present_without_input_raises(model, name):
    g = torch.Generator().manual_seed(3)
    conditions = replace(random_conditions(model, 2, g), **dict.fromkeys(FIELDS[name]))
    x, t = noisy(2, g)
    presence = torch.ones(2, len(CONDITIONS), dtype=torch.bool)
    presence[0] = False  # present in one row is enough
    with pytest.raises(ValueError, match=f"presence marks '{name}' present but no {name} input"):
        model(x, t, conditions=conditions, presence=presence)


@pytest.mark.parametrize(
    "presence",
    [
        torch.ones(2, 8),  # float
        torch.ones(2, 8, dtype=torch.int64),
        torch.ones(2, 7, dtype=torch.bool),
        torch.ones(2, 9, dtype=torch.bool),
        torch.ones(2, 8, 1, dtype=torch.bool),
        torch.ones(8, dtype=torch.bool),
    ],
    ids=["float", "int", "7-columns", "9-columns", "3d", "1d"],
)
def test_bad_presence_raises(model, presence):
    g = torch.Generator().manual_seed(4)
    x, t = noisy(presence.shape[0], g)
    with pytest.raises(ValueError, match="presence must be a"):
        model(x, t, conditions=Conditions(), presence=presence)


def test_batch_size_disagreements_raise(model):
    g = torch.Generator().manual_seed(5)
    conditions = random_conditions(model, 2, g)
    x, t = noisy(2, g)
    with pytest.raises(ValueError, match="conditions have batch size 2, presence has 3 rows"):
        model.encode(conditions, torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="disagree on the batch size"):
        model.encode(replace(conditions, depth=conditions.depth[:1]), torch.ones(2, 8, dtype=torch.bool))
    encoded = model.encode(conditions, torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="x_t has 1 rows, the encoded conditions 2"):
        model(x[:1], t[:1], encoded=encoded)
    with pytest.raises(ValueError, match="give encoded, or conditions and presence"):
        model(x, t, conditions=conditions)


@pytest.mark.parametrize(
    ("field", "shape", "message"),
    [
        ("sketch", (2, 1, 8, 8), r"sketch input is \(2, 1, 8, 8\), expected \(B, 1, 16, 16\)"),
        ("depth", (2, 3, 16, 16), r"depth input is \(2, 3, 16, 16\), expected \(B, 1, 16, 16\)"),
        ("intensity", (2, 1, 32, 32), r"intensity input is \(2, 1, 32, 32\), expected \(B, 1, 16, 16\)"),
        ("instances", (2, 8, 8), r"instances input is .*, expected \(B, 8, 16, 16\)"),
        ("masked_image", (2, 3, 8, 8), r"mask is \(2, 1, 16, 16\) but masked_image \(2, 3, 8, 8\)"),
    ],
)
def test_wrong_map_size_raises(model, field, shape, message):
    g = torch.Generator().manual_seed(6)
    conditions = random_conditions(model, 2, g)
    bad = torch.zeros(shape, dtype=getattr(conditions, field).dtype)
    x, t = noisy(2, g)
    with pytest.raises(ValueError, match=message):
        model(
            x, t, conditions=replace(conditions, **{field: bad}), presence=torch.ones(2, 8, dtype=torch.bool)
        )


def test_mask_needs_both_fields(model):
    g = torch.Generator().manual_seed(7)
    conditions = random_conditions(model, 2, g)
    with pytest.raises(ValueError, match="needs both mask and masked_image"):
        model.encode(replace(conditions, masked_image=None), torch.ones(2, 8, dtype=torch.bool))


# -- encode once, denoise many times -------------------------------------------------------------
@torch.no_grad()
def test_forward_with_conditions_equals_forward_with_encoded(model):
    g = torch.Generator().manual_seed(8)
    conditions = random_conditions(model, 4, g)
    presence = torch.rand(4, 8, generator=g) > 0.5
    x, t = noisy(4, g)
    encoded = model.encode(conditions, presence)
    assert encoded.embedding.shape[0] == encoded.context.shape[0] == len(encoded) == 4
    assert encoded.local.shape == (4, model.config.local_channels, SIZE, SIZE)
    torch.testing.assert_close(
        model(x, t, encoded=encoded), model(x, t, conditions=conditions, presence=presence)
    )

    # Tiling the raw inputs and tiling the encodings agree (classifier-free guidance batches).
    tiled = model.encode(conditions.repeat(2), presence.repeat(2, 1))
    joined = EncodedConditions.cat([encoded, encoded])
    for f in ("embedding", "context", "local"):
        torch.testing.assert_close(getattr(tiled, f), getattr(joined, f), atol=1e-5, rtol=0)


@torch.no_grad()
def test_semantics_embedding_can_be_given_directly(model):
    g = torch.Generator().manual_seed(9)
    conditions = random_conditions(model, 2, g)
    presence = torch.ones(2, 8, dtype=torch.bool)
    x, t = noisy(2, g)
    embedding = model.encode_semantics(conditions.semantics_image)
    assert embedding.shape == (2, model.config.semantics_dim)
    torch.testing.assert_close(embedding.norm(dim=-1), torch.ones(2))
    direct = replace(conditions, semantics_image=None, semantics=embedding)
    torch.testing.assert_close(
        model(x, t, conditions=direct, presence=presence),
        model(x, t, conditions=conditions, presence=presence),
    )
    with pytest.raises(ValueError, match="not both"):
        model.encode(replace(conditions, semantics=embedding), presence)
    with pytest.raises(ValueError, match="give text_ids, not caption embeddings"):
        model.encode(replace(conditions, caption_sentence=torch.zeros(2, 64)), presence)


# -- other configurations ------------------------------------------------------------------------
@torch.no_grad()
def test_latent_space_config():
    torch.manual_seed(0)
    model = build_model("tiny", sample_size=8, image_channels=4, local_downsample=4).eval()
    assert model.image_size == 32
    g = torch.Generator().manual_seed(10)
    conditions = random_conditions(model, 3, g)
    presence = torch.rand(3, 8, generator=g) > 0.3
    x, t = noisy(3, g, channels=4, size=8)
    out = model(x, t, conditions=conditions, presence=presence)
    assert out.shape == (3, 4, 8, 8)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"sketch input is \(3, 1, 8, 8\), expected \(B, 1, 32, 32\)"):
        model(x, t, conditions=replace(conditions, sketch=torch.zeros(3, 1, 8, 8)), presence=presence)


@torch.no_grad()
def test_frozen_encoder_config():
    torch.manual_seed(0)
    model = build_model(
        "tiny",
        sample_size=SIZE,
        caption_encoder="clip",
        caption_sentence_dim=32,
        caption_token_dim=48,
        caption_length=7,
        semantics_encoder="clip",
        semantics_dim=16,
    ).eval()
    assert model.text_encoder is None and model.image_encoder is None
    g = torch.Generator().manual_seed(11)
    conditions = random_conditions(model, 2, g)  # embeddings in the frozen encoders' sizes
    assert conditions.text_ids is None and conditions.caption_tokens.shape == (2, 7, 48)
    image = torch.rand(2, 3, SIZE, SIZE, generator=g) * 2 - 1
    presence = torch.ones(2, 8, dtype=torch.bool)
    presence[0, :2] = False
    x, t = noisy(2, g)
    out = model(x, t, conditions=conditions, presence=presence)
    assert out.shape == (2, 3, SIZE, SIZE) and torch.isfinite(out).all()
    # The token states reach the output (cross-attention) in the present row only.
    moved = model(
        x,
        t,
        conditions=replace(conditions, caption_tokens=torch.randn(2, 7, 48, generator=g)),
        presence=presence,
    )
    torch.testing.assert_close(moved[0], out[0], atol=1e-6, rtol=0)
    assert (moved[1] - out[1]).abs().max() > 1e-3

    with pytest.raises(ValueError, match="takes clip caption embeddings, not text_ids"):
        model.encode(replace(conditions, text_ids=torch.ones(2, 7, dtype=torch.long)), presence)
    with pytest.raises(ValueError, match="not semantics_image"):
        model.encode(replace(conditions, semantics_image=image), presence)
    with pytest.raises(ValueError, match=r"caption tokens are \(5, 64\), the model expects \(7, 64\)"):
        model.encode(replace(conditions, caption_tokens=torch.randn(2, 5, 48)), presence)
    with pytest.raises(ValueError, match="caption embeddings, not text"):
        model.tokenize(["a red cube"])
    with pytest.raises(ValueError, match="CLIP semantics"):
        model.encode_semantics(image)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(attention_levels=(False, True, True)), "one entry per block_out_channels"),
        (dict(caption_encoder="bert"), "caption_encoder must be"),
        (dict(semantics_encoder="dino"), "semantics_encoder must be"),
        (dict(caption_token_dim=32), "one width"),
        (dict(local_downsample=3), "power of two"),
        (dict(attention_head_dim=24), "must divide every block_out_channels"),
    ],
)
def test_bad_model_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_model("tiny", sample_size=SIZE, **overrides)


@pytest.mark.parametrize("head_dim", [8, 16, 32])
def test_attention_head_dim_is_the_width_of_a_head(head_dim):
    # diffusers' own `attention_head_dim` is a head *count*; ours must mean what it says.
    model = build_model("tiny", sample_size=SIZE, attention_head_dim=head_dim)
    attentions = [m for m in model.unet.modules() if isinstance(m, Attention)]
    assert attentions
    for attn in attentions:
        assert attn.inner_dim // attn.heads == head_dim


# -- training ------------------------------------------------------------------------------------
def test_every_parameter_gets_a_gradient():
    # DDP (find_unused_parameters=False) needs every parameter in the graph of every step, even
    # when a condition is absent in every row of the batch.
    torch.manual_seed(0)
    model = build_model("tiny", sample_size=SIZE).train()
    g = torch.Generator().manual_seed(12)
    conditions = random_conditions(model, 4, g)
    presence = torch.tensor(
        [[i % 2 == r % 2 for i in range(8)] for r in range(3)] + [[False] * 8], dtype=torch.bool
    )
    presence[:, CONDITIONS.index("depth")] = False  # absent everywhere, input still given
    x, t = noisy(4, g)
    out = model(x, t, conditions=conditions, presence=presence)
    torch.nn.functional.mse_loss(out, torch.randn(out.shape, generator=g)).backward()
    params = dict(model.named_parameters())
    assert all(p.requires_grad for p in params.values())
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in params.values())
    # The learned null embeddings and tokens are trained by the absent rows.
    for n in ("null_embed", "null_caption", "null_semantics", "null_palette"):
        assert params[f"conditioner.{n}"].grad.abs().sum() > 0, n
    assert params["local.stems.sketch.0.weight"].grad.abs().sum() > 0
    assert params["local.stems.depth.0.weight"].grad.abs().sum() == 0


# -- tokenizer -----------------------------------------------------------------------------------
def test_hash_tokenizer():
    tok = HashTokenizer(vocab_size=1000, length=8)
    ids = tok(["A red Cube, left!", "", "a RED cube , left !"])
    words = ["a", "red", "cube", ",", "left", "!"]
    expected = [1 + zlib.crc32(w.encode("utf-8")) % 999 for w in words]
    assert ids.dtype == torch.int64 and ids.shape == (3, 8)
    assert ids[0].tolist() == expected + [0, 0]
    assert ids[1].tolist() == [0] * 8
    assert ids[2].tolist() == ids[0].tolist()
    assert torch.equal(tok(["A red Cube, left!"]), ids[:1])

    long = " ".join(f"w{i}" for i in range(20))
    assert tok([long])[0].tolist() == [1 + zlib.crc32(f"w{i}".encode()) % 999 for i in range(8)]
    with pytest.raises(TypeError, match="caption 1 is int, expected str"):
        tok(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="vocab_size"):
        HashTokenizer(vocab_size=2, length=8)
    with pytest.raises(ValueError, match="length"):
        HashTokenizer(vocab_size=100, length=0)


def test_text_encoder_binds_words_to_their_neighbours():
    """From initialisation, a shape word's state holds the colour before it (the presets'
    ``text_kernel``): swapping the two colours moves "circle"'s and "square"'s states by a third or
    more. The plain Transformer at initialisation moves them by about 1%: a bag of words."""
    a, b = "a red circle above a blue square", "a blue circle above a red square"
    for seed in range(4):
        torch.manual_seed(seed)
        bound = build_model("tiny", sample_size=SIZE).eval()
        plain = build_model("tiny", sample_size=SIZE, text_kernel=1).eval()
        for m, low, high in ((bound, 0.2, None), (plain, None, 0.1)):
            with torch.no_grad():
                tokens, _ = m.text_encoder(m.tokenize([a, b]))
            for i in (2, 6):  # circle, square
                moved = float((tokens[0, i] - tokens[1, i]).norm() / tokens[1, i].norm())
                assert (low is None or moved > low) and (high is None or moved < high), (seed, i, moved)
    with pytest.raises(ValueError, match="text_kernel must be an odd number"):
        build_model("tiny", text_kernel=2)


def test_model_tokenize(model):
    ids = model.tokenize(["a red cube", "two blue spheres on the left"])
    assert ids.shape == (2, model.config.caption_length)
    assert 0 <= ids.min() and ids.max() < model.config.text_vocab_size
    assert (ids[0, 3:] == 0).all() and (ids[0, :3] > 0).all()


# -- presets -------------------------------------------------------------------------------------
def test_presets():
    known = set(inspect.signature(ComposerModel.__init__).parameters)
    for name in PRESETS:
        config = preset_config(name)
        assert isinstance(config, dict) and config
        assert set(config) <= known, f"{name}: {set(config) - known}"
        assert len(config["attention_levels"]) == len(config["block_out_channels"])
        assert all(c % config["attention_head_dim"] == 0 for c in config["block_out_channels"])
        assert all(c % config["norm_num_groups"] == 0 for c in config["block_out_channels"])
    assert preset_config("small", sample_size=32)["sample_size"] == 32
    assert "sample_size" not in PRESETS["small"]  # overrides do not leak into the registry

    with pytest.raises(
        ValueError, match="unknown model preset 'huge'; known presets: tiny, small, medium, base"
    ):
        preset_config("huge")
    with pytest.raises(
        ValueError, match=r"unknown model settings \['channels'\]; known settings: .*sample_size"
    ):
        preset_config("tiny", channels=3)
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("huge")

    tiny = build_model("tiny", sample_size=SIZE)
    assert sum(p.numel() for p in tiny.parameters()) < 3_000_000


# -- saving --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(
            caption_encoder="t5",
            caption_sentence_dim=32,
            caption_token_dim=48,
            caption_length=7,
            semantics_encoder="clip",
        ),
    ],
    ids=["trainable", "frozen-encoders"],
)
@torch.no_grad()
def test_save_and_load(tmp_path, overrides):
    torch.manual_seed(0)
    model = build_model("tiny", sample_size=SIZE, **overrides).eval()
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]

    loaded = ComposerModel.from_pretrained(tmp_path).eval()
    assert loaded.config.caption_encoder == model.config.caption_encoder
    assert tuple(loaded.config.block_out_channels) == tuple(model.config.block_out_channels)
    g = torch.Generator().manual_seed(13)
    presence = torch.tensor([[True] * 8, [False] * 8, [True, False] * 4])
    conditions = random_conditions(model, 3, g)  # each encoder's inputs: text ids or embeddings
    x, t = noisy(3, g)
    expected = model(x, t, conditions=conditions, presence=presence)
    assert torch.equal(loaded(x, t, conditions=conditions, presence=presence), expected)
