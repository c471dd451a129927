"""Training augmentation: one crop/flip for the image and all its maps; random intensity; masks."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.data.augment import AugmentConfig, augment, crop_and_flip, random_intensity
from pipelines.data.scene import render_sample

R = 32


def rows(n: int = 8) -> dict:
    samples = [render_sample(5, "train", i, R) for i in range(n)]
    image = np.stack([s.image for s in samples])
    ramp = np.broadcast_to((np.arange(R)[None, :] * 7 + np.arange(R)[:, None] * 3) % 256, (n, R, R))
    return {
        "image": image,
        "instances": np.stack([s.instances for s in samples]).astype(np.uint8),
        "depth": ramp.astype(np.uint8).copy(),
        "sketch": np.stack([s.instances for s in samples]).astype(np.uint8),
        "intensity": ramp.astype(np.uint8).copy(),
        "text": np.array([s.caption for s in samples], object),
        "palette": np.random.default_rng(0).random((n, 156)).astype(np.float32),
    }


def test_image_and_maps_get_the_same_crop_and_flip():
    r = rows()
    # The image's channels carry the maps' contents, so "same geometry" is an exact check.
    r["image"] = np.stack([r["depth"], r["intensity"], r["depth"]], -1)
    out = crop_and_flip(r, AugmentConfig(crop_scale=(0.5, 0.9), flip=True), np.random.default_rng(1))
    assert np.array_equal(out["image"][..., 0], out["depth"])  # both linear
    assert np.array_equal(out["image"][..., 1], out["intensity"])
    assert np.array_equal(out["instances"], out["sketch"])  # both nearest
    assert set(np.unique(out["instances"])) <= set(np.unique(r["instances"]))  # labels never blended
    assert not np.array_equal(out["depth"], r["depth"])
    assert out["text"] is r["text"] and out["palette"] is r["palette"]  # globals untouched


def test_flip_only_is_exact_and_about_half_the_rows():
    r = rows(64)
    r["image"] = np.stack([r["depth"]] * 3, -1)  # a left-right asymmetric ramp: a flip always shows
    out = crop_and_flip(r, AugmentConfig(crop_scale=(1.0, 1.0), flip=True), np.random.default_rng(2))
    flipped = np.array([np.array_equal(out["image"][i], r["image"][i][:, ::-1]) for i in range(64)])
    kept = np.array([np.array_equal(out["image"][i], r["image"][i]) for i in range(64)])
    assert np.all(flipped ^ kept) and 16 < flipped.sum() < 48
    for i in range(64):
        expect = r["instances"][i][:, ::-1] if flipped[i] else r["instances"][i]
        assert np.array_equal(out["instances"][i], expect)
    none = crop_and_flip(r, AugmentConfig(crop_scale=(1.0, 1.0), flip=False), np.random.default_rng(2))
    assert np.array_equal(none["image"], r["image"])


def test_random_intensity_is_a_convex_mix_of_the_channels():
    images = rows(16)["image"]
    gray = random_intensity(images, np.random.default_rng(3))
    lo, hi = images.min(-1).astype(int), images.max(-1).astype(int)
    assert np.all(gray >= lo - 1) and np.all(gray <= hi + 1)
    flat = images.reshape(16, -1, 3).astype(np.float64)
    weights = [np.linalg.lstsq(flat[i], gray[i].ravel().astype(np.float64), rcond=None)[0] for i in range(16)]
    assert not np.allclose(weights[0], weights[1], atol=0.05)  # each row its own weights


def test_augment_adds_a_mask_and_is_seeded():
    r = rows()
    a = augment(r, AugmentConfig(), np.random.default_rng(4))
    b = augment(r, AugmentConfig(), np.random.default_rng(4))
    for k in ("image", "instances", "intensity", "mask"):
        assert np.array_equal(a[k], b[k])
    assert a["mask"].shape == (8, R, R) and set(np.unique(a["mask"])) <= {0, 1} and a["mask"].any()
    assert a["mask.image"] is a["image"]
    c = augment(r, AugmentConfig(), np.random.default_rng(5))
    assert not np.array_equal(a["image"], c["image"])


def test_bad_settings_and_shapes():
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="intensity_concentration"):
        AugmentConfig(intensity_concentration=0)
    r = rows(2)
    r["depth"] = r["depth"][:, :16]
    with pytest.raises(ValueError, match="depth"):
        crop_and_flip(r, AugmentConfig(), np.random.default_rng(0))
