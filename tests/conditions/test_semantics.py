import numpy as np
import pytest

from pipelines.conditions.base import ExtractorUnavailable
from pipelines.conditions.semantics import SemanticsConfig, SemanticsExtractor
from pipelines.config import ConfigError, from_dict
from tests.conditions.contract import assert_contract, make_batch
from tests.helpers import add_to_hf_cache, block_network
from tests.helpers.tiny_clip import PREPROCESS_CFG, make_tiny_open_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_tiny_open_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    block_network(monkeypatch)


def _extractor(clip_model, resolution=32, **kw):
    return SemanticsExtractor(SemanticsConfig(clip_model=clip_model, **kw), resolution)


def test_contract(clip_dir):
    out = assert_contract(_extractor(clip_dir), make_batch(4, 32), atol=2e-3)
    np.testing.assert_allclose(np.linalg.norm(out["semantics"].astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_contract_with_resize(clip_dir):
    # Stored images at 48 px go through the batched resize to the model's 32 px.
    assert_contract(_extractor(clip_dir, resolution=48), make_batch(3, 48), atol=2e-3)


def test_columns_from_config_without_weights(clip_dir):
    ex = _extractor(clip_dir)
    [spec] = ex.columns()
    assert (spec.name, spec.dtype, spec.shape) == ("semantics", "float16", (32,))
    assert ex._visual is None  # columns() read the JSON only


def test_matches_open_clip_reference(clip_dir):
    """Same embedding as open_clip's own PIL preprocessing + encode_image."""
    import open_clip
    import torch
    from PIL import Image

    batch = make_batch(3, 48, seed=1)
    ex = _extractor(clip_dir, resolution=48)
    ours = ex(batch)["semantics"].astype(np.float32)
    model, preprocess = open_clip.create_model_from_pretrained(clip_dir)
    pixels = torch.stack([preprocess(Image.fromarray(im)) for im in batch["image"]])
    # The batched uint8 resize agrees with PIL's to one grey level (1/255 over the std).
    assert (ex._preprocess(batch["image"]) - pixels).abs().max() <= 1.01 / 255 / min(PREPROCESS_CFG["std"])
    with torch.no_grad():
        ref = model.encode_image(pixels, normalize=True).numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-2)


def test_normalize_off(clip_dir):
    batch = make_batch(2, 32)
    raw = _extractor(clip_dir, normalize=False)(batch)["semantics"].astype(np.float32)
    unit = _extractor(clip_dir)(batch)["semantics"].astype(np.float32)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), unit, atol=2e-3)
    assert _extractor(clip_dir).fingerprint() != _extractor(clip_dir, normalize=False).fingerprint()


def test_different_images_differ(clip_dir):
    out = _extractor(clip_dir)(make_batch(2, 32))["semantics"]
    assert np.abs(out[0].astype(np.float32) - out[1].astype(np.float32)).max() > 1e-2


def test_hf_hub_from_local_cache(clip_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = add_to_hf_cache(clip_dir.removeprefix("local-dir:"), tmp_path, "recompose-test/tiny-clip")
    batch = make_batch(2, 32)
    via_hub = _extractor(f"hf-hub:{repo}")
    assert via_hub.unavailable_reason() is None
    np.testing.assert_array_equal(via_hub(batch)["semantics"], _extractor(clip_dir)(batch)["semantics"])


def test_unavailable_without_weights():
    ex = _extractor(None)
    reason = ex.unavailable_reason()
    assert "semantics.clip_model" in reason and "huggingface-cli download" in reason
    with pytest.raises(ExtractorUnavailable, match="semantics.clip_model"):
        ex(make_batch(1, 32))
    with pytest.raises(ExtractorUnavailable):
        ex.columns()


def test_missing_directory(tmp_path):
    ex = _extractor(f"local-dir:{tmp_path / 'nope'}")
    assert "does not exist" in ex.unavailable_reason()
    with pytest.raises(ExtractorUnavailable, match="nope"):
        ex(make_batch(1, 32))


def test_repo_not_in_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    reason = _extractor("hf-hub:recompose-test/not-cached").unavailable_reason()
    assert "not in the Hugging Face cache" in reason or "neither a local directory" in reason
    assert "huggingface-cli download recompose-test/not-cached" in reason


def test_directory_without_weights_refused(clip_dir, tmp_path):
    # open_clip would silently build a random model from the config alone.
    import shutil

    shutil.copy(clip_dir.removeprefix("local-dir:") + "/open_clip_config.json", tmp_path)
    assert "no weights" in _extractor(f"local-dir:{tmp_path}").unavailable_reason()


def test_config_validation():
    with pytest.raises(ValueError, match="local-dir:"):
        SemanticsConfig(clip_model="/some/path")
    with pytest.raises(ConfigError):
        from_dict(SemanticsConfig, {"clip_model": "ViT-H-14"})
    assert from_dict(SemanticsConfig, {"clip_model": "hf-hub:org/repo"}).clip_model == "hf-hub:org/repo"
