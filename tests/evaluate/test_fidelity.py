import numpy as np
import pytest
from skimage.segmentation import find_boundaries

from pipelines.conditions.palette import NUM_BINS, palette_from_hex
from pipelines.data.scene import render_sample
from pipelines.evaluate.fidelity import (
    FIDELITY_METRICS,
    condition_fidelity,
    depth_rmse_ssi,
    edge_f1,
    instances_miou,
    mask_preservation,
    palette_fidelity,
    psnr,
    ssim,
)

R = 32


def samples(n: int = 3, resolution: int = R) -> list:
    return [render_sample(0, "train", i, resolution) for i in range(n)]


def sketch_of(instances: np.ndarray) -> np.ndarray:
    """(R, R) uint8 in {0, 255}: the outlines of a ground-truth instance map, a cheap real sketch."""
    return (find_boundaries(instances, mode="inner") * 255).astype(np.uint8)


def intensity_of(image: np.ndarray) -> np.ndarray:
    return image.mean(-1).astype(np.uint8)


def square(lo: tuple[int, int], side: int, size: int = R, value: int = 1) -> np.ndarray:
    out = np.zeros((size, size), np.uint8)
    out[lo[0] : lo[0] + side, lo[1] : lo[1] + side] = value
    return out


def outline(lo: tuple[int, int], side: int, size: int = R) -> np.ndarray:
    return sketch_of(square(lo, side, size))


@pytest.fixture(scope="module")
def real() -> dict[str, np.ndarray]:
    """(3, R, R) batches of each map representation from synthetic ground truth."""
    ss = samples()
    return {
        "image": np.stack([s.image for s in ss]),
        "instances": np.stack([s.instances for s in ss]),
        "depth": np.stack([s.depth for s in ss]),
        "sketch": np.stack([sketch_of(s.instances) for s in ss]),
        "intensity": np.stack([intensity_of(s.image) for s in ss]),
        "palette": np.stack(
            [palette_from_hex(c) for c in (["#ff0000"], ["#00ff00", "#0000ff"], ["#888888"])]
        ),
    }


# -- perfect scores and the metric table ------------------------------------------------------
PERFECT = {
    "palette": {"intersection": 1.0, "chi2": 0.0},
    "sketch": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "ssim": 1.0},
    "instances": {"miou": 1.0},
    "depth": {"rmse_ssi": 0.0},
    "intensity": {"ssim": 1.0, "psnr": np.inf},
    "mask": {"max_abs_diff": 0.0},
}


@pytest.mark.parametrize("name", list(FIDELITY_METRICS))
def test_identical_inputs_score_perfectly(real, name):
    given = real["image" if name == "mask" else name]
    kw = {"mask": real["instances"] > 0} if name == "mask" else {}
    out = condition_fidelity(name, given, given.copy(), **kw)
    assert list(out) == [m.name for m in FIDELITY_METRICS[name]]  # the table's keys, in order
    for key, value in out.items():
        assert value.shape == (len(given),)
        np.testing.assert_allclose(value, PERFECT[name][key], atol=1e-6, err_msg=f"{name}.{key}")
    single = condition_fidelity(name, given[0], given[0].copy(), **{k: v[0] for k, v in kw.items()})
    assert all(isinstance(v, float) for v in single.values())


def test_metric_directions():
    assert set(FIDELITY_METRICS) == set(PERFECT)
    for metrics in FIDELITY_METRICS.values():
        assert all(m.direction in ("higher is better", "lower is better") for m in metrics)
    assert {m.name: m.direction for m in FIDELITY_METRICS["palette"]} == {
        "intersection": "higher is better",
        "chi2": "lower is better",
    }


# -- hand-made cases with known answers ------------------------------------------------------
def test_edge_shift_is_forgiven_within_tolerance():
    given, shifted = outline((8, 8), 12), outline((8, 9), 12)
    assert edge_f1(given, shifted, tolerance_px=1)["f1"] == 1.0
    exact = edge_f1(given, shifted, tolerance_px=0)
    assert 0 < exact["f1"] < 1 and 0 < exact["precision"] < 1
    # A diagonal 1 px shift is sqrt(2) away: not within 1 px, within 1.5.
    diagonal = outline((9, 9), 12)
    assert edge_f1(given, diagonal, tolerance_px=1)["f1"] < 1
    assert edge_f1(given, diagonal, tolerance_px=1.5)["f1"] == 1.0


