import numpy as np
import pytest

from pipelines.conditions.mask import MaskConfig, MaskGenerator, apply_mask, mask_from_image
from tests.conditions.contract import make_batch

R = 32
ONLY = {
    "boxes": MaskConfig(p_boxes=1.0, p_strokes=0.0, p_instance=0.0),
    "strokes": MaskConfig(p_boxes=0.0, p_strokes=1.0, p_instance=0.0),
    "instance": MaskConfig(p_boxes=0.0, p_strokes=1e-9, p_instance=1 - 1e-9),  # strokes: fallback only
}


def gen(cfg: MaskConfig = MaskConfig(), n: int = 16, seed: int = 0, instances=None) -> np.ndarray:
    return MaskGenerator(cfg, R).generate(n, R, np.random.default_rng(seed), instances)


def test_registry_attributes():
    g = MaskGenerator(MaskConfig(), R)
    assert MaskGenerator.name == "mask" and MaskGenerator.version == "1"
    assert MaskGenerator.extracted is False
    assert g.columns() == []
    with pytest.raises(RuntimeError, match="MaskGenerator.generate"):
        g.extract(make_batch(1, R))
    with pytest.raises(RuntimeError, match="never stored in shards"):
        g(make_batch(1, R))


def test_deterministic_by_seed():
    inst = make_batch(8, R)["gt_instances"]
    a, b = gen(n=8, seed=3, instances=inst), gen(n=8, seed=3, instances=inst)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, gen(n=8, seed=4, instances=inst))


@pytest.mark.parametrize("mode", list(ONLY))
def test_each_mode_gives_partial_binary_masks(mode):
    inst = make_batch(32, R, seed=1)["gt_instances"]
    m = gen(ONLY[mode], n=32, seed=5, instances=inst)
    assert m.shape == (32, R, R) and m.dtype == np.uint8
    assert set(np.unique(m)) <= {0, 1}
    cover = m.mean((1, 2))
    assert (cover > 0).all() and (cover < 1).all(), cover
    assert 0.02 < cover.mean() < 0.8


def test_instance_mode_is_a_union_of_instances():
    inst = make_batch(16, R, seed=2)["gt_instances"]
    m = gen(ONLY["instance"], n=16, seed=7, instances=inst)
    for i in range(16):
        ids = np.unique(inst[i][m[i] == 1])
        assert 1 <= len(ids) <= 2 and 0 not in ids
        np.testing.assert_array_equal(m[i], np.isin(inst[i], ids))


def test_instances_are_resampled_and_empty_maps_fall_back():
    inst = make_batch(4, 2 * R, seed=3)["gt_instances"]
    inst[0] = 0  # no instances: this sample must get a box or stroke mask instead
    m = MaskGenerator(ONLY["instance"], R).generate(4, R, np.random.default_rng(0), inst)
    assert m.shape == (4, R, R) and m[0].any()
    small = inst[:, 1::2, 1::2]  # what nearest-neighbour resampling to R reads
    for i in range(1, 4):
        np.testing.assert_array_equal(m[i], np.isin(small[i], np.unique(small[i][m[i] == 1])))
    with pytest.raises(ValueError, match="instances"):
        gen(instances=inst.astype(np.int32))


def test_without_instances_only_boxes_and_strokes():
    m = gen(MaskConfig(p_boxes=0.1, p_strokes=0.1, p_instance=0.8), n=8)
    assert m.shape == (8, R, R) and (m.mean((1, 2)) > 0).all()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"p_boxes": 0.5, "p_strokes": 0.6, "p_instance": 0.0},
        {"p_boxes": 0.0, "p_strokes": 0.0, "p_instance": 1.0},
        {"p_boxes": -0.1, "p_strokes": 0.8, "p_instance": 0.3},
        {"box_size": (0.5, 0.2)},
        {"stroke_width": (0.0, 0.1)},
        {"max_boxes": 0},
        {"max_vertices": 1},
    ],
)
def test_config_is_validated(kwargs):
    with pytest.raises(ValueError):
        MaskConfig(**kwargs)


def test_mask_from_image():
    img = np.zeros((40, 60), np.uint8)
    img[:20, :30] = 255  # top-left quarter is to be regenerated
    m = mask_from_image(img, 8)
    expected = np.zeros((8, 8), np.uint8)
    expected[:4, :4] = 1
    np.testing.assert_array_equal(m, expected)
    np.testing.assert_array_equal(mask_from_image(np.repeat(img[..., None], 3, -1), 8), expected)
    with pytest.raises(ValueError, match="uint8"):
        mask_from_image(img.astype(np.float32), 8)


def test_apply_mask_fills_neutral_gray():
    images = make_batch(2, R)["image"]
    m = gen(ONLY["boxes"], n=2)
    out = apply_mask(images, m)
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert (out[m == 1] == 128).all()
    np.testing.assert_array_equal(out[m == 0], images[m == 0])
    f = images.astype(np.float32) / 127.5 - 1
    outf = apply_mask(f, m[0])  # one mask for the whole batch
    assert (outf[:, m[0] == 1] == 0).all() and outf.dtype == np.float32
    with pytest.raises(ValueError, match="does not match"):
        apply_mask(images, m[:, :8])
