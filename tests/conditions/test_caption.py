import numpy as np
import pytest

from pipelines.conditions.base import ExtractorUnavailable
from pipelines.conditions.caption import CaptionConfig, CaptionExtractor
from pipelines.config import ConfigError, from_dict
from tests.conditions.contract import assert_contract, make_batch
from tests.helpers import add_to_hf_cache, block_network
from tests.helpers.tiny_clip import make_tiny_open_clip
from tests.helpers.tiny_sd import make_tiny_sd
from tests.helpers.tiny_t5 import make_tiny_t5

T5_LEN = 12


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_open_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return make_tiny_t5(tmp_path_factory.mktemp("tiny_t5"))


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return make_tiny_sd(tmp_path_factory.mktemp("sd") / "base")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    block_network(monkeypatch)


def _extractor(**kw):
    kw.setdefault("t5_max_length", T5_LEN)
    return CaptionExtractor(CaptionConfig(**kw), 32)


def _batch(texts):
    batch = make_batch(len(texts), 32)
    batch["text"] = np.array(texts, dtype=object)
    return batch


def test_contract_clip(clip_dir):
    ex = _extractor(clip_model=clip_dir)
    shapes = {s.name: s.shape for s in ex.columns()}
    assert shapes == {"caption.clip_sentence": (32,), "caption.clip_tokens": (77, 32)}
    assert_contract(ex, make_batch(4, 32), atol=2e-3)


def test_contract_t5(t5_dir):
    ex = _extractor(encoders=("t5",), t5_model=t5_dir)
    shapes = {s.name: s.shape for s in ex.columns()}
    assert shapes == {"caption.t5_sentence": (16,), "caption.t5_tokens": (T5_LEN, 16)}
    assert_contract(ex, make_batch(4, 32), atol=2e-3)


def test_contract_both(clip_dir, t5_dir):
    ex = _extractor(encoders=("clip", "t5"), clip_model=clip_dir, t5_model=t5_dir)
    assert len(ex.columns()) == 4
    assert_contract(ex, _batch(["a red square", "", "Zebra crossing 42!", "a photo of a dog"]), atol=2e-3)


def test_clip_matches_open_clip_encode_text(clip_dir):
    import open_clip
    import torch

    texts = ["a red square", "a blue circle on a dog"]
    out = _extractor(clip_model=clip_dir)(_batch(texts))
    model = open_clip.create_model(clip_dir)
    ids = open_clip.get_tokenizer(clip_dir)(texts)
    with torch.no_grad():
        ref = model.encode_text(ids).numpy()
    np.testing.assert_allclose(out["caption.clip_sentence"].astype(np.float32), ref, atol=2e-3, rtol=1e-3)


def test_different_captions_differ(clip_dir, t5_dir):
    ex = _extractor(encoders=("clip", "t5"), clip_model=clip_dir, t5_model=t5_dir)
    out = ex(_batch(["a red square", "a green dog"]))
    for name in ("caption.clip_sentence", "caption.t5_sentence"):
        a, b = out[name].astype(np.float32)
        assert np.abs(a - b).max() > 1e-2, name


def test_t5_padding_zeroed_and_sentence_is_masked_mean(t5_dir):
    from transformers import AutoTokenizer

    texts = ["a red square", "a photo number 7 of a blue circle"]
    out = _extractor(encoders=("t5",), t5_model=t5_dir)(_batch(texts))
    tokens = out["caption.t5_tokens"].astype(np.float32)
    mask = AutoTokenizer.from_pretrained(t5_dir)(texts, padding="max_length", max_length=T5_LEN)[
        "attention_mask"
    ]
    mask = np.array(mask, dtype=bool)
    assert mask.sum(1).tolist() == [4, 9]  # one piece per word (the digit too) + </s>
    assert (tokens[~mask] == 0).all()
    assert (np.abs(tokens[mask]).sum(-1) > 0).all()
    mean = tokens.sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(out["caption.t5_sentence"].astype(np.float32), mean, atol=2e-3)


def test_t5_truncates_long_captions(t5_dir):
    out = _extractor(encoders=("t5",), t5_model=t5_dir)(_batch(["a red dog " * 20]))
    assert (np.abs(out["caption.t5_tokens"][0].astype(np.float32)).sum(-1) > 0).all()


