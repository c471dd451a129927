import warnings

import numpy as np
import pytest

from pipelines.conditions.base import ExtractorUnavailable
from pipelines.conditions.depth import DepthConfig, DepthExtractor
from pipelines.config import ConfigError, from_dict
from tests.conditions.contract import assert_contract, make_batch
from tests.helpers.tiny_depth import write_tiny_dpt


@pytest.fixture(scope="module")
def dpt(tmp_path_factory):
    return str(write_tiny_dpt(tmp_path_factory.mktemp("dpt")))


def test_contract_ground_truth():
    batch = make_batch(4, 32, with_gt=True)
    out = assert_contract(
        DepthExtractor(DepthConfig(method="ground_truth"), 32, has_ground_truth=True), batch
    )
    np.testing.assert_array_equal(out["depth"], batch["gt_depth"])


def test_contract_model(dpt):
    # 48 px images through a 32 px processor: exercises both resizes.
    out = assert_contract(DepthExtractor(DepthConfig(weights=dpt), 48), make_batch(4, 48))["depth"]
    # Per-image min-max: every row spans the full range.
    assert (out.reshape(4, -1).min(axis=1) == 0).all() and (out.reshape(4, -1).max(axis=1) == 255).all()


def test_method_model_ignores_ground_truth(dpt):
    batch = make_batch(2, 32, with_gt=True)
    out = DepthExtractor(DepthConfig(method="model", weights=dpt), 32, has_ground_truth=True)(batch)["depth"]
    assert not np.array_equal(out, batch["gt_depth"])


def test_auto_mixed_batch_uses_ground_truth_where_present(dpt):
    batch = make_batch(4, 32, with_gt=True)
    batch["has_gt"] = np.array([True, False, True, False])
    out = DepthExtractor(DepthConfig(weights=dpt), 32, has_ground_truth=True)(batch)["depth"]
    np.testing.assert_array_equal(out[[0, 2]], batch["gt_depth"][[0, 2]])
    model_only = DepthExtractor(DepthConfig(method="model", weights=dpt), 32)(batch)["depth"]
    np.testing.assert_array_equal(out[[1, 3]], model_only[[1, 3]])


def test_ground_truth_is_resized_to_the_output_resolution():
    batch = make_batch(2, 64, with_gt=True)
    small = np.random.default_rng(0).integers(0, 256, (2, 32, 32), dtype=np.uint8)
    batch["gt_depth"] = np.kron(small, np.ones((2, 2), np.uint8))  # constant 2x2 blocks
    out = DepthExtractor(DepthConfig(), 32, has_ground_truth=True)(batch)["depth"]
    np.testing.assert_array_equal(out, small)


def test_unavailable_without_weights_or_ground_truth():
    for cfg, has_gt in [
        (DepthConfig(), False),
        (DepthConfig(method="ground_truth"), False),
        (DepthConfig(method="model"), True),
    ]:
        ex = DepthExtractor(cfg, 32, has_ground_truth=has_gt)
        reason = ex.unavailable_reason()
        assert reason and "depth.weights" in reason and "huggingface-cli download" in reason, (cfg, has_gt)
        assert "only the synthetic dataset carries ground-truth depth" in reason
        with pytest.raises(ExtractorUnavailable, match="depth needs a depth model"):
            ex(make_batch(1, 32, with_gt=has_gt))
    assert DepthExtractor(DepthConfig(), 32, has_ground_truth=True).unavailable_reason() is None
    assert DepthExtractor(DepthConfig(weights="x"), 32).unavailable_reason() is None


def test_row_without_ground_truth_and_no_model_is_an_error():
    batch = make_batch(3, 32, with_gt=True)
    batch["has_gt"] = np.array([True, False, True])
    with pytest.raises(ValueError, match=r"row\(s\) \[1\].*no depth model"):
        DepthExtractor(DepthConfig(), 32, has_ground_truth=True)(batch)


def test_missing_weights_dir_is_a_clear_error_offline(tmp_path, no_network):
    ex = DepthExtractor(DepthConfig(weights=str(tmp_path / "nowhere")), 32)
    with pytest.raises(ExtractorUnavailable, match="depth.weights.*nowhere.*huggingface-cli download"):
        ex(make_batch(1, 32))
    assert not no_network


def test_uncached_repo_id_never_downloads(tmp_path, monkeypatch, no_network):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    ex = DepthExtractor(DepthConfig(weights="Intel/dpt-hybrid-midas"), 32)
    with pytest.raises(ExtractorUnavailable, match="Hugging Face cache"):
        ex(make_batch(1, 32))
    assert not no_network


def test_unknown_method_is_rejected():
    with pytest.raises(ConfigError, match="method"):
        from_dict(DepthConfig, {"method": "stereo"})
    with pytest.raises(ValueError):
        DepthConfig(method="stereo")  # type: ignore[arg-type]


def test_read_only_batches_work_silently(dpt):
    """Ray Data hands batches over as read-only arrays."""
    ex = DepthExtractor(DepthConfig(weights=dpt), 32, has_ground_truth=True)
    batch = make_batch(4, 32, with_gt=True)
    batch["has_gt"] = np.array([True, False, True, False])
    expected = ex(batch)["depth"]  # first call: setup, whose imports may warn
    for a in batch.values():
        a.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(ex(batch)["depth"], expected)
