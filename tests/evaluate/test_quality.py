"""FID / KID / CLIP score (pipelines/evaluate/quality.py) with random-init weights in the real formats.

The Inception is torch-fidelity's FID Inception v3 with seeded random weights, saved as a plain
state dict under the reference file name; the CLIP is tests/helpers/tiny_clip.py's. A forward of
the full Inception at 299 x 299 costs about a second per image on a small CPU, so the FID tests
extract features for three sets of four images once and check the metrics on those.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.config import from_dict
from pipelines.data.scene import render_sample
from pipelines.evaluate.config import EvalConfig
from pipelines.evaluate.quality import (
    INCEPTION_FILE,
    QualityConfig,
    clip_score,
    fid_kid,
    fid_kid_from_features,
    frechet_distance,
    inception_features,
    unavailable,
)
from tests.helpers import block_network
from tests.helpers.tiny_clip import make_tiny_open_clip
from tests.helpers.tiny_inception import make_random_fid_inception

N = 4  # images per set: FID/KID work from 2, and every image is a full Inception forward
CAPTIONS = ["a red square", "two blue circles on grass", "", "a cat " * 40]  # empty and over-long too


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    attempts = block_network(monkeypatch)
    yield
    assert attempts == []


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> str:
    """torch-fidelity's FID Inception v3, seeded random weights, saved in the reference format."""
    return make_random_fid_inception(tmp_path_factory.mktemp("inception"))


@pytest.fixture(scope="module")
def image_sets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    real = np.stack([render_sample(0, "train", i, 32).image for i in range(N)])
    noise = rng.integers(-3, 4, real.shape)
    colours = rng.integers(0, 256, (N, 1, 1, 3))
    return {
        "real": real,
        "perturbed": np.clip(real.astype(int) + noise, 0, 255).astype(np.uint8),  # same images, +-3 levels
        "different": np.broadcast_to(colours, real.shape).astype(np.uint8),  # flat colours, no shapes
    }


@pytest.fixture(scope="module")
def features(inception_file, image_sets) -> dict[str, np.ndarray]:
    # batch_size=2: the same batches as fid_kid(real[:2], perturbed[:2]) below, so features match bit for bit.
    cfg = QualityConfig(inception_weights=inception_file, batch_size=2, device="cpu")
    names = list(image_sets)
    feats = inception_features(np.concatenate([image_sets[k] for k in names]), cfg)
    assert feats.shape == (3 * N, 2048) and feats.dtype == np.float64
    return dict(zip(names, np.split(feats, 3), strict=True))


@pytest.fixture(scope="module")
def clip_spec(tmp_path_factory) -> str:
    return make_tiny_open_clip(tmp_path_factory.mktemp("tiny_clip"))


# -- config and availability ------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw",
    [
        {"kid_subsets": 0},
        {"kid_subset_size": 1},
        {"batch_size": 0},
        {"device": "tpu"},
        {"clip_model": "ViT-B-32"},
    ],
)
def test_config_rejects(kw):
    # Loaded as the evaluation's `quality` section, as --config / --set give it: the message names
    # the dotted key.
    with pytest.raises(ValueError, match=f"quality\\.{next(iter(kw))}"):
        from_dict(EvalConfig, {"quality": kw})


def test_unavailable_without_weights():
    reasons = unavailable(QualityConfig())
    assert set(reasons) == {"fid", "kid", "clip_score"}
    assert "quality.inception_weights" in reasons["fid"] and INCEPTION_FILE in reasons["fid"]
    assert "https://" in reasons["fid"]  # says where to get it on a machine with internet
    assert reasons["kid"] == reasons["fid"]
    assert "quality.clip_model" in reasons["clip_score"]


def test_unavailable_names_missing_and_wrong_files(tmp_path):
    missing = tmp_path / "nowhere" / INCEPTION_FILE
    reasons = unavailable(
        QualityConfig(inception_weights=str(missing), clip_model=f"local-dir:{tmp_path}/no_clip")
    )
    assert str(missing) in reasons["fid"]
    assert f"{tmp_path}/no_clip" in reasons["clip_score"]
    wrong = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    assert "not the FID Inception" in unavailable(QualityConfig(inception_weights=str(wrong)))["fid"]
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    assert "not a loadable" in unavailable(QualityConfig(inception_weights=str(tmp_path / "junk.pth")))["fid"]


@pytest.mark.slow
def test_unavailable_empty_with_all_weights(inception_file, clip_spec):
    assert unavailable(QualityConfig(inception_weights=inception_file, clip_model=clip_spec)) == {}


# -- FID / KID --------------------------------------------------------------------------------
def test_fid_kid_input_errors(tmp_path):
    ok = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="quality.inception_weights"):
        fid_kid(ok, ok, QualityConfig())
    cfg = QualityConfig(inception_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="missing.pth"):
        fid_kid(ok, ok, cfg)
    with pytest.raises(ValueError, match="real: expected uint8"):
        fid_kid(ok.astype(np.float32), ok, cfg)
    with pytest.raises(ValueError, match="fake: expected shape"):
        fid_kid(ok, ok[..., 0], cfg)
    with pytest.raises(ValueError, match="at least 2"):
        fid_kid(ok, ok[:1], cfg)