def test_hf_hub_from_local_cache(clip_dir, t5_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    clip_repo = add_to_hf_cache(clip_dir.removeprefix("local-dir:"), tmp_path, "recompose-test/tiny-clip")
    t5_repo = add_to_hf_cache(t5_dir, tmp_path, "recompose-test/tiny-t5")
    batch = _batch(["a red square", "a cat"])
    local = _extractor(encoders=("clip", "t5"), clip_model=clip_dir, t5_model=t5_dir)(batch)
    cached = _extractor(encoders=("clip", "t5"), clip_model=f"hf-hub:{clip_repo}", t5_model=t5_repo)(batch)
    for name, value in local.items():
        np.testing.assert_array_equal(cached[name], value, err_msg=name)


@pytest.mark.parametrize(
    ("encoders", "key"), [(("clip",), "caption.clip_model"), (("t5",), "caption.t5_model")]
)
def test_unavailable_without_weights(encoders, key):
    ex = _extractor(encoders=encoders)
    reason = ex.unavailable_reason()
    assert key in reason and "huggingface-cli download" in reason
    with pytest.raises(ExtractorUnavailable, match=key):
        ex(make_batch(1, 32))


def test_unavailable_when_one_of_two_is_missing(clip_dir):
    assert "caption.t5_model" in _extractor(encoders=("clip", "t5"), clip_model=clip_dir).unavailable_reason()


def test_missing_directory_and_uncached_repo(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    assert "does not exist" in _extractor(clip_model=f"local-dir:{tmp_path / 'nope'}").unavailable_reason()
    reason = _extractor(encoders=("t5",), t5_model=str(tmp_path / "nope")).unavailable_reason()
    assert "huggingface-cli download" in reason
    reason = _extractor(clip_model="hf-hub:recompose-test/not-cached").unavailable_reason()
    assert "huggingface-cli download recompose-test/not-cached" in reason
    reason = _extractor(encoders=("t5",), t5_model="recompose-test/not-cached").unavailable_reason()
    assert "huggingface-cli download recompose-test/not-cached" in reason


def test_config_validation():
    with pytest.raises(ValueError, match=r"(?s)encoders.*'clip', 't5' or 'base'.*'bert'"):
        CaptionConfig(encoders=("clip", "bert"))
    with pytest.raises(ValueError, match="twice"):
        CaptionConfig(encoders=("clip", "clip"))
    with pytest.raises(ValueError, match="empty"):
        CaptionConfig(encoders=())
    with pytest.raises(ValueError, match="t5_max_length"):
        CaptionConfig(t5_max_length=0)
    with pytest.raises(ValueError, match="local-dir:"):
        CaptionConfig(clip_model="ViT-H-14")
    with pytest.raises(ValueError, match="without open_clip's prefix"):
        CaptionConfig(t5_model="hf-hub:google/t5-v1_1-xxl")
    with pytest.raises(ConfigError, match="bert"):
        from_dict(CaptionConfig, {"encoders": ["bert"]})
    assert from_dict(CaptionConfig, {"encoders": "clip,t5"}).encoders == ("clip", "t5")


def test_t5_directory_without_weights_refused(t5_dir, tmp_path):
    import shutil

    shutil.copy(f"{t5_dir}/config.json", tmp_path)
    reason = _extractor(encoders=("t5",), t5_model=str(tmp_path)).unavailable_reason()
    assert "no weights file" in reason


def test_contract_base(sd_dir):
    ex = _extractor(encoders=("base",), base=sd_dir)
    shapes = {s.name: s.shape for s in ex.columns()}
    assert shapes == {"caption.base_sentence": (32,), "caption.base_tokens": (16, 32)}
    assert_contract(
        ex, _batch(["a red square", "", "Zebra crossing 42!", "a blue circle on the left"]), atol=2e-3
    )


def test_base_is_encode_text_and_an_empty_caption_the_empty_prompt(sd_dir, clip_dir):
    from pipelines.conditions.backbone import load_base

    texts = ["a red square", "", "a green star"]
    out = _extractor(encoders=("clip", "base"), clip_model=clip_dir, base=sd_dir)(_batch(texts))
    assert len(out) == 4
    tokens, sentence = load_base(sd_dir, ("text_encoder", "tokenizer")).encode_text(texts)
    np.testing.assert_array_equal(out["caption.base_tokens"], tokens.numpy().astype(np.float16))
    np.testing.assert_array_equal(out["caption.base_sentence"], sentence.numpy().astype(np.float16))
    a, b = out["caption.base_sentence"][:2].astype(np.float32)
    assert np.abs(a - b).max() > 1e-2


def test_base_fingerprint_follows_the_text_encoder_not_the_path(sd_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    def fingerprint(base, encoders=("base",)):
        return _extractor(encoders=encoders, base=base).fingerprint()

    moved = shutil.copytree(sd_dir, tmp_path / "moved")
    assert fingerprint(str(moved)) == fingerprint(sd_dir)
    # base's path alone (--base with explicit encoders [clip]) leaves the CLIP fingerprint as it was
    assert fingerprint(sd_dir, ("clip",)) == _extractor().fingerprint()
    weights = next((moved / "text_encoder").glob("*.safetensors"))
    tensors = load_file(weights)
    save_file({k: v + 1e-3 for k, v in tensors.items()}, weights, metadata={"format": "pt"})
    assert fingerprint(str(moved)) != fingerprint(sd_dir)
    described = _extractor(encoders=("base",), base=sd_dir).describe()
    assert described["base"] == sd_dir and len(described["text_encoder"]["sha256"]) == 64


def test_base_unavailable_without_a_base():
    reason = _extractor(encoders=("base",)).unavailable_reason()
    assert "give --base" in reason
    assert (
        "neither a local directory" in _extractor(encoders=("base",), base="/no/such/sd").unavailable_reason()
    )