def test_edge_f1_precision_and_recall():
    given = np.zeros((R, R), np.uint8)
    given[:, 10] = 255
    got = given.copy()
    got[:, 20] = 255  # twice the edges: every given one found, half the drawn ones wrong
    out = edge_f1(given, got)
    assert (out["precision"], out["recall"]) == (0.5, 1.0)
    assert out["f1"] == pytest.approx(2 / 3)
    assert edge_f1(given, np.where(given > 0, 127, 0).astype(np.uint8))["recall"] == 0.0  # below 128


def test_edge_f1_empty_maps():
    empty, edges = np.zeros((R, R), np.uint8), outline((8, 8), 12)
    assert edge_f1(empty, empty) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert edge_f1(empty, edges) == {"precision": 0.0, "recall": 1.0, "f1": 0.0}
    assert edge_f1(edges, empty) == {"precision": 1.0, "recall": 0.0, "f1": 0.0}


def test_depth_is_scale_and_shift_invariant():
    k = np.add.outer(np.arange(R), np.arange(R)).astype(np.uint8) * 2  # 0 .. 124, a ramp
    given = (k // 2 + 51).astype(np.uint8)  # exactly 0.5 * k + 0.2 (in [0, 1] units)
    assert depth_rmse_ssi(given, k) == pytest.approx(0.0, abs=1e-12)
    # Near/far swapped is not forgiven (s >= 0): it scores std(given), as a constant map does.
    std = (given / 255.0).std()
    assert depth_rmse_ssi(given, 255 - k) == pytest.approx(std)
    assert depth_rmse_ssi(given, np.full_like(k, 7)) == pytest.approx(std)
    assert depth_rmse_ssi(np.full_like(k, 7), k) == pytest.approx(0.0, abs=1e-12)


def test_instances_permuted_ids_and_half_overlap():
    given = square((0, 0), 10) + square((16, 16), 10, value=2)
    permuted = square((0, 0), 10, value=5) + square((16, 16), 10, value=3)
    assert instances_miou(given, permuted) == 1.0
    # A 10 x 10 square shifted by 5 columns: intersection 50, union 150.
    assert instances_miou(square((0, 0), 10), square((0, 5), 10, value=9)) == pytest.approx(1 / 3)
    # One of two given instances found, plus a spurious one elsewhere: (1 + 0) / 2.
    got = square((0, 0), 10, value=4) + square((0, 20), 6, value=7)
    assert instances_miou(given, got) == pytest.approx(0.5)
    empty = np.zeros((R, R), np.uint8)
    assert instances_miou(empty, empty) == 1.0
    assert instances_miou(empty, given) == 0.0
    assert instances_miou(given, empty) == 0.0


def test_instances_matching_is_one_to_one():
    given = square((0, 0), 10) + square((0, 10), 10, value=2)
    merged = square((0, 0), 10, value=3) + square((0, 10), 10, value=3)  # one got id over both
    assert instances_miou(given, merged) == pytest.approx((100 / 200 + 0) / 2)


def test_palette_known_values():
    red, blue = palette_from_hex(["#ff0000"], sigma=0), palette_from_hex(["#0000ff"], sigma=0)
    assert palette_fidelity(red, blue) == {"intersection": 0.0, "chi2": 1.0}
    half = (red + blue) / 2
    assert palette_fidelity(red, half)["intersection"] == pytest.approx(0.5)


def test_psnr_known_value():
    a = np.full((R, R), 100, np.uint8)
    assert psnr(a, a + 1) == pytest.approx(20 * np.log10(255))
    assert psnr(a, a) == np.inf


def test_mask_preservation():
    source = samples(1)[0].image
    mask = square((4, 4), 12)
    edited = source.copy()
    edited[4:16, 4:16] = 0  # inside the mask: free to change
    assert mask_preservation(source, edited, mask) == 0.0
    edited[30, 30, 2] = source[30, 30, 2] ^ 7  # one channel of one kept pixel
    assert mask_preservation(source, edited, mask) == abs(int(source[30, 30, 2]) - int(edited[30, 30, 2]))
    assert mask_preservation(source, edited, np.ones_like(mask)) == 0.0  # nothing kept
    gray = intensity_of(source)
    assert mask_preservation(gray, gray + 3 * (1 - mask), mask) == 3.0


# -- ordering and batching ---------------------------------------------------------------------
def test_structured_beats_random(real):
    rng = np.random.default_rng(0)
    sketch, intensity, depth, instances = (real[k][0] for k in ("sketch", "intensity", "depth", "instances"))
    noise = rng.integers(0, 256, (R, R), dtype=np.uint8)
    near_sketch = np.roll(sketch, 1, axis=1)
    assert edge_f1(sketch, near_sketch)["f1"] > edge_f1(sketch, noise)["f1"]
    assert ssim(sketch, near_sketch) > ssim(sketch, noise)
    jitter = np.clip(intensity + rng.integers(-8, 9, (R, R)), 0, 255).astype(np.uint8)
    assert ssim(intensity, jitter) > ssim(intensity, noise)
    assert psnr(intensity, jitter) > psnr(intensity, noise)
    blurred_depth = ((depth.astype(np.int32) + np.roll(depth, 1, axis=0)) // 2).astype(np.uint8)
    assert depth_rmse_ssi(depth, blurred_depth) < depth_rmse_ssi(depth, noise)
    assert instances_miou(instances, np.roll(instances, 2, axis=1)) > instances_miou(instances, noise % 4)
    red, orange, blue = (palette_from_hex([c]) for c in ("#ff0000", "#ff8000", "#0000ff"))
    assert palette_fidelity(red, orange)["intersection"] > palette_fidelity(red, blue)["intersection"]
    assert palette_fidelity(red, orange)["chi2"] < palette_fidelity(red, blue)["chi2"]


@pytest.mark.parametrize("name", list(FIDELITY_METRICS))
def test_batched_equals_per_image(real, name):
    rng = np.random.default_rng(1)
    given = real["image" if name == "mask" else name]
    got = np.roll(given, 1, axis=1)  # a real map moved a little, so no score is trivially perfect
    if name == "palette":
        got = rng.dirichlet(np.ones(NUM_BINS), len(given))
    masks = rng.integers(0, 2, given.shape[:3]) if name == "mask" else None
    batched = condition_fidelity(name, given, got, **({"mask": masks} if name == "mask" else {}))
    for i in range(len(given)):
        one = condition_fidelity(name, given[i], got[i], **({"mask": masks[i]} if name == "mask" else {}))
        for key, value in one.items():
            assert batched[key][i] == pytest.approx(value, abs=1e-12), f"{name}.{key}[{i}]"


# -- bad inputs ---------------------------------------------------------------------------------
def test_bad_inputs_raise():
    a = np.zeros((R, R), np.uint8)
    with pytest.raises(ValueError, match="known: palette, sketch, instances, depth, intensity, mask"):
        condition_fidelity("caption", a, a)
    with pytest.raises(ValueError, match="same shape"):
        ssim(a, np.zeros((R, R + 1), np.uint8))
    with pytest.raises(ValueError, match="must be uint8"):
        edge_f1(a, a.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(R, R\) or \(B, R, R\)"):
        depth_rmse_ssi(a[0], a[0])
    with pytest.raises(ValueError, match="at least 11 px"):
        ssim(a[:8, :8], a[:8, :8])
    with pytest.raises(ValueError, match="tolerance_px"):
        edge_f1(a, a, tolerance_px=-1)
    with pytest.raises(ValueError, match="non-negative integer ids"):
        instances_miou(a.astype(np.float32), a.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(156,\)"):
        palette_fidelity(np.ones(10) / 10, np.ones(10) / 10)
    with pytest.raises(ValueError, match="non-negative"):
        palette_fidelity(-np.ones(NUM_BINS), np.ones(NUM_BINS))
    with pytest.raises(ValueError, match="only 0 and 1"):
        mask_preservation(a, a, a + 2)
    with pytest.raises(ValueError, match="mask must be"):
        mask_preservation(a, a, a[:16])
    with pytest.raises(ValueError, match="mask="):
        condition_fidelity("mask", a, a)
    with pytest.raises(ValueError, match="unexpected keywords"):
        condition_fidelity("depth", a, a, tolerance_px=2)
