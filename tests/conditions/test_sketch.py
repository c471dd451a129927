import warnings

import numpy as np
import pytest

from pipelines.conditions.base import ExtractorUnavailable
from pipelines.conditions.sketch import SketchConfig, SketchExtractor
from pipelines.config import ConfigError, from_dict
from tests.conditions.contract import assert_contract, make_batch
from tests.helpers.tiny_annotators import write_hed, write_pidinet

R = 64  # PiDiNet/HED need a multiple of 64 to detect at; small keeps HED's forward cheap


@pytest.fixture(scope="module")
def annotators(tmp_path_factory):
    """A directory laid out like lllyasviel/Annotators, with random-init checkpoints."""
    d = tmp_path_factory.mktemp("annotators")
    write_pidinet(d)
    write_hed(d)
    return d


def test_contract_canny():
    assert_contract(SketchExtractor(SketchConfig(), 32), make_batch(4, 32))


def test_contract_canny_blur_and_resize():
    # Stored images larger than R: resized first, edges found at R.
    assert_contract(SketchExtractor(SketchConfig(blur=3, l2_gradient=True), 32), make_batch(3, 48))


@pytest.mark.parametrize("method", ["pidinet", "hed"])
def test_contract_networks(annotators, method):
    cfg = SketchConfig(method=method, weights=str(annotators), detect_resolution=R)
    out = assert_contract(SketchExtractor(cfg, R), make_batch(4, R))["sketch"]
    assert out.std() > 0, "a random-init net should still give a varied map"


@pytest.mark.parametrize("method", ["pidinet", "hed"])
def test_networks_detect_at_other_resolution_and_binarise(annotators, method):
    cfg = SketchConfig(method=method, weights=str(annotators), detect_resolution=R, edge_threshold=0.5)
    out = assert_contract(SketchExtractor(cfg, 32), make_batch(3, 48))["sketch"]
    assert set(np.unique(out)) <= {0, 255}


@pytest.mark.parametrize("method", ["pidinet", "hed"])
def test_networks_match_controlnet_aux_detector(annotators, method):
    """The batched forward reproduces controlnet_aux's per-image __call__ (which loads the same file)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from controlnet_aux import HEDdetector, PidiNetDetector

    detector = (PidiNetDetector if method == "pidinet" else HEDdetector).from_pretrained(str(annotators))
    batch = make_batch(3, R, seed=5)
    for safe in (False, True):
        cfg = SketchConfig(method=method, weights=str(annotators), detect_resolution=R, safe=safe)
        ours = SketchExtractor(cfg, R)(batch)["sketch"]
        for i in range(len(batch["image"])):
            ref = detector(
                batch["image"][i], detect_resolution=R, image_resolution=R, safe=safe, output_type="np"
            )
            diff = np.abs(ours[i].astype(int) - ref[..., 0].astype(int))
            # HED's sigmoid runs in float64 there, float32 here: truncation may flip a level.
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (method, safe, i)


def test_canny_finds_a_vertical_boundary():
    img = np.zeros((1, 32, 32, 3), np.uint8)
    img[:, :, 16:] = 255
    out = SketchExtractor(SketchConfig(), 32)({"image": img})["sketch"][0]
    assert set(np.unique(out)) == {0, 255}
    cols = np.flatnonzero(out.any(axis=0))
    assert set(cols) <= {15, 16}, cols
    assert out[:, 15:17].max(axis=1).all(), "every row should have an edge on the boundary"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"low_threshold": 200, "high_threshold": 100},
        {"low_threshold": -1},
        {"high_threshold": 256},
        {"blur": 4},
        {"detect_resolution": 100},
        {"edge_threshold": 1.5},
    ],
)
def test_invalid_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SketchConfig(**kwargs)
    with pytest.raises(ConfigError):
        from_dict(SketchConfig, kwargs)


def test_unknown_method_is_rejected():
    with pytest.raises(ConfigError, match="method"):
        from_dict(SketchConfig, {"method": "sobel"})
    with pytest.raises(ValueError):
        SketchConfig(method="sobel")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("method", "filename"), [("pidinet", "table5_pidinet.pth"), ("hed", "ControlNetHED.pth")]
)
def test_networks_without_weights_are_unavailable(method, filename):
    ex = SketchExtractor(SketchConfig(method=method), 32)
    reason = ex.unavailable_reason()
    assert reason and "sketch.weights" in reason and filename in reason
    assert f"huggingface-cli download lllyasviel/Annotators {filename}" in reason
    with pytest.raises(ExtractorUnavailable, match="sketch.weights"):
        ex(make_batch(1, 32))
    assert SketchExtractor(SketchConfig(), 32).unavailable_reason() is None


def test_missing_weights_dir_is_a_clear_error_offline(tmp_path, no_network):
    ex = SketchExtractor(SketchConfig(method="pidinet", weights=str(tmp_path / "nowhere")), 32)
    with pytest.raises(ExtractorUnavailable, match="nowhere.*huggingface-cli download"):
        ex(make_batch(1, 32))
    assert not no_network


def test_weights_dir_without_the_checkpoint_names_the_file(tmp_path, no_network):
    ex = SketchExtractor(SketchConfig(method="hed", weights=str(tmp_path)), 32)
    with pytest.raises(ExtractorUnavailable, match="has no ControlNetHED.pth"):
        ex(make_batch(1, 32))
    assert not no_network


def test_uncached_repo_id_never_downloads(tmp_path, monkeypatch, no_network):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    ex = SketchExtractor(SketchConfig(method="pidinet", weights="lllyasviel/Annotators"), 32)
    with pytest.raises(ExtractorUnavailable, match="Hugging Face cache"):
        ex(make_batch(1, 32))
    assert not no_network


@pytest.mark.parametrize("method", ["canny", "pidinet", "hed"])
def test_read_only_batches_work_silently(annotators, method):
    """Ray Data hands batches over as read-only arrays."""
    ex = SketchExtractor(SketchConfig(method=method, weights=str(annotators), detect_resolution=R), R)
    batch = make_batch(2, R)
    expected = ex(batch)["sketch"]  # first call: setup, whose imports may warn
    for a in batch.values():
        a.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(ex(batch)["sketch"], expected)