# Sets of n and n + 3 samples in 16 dims: both with singular covariances, one of each, both full rank.
@pytest.mark.parametrize("n", [5, 14, 40])
def test_frechet_distance_matches_torch_fidelity(n):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, 16))
    b = rng.normal(size=(n + 3, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    ref = fid_statistics_to_metric(
        fid_features_to_statistics(torch.from_numpy(a)),
        fid_features_to_statistics(torch.from_numpy(b)),
        False,
    )["frechet_inception_distance"]
    # rel 1e-7, not tighter: with n < 16 the reference also sums square roots of round-off eigenvalues.
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-7)
    assert frechet_distance(b, a) == pytest.approx(ref, rel=1e-7)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-10)


def test_kid_of_one_distribution():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 400, 64))
    cfg = QualityConfig(kid_subset_size=200, kid_subsets=10)
    same = fid_kid_from_features(a, b, cfg)
    shifted = fid_kid_from_features(a, b + 0.5, cfg)
    assert same["kid_subset_size"] == 200
    assert abs(same["kid_mean"]) < 0.05 * shifted["kid_mean"]
    assert abs(same["kid_mean"]) < 3 * same["kid_std"]


@pytest.mark.slow
def test_fid_kid_on_inception_features(features):
    cfg = QualityConfig()
    same = fid_kid_from_features(features["real"], features["real"], cfg)
    near = fid_kid_from_features(features["real"], features["perturbed"], cfg)
    far = fid_kid_from_features(features["real"], features["different"], cfg)
    assert same["fid"] == pytest.approx(0.0, abs=1e-9)
    assert 0 < near["fid"] < far["fid"]
    assert near["kid_mean"] < far["kid_mean"]
    # The unbiased MMD² of a set with itself is -(2/m)(mean k(x, x) - mean k(x, y)), m = subset size:
    # clearly negative at m = 4 (see test_kid_of_one_distribution for ~0 at a realistic m).
    k = (features["real"] @ features["real"].T / 2048 + 1) ** 3  # KID's polynomial kernel
    off = (k.sum() - np.trace(k)) / (N * (N - 1))
    assert same["kid_mean"] == pytest.approx(-2 / N * (np.trace(k) / N - off), rel=1e-9)
    assert same["kid_subset_size"] == N and (same["n_real"], same["n_fake"]) == (N, N)
    assert fid_kid_from_features(features["real"], features["different"], cfg) == far  # seeded subsets


@pytest.mark.slow
def test_fid_kid_end_to_end(inception_file, image_sets, features):
    cfg = QualityConfig(inception_weights=inception_file, batch_size=2, device="cpu")
    real, fake = image_sets["real"][:2], image_sets["perturbed"][:2]
    out = fid_kid(real, fake, cfg)
    digest = hashlib.sha256(Path(inception_file).read_bytes()).hexdigest()
    assert out["inception"] == f"{INCEPTION_FILE} sha256:{digest[:12]}"
    assert out["resize"].startswith("32x32 -> bilinear to 299x299 as TensorFlow 1.x")
    assert (out["n_real"], out["n_fake"], out["kid_subset_size"]) == (2, 2, 2)
    # The same weights file loaded a second time gives the same numbers as the fixture's extraction.
    again = fid_kid_from_features(features["real"][:2], features["perturbed"][:2], cfg)
    assert {k: out[k] for k in again} == again and out["fid"] > 0


# -- CLIP score -------------------------------------------------------------------------------
def test_clip_score(clip_spec, image_sets):
    cfg = QualityConfig(clip_model=clip_spec, batch_size=3, device="cpu")
    out = clip_score(image_sets["real"], CAPTIONS, cfg)
    assert 0.0 <= out["clip_score"] <= 100.0 and out["n"] == N
    assert out["clip_variant"] == f"custom open_clip model_cfg, embed_dim 32 ({clip_spec})"
    assert out["resize"] == (
        "32x32 -> open_clip eval transform: PIL bicubic (antialiased), scale the shorter side to fit, center crop 32x32"
    )
    assert clip_score(image_sets["real"], CAPTIONS, cfg) == out


def test_clip_score_matches_open_clip(clip_spec, image_sets):
    """100 * max(cos, 0), averaged, from open_clip's own forward, on images that need resizing."""
    import open_clip
    from PIL import Image

    images = np.repeat(np.repeat(image_sets["different"], 2, axis=1), 3, axis=2)[:, :, :80]  # 64 x 80
    images[:, ::7] = image_sets["real"][:, :1, :1]  # some structure, so crops matter
    out = clip_score(images, CAPTIONS, QualityConfig(clip_model=clip_spec, device="cpu"))
    assert out["resize"].startswith("64x80 -> ")
    model, _, preprocess = open_clip.create_model_and_transforms(clip_spec)
    tokens = open_clip.get_tokenizer(clip_spec)(CAPTIONS)
    pixels = torch.stack([preprocess(Image.fromarray(im)) for im in images])
    with torch.no_grad():
        img_f, txt_f, _ = model.eval()(pixels, tokens)  # open_clip returns unit-norm features
    expected = (100 * (img_f * txt_f).sum(-1)).clamp(min=0).mean().item()
    assert out["clip_score"] == pytest.approx(expected, abs=1e-4)


def test_clip_score_errors(clip_spec, image_sets):
    cfg = QualityConfig(clip_model=clip_spec, device="cpu")
    with pytest.raises(ValueError, match="one caption per image \\(4\\), got 3"):
        clip_score(image_sets["real"], CAPTIONS[:3], cfg)
    with pytest.raises(ValueError, match="got one string"):
        clip_score(image_sets["real"][:1], "a cat", cfg)
    with pytest.raises(ValueError, match="expected strings"):
        clip_score(image_sets["real"][:1], [None], cfg)
    with pytest.raises(ValueError, match="quality.clip_model"):
        clip_score(image_sets["real"], CAPTIONS, QualityConfig())
