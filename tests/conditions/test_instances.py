import numpy as np
import pytest

from pipelines.conditions.base import ExtractorUnavailable
from pipelines.conditions.instances import InstancesConfig, InstancesExtractor, renumber
from tests.conditions.contract import assert_contract, make_batch

# Neural kernels may round differently by batch size; an id map that changed would differ on far
# more pixels than this.
MODEL_MAP_TOL = 0.01


@pytest.fixture(scope="module")
def mask2former_dir(tmp_path_factory):
    from tests.helpers.tiny_segmentation import save_tiny_mask2former

    return str(save_tiny_mask2former(tmp_path_factory.mktemp("tiny_mask2former")))


@pytest.fixture(scope="module")
def oneformer_dir(tmp_path_factory):
    from tests.helpers.tiny_segmentation import save_tiny_oneformer

    return str(save_tiny_oneformer(tmp_path_factory.mktemp("tiny_oneformer")))


def _rectangles(r: int, boxes, background=(200, 200, 200)) -> tuple[np.ndarray, list[np.ndarray]]:
    """An (r, r, 3) image of solid boxes ((y0, x0, y1, x1), rgb) on a plain background, and their masks."""
    img = np.empty((r, r, 3), np.uint8)
    img[:] = background
    masks = []
    for (y0, x0, y1, x1), rgb in boxes:
        img[y0:y1, x0:x1] = rgb
        m = np.zeros((r, r), bool)
        m[y0:y1, x0:x1] = True
        masks.append(m)
    return img, masks


def _single(image: np.ndarray) -> dict[str, np.ndarray]:
    return {"image": image[None], "has_gt": np.zeros(1, bool)}


# -- the contract, per method --------------------------------------------------------------------
def test_contract_cluster():
    out = assert_contract(InstancesExtractor(InstancesConfig(method="cluster"), 32), make_batch(4, 32))
    assert out["instances"].max() > 0


def test_contract_ground_truth():
    batch = make_batch(4, 32, with_gt=True)
    ex = InstancesExtractor(InstancesConfig(method="ground_truth"), 32, has_ground_truth=True)
    out = assert_contract(ex, batch)["instances"]
    for i in range(4):
        np.testing.assert_array_equal(out[i], renumber(batch["gt_instances"][i], 32))
        # Same partition as the ground truth, only re-numbered.
        assert len(np.unique(out[i])) == len(np.unique(batch["gt_instances"][i]))


def test_contract_model_mask2former(mask2former_dir, no_network):
    ex = InstancesExtractor(InstancesConfig(method="model", weights=mask2former_dir), 32)
    out = assert_contract(ex, make_batch(4, 32), map_tol_frac=MODEL_MAP_TOL)["instances"]
    assert out.max() > 0, "the tiny model should keep a few segments (see tests/helpers/tiny_segmentation.py)"
    for m in out:
        _assert_convention(m, 32)
    assert not no_network, no_network


def test_contract_model_oneformer(oneformer_dir, no_network):
    ex = InstancesExtractor(InstancesConfig(method="model", weights=oneformer_dir), 32)
    out = assert_contract(ex, make_batch(4, 32), map_tol_frac=MODEL_MAP_TOL)["instances"]
    assert out.max() > 0
    for m in out:
        _assert_convention(m, 32)
    assert not no_network, no_network


def _assert_convention(ids: np.ndarray, max_instances: int) -> None:
    """Ids are 1..N without gaps, N <= max_instances, areas non-increasing with the id."""
    present = np.unique(ids[ids > 0])
    np.testing.assert_array_equal(present, np.arange(1, len(present) + 1))
    assert len(present) <= max_instances
    areas = np.bincount(ids.ravel())[1:]
    assert (np.diff(areas) <= 0).all(), areas


# -- the id convention ---------------------------------------------------------------------------
def test_renumber_orders_by_area_then_first_pixel():
    labels = np.array(
        [
            [7, 7, 0, 3],
            [5, 5, 0, 3],
            [9, 9, 9, 0],
        ]
    )
    # 9 has 3 pixels; 7, 5 and 3 have 2 each and rank by their first pixel: 7 (0), 3 (3), 5 (4).
    expected = np.array(
        [
            [2, 2, 0, 3],
            [4, 4, 0, 3],
            [1, 1, 1, 0],
        ],
        np.uint8,
    )
    np.testing.assert_array_equal(renumber(labels, 32), expected)
    np.testing.assert_array_equal(renumber(labels, 2), np.where(expected <= 2, expected, 0))
    assert renumber(-np.ones((2, 2), int), 32).max() == 0  # the model's "no segment" map


# -- the clustering fallback ---------------------------------------------------------------------
def test_cluster_recovers_solid_rectangles():
    boxes = [
        ((4, 4, 28, 40), (220, 30, 30)),  # 24 x 36 = 864
        ((36, 8, 60, 28), (20, 140, 40)),  # 24 x 20 = 480
        ((40, 40, 52, 60), (30, 40, 210)),  # 12 x 20 = 240
    ]
    img, masks = _rectangles(64, boxes)
    out = InstancesExtractor(InstancesConfig(method="cluster"), 64)(_single(img))["instances"][0]
    assert set(np.unique(out)) == {0, 1, 2, 3}
    for k, m in enumerate(masks, start=1):  # boxes are listed by decreasing area
        np.testing.assert_array_equal(out == k, m, err_msg=f"instance {k}")


def test_cluster_in_rgb_space_and_touching_shapes():
    # Two shapes touching each other and the border: still two instances, backdrop 0.
    boxes = [((0, 0, 20, 30), (250, 250, 0)), ((20, 0, 32, 30), (0, 200, 200))]
    img, masks = _rectangles(48, boxes, background=(10, 10, 10))
    out = InstancesExtractor(InstancesConfig(method="cluster", colour_space="rgb"), 48)(_single(img))
    np.testing.assert_array_equal(out["instances"][0] == 1, masks[0])
    np.testing.assert_array_equal(out["instances"][0] == 2, masks[1])


def test_cluster_ring_hole_is_background():
    img, (outer, inner) = _rectangles(
        64, [((10, 10, 50, 50), (255, 0, 0)), ((20, 20, 40, 40), (200, 200, 200))]
    )
    out = InstancesExtractor(InstancesConfig(method="cluster"), 64)(_single(img))["instances"][0]
    np.testing.assert_array_equal(out, (outer & ~inner).astype(np.uint8))


def test_cluster_drops_small_regions_and_plain_images():
    img, _ = _rectangles(64, [((10, 10, 40, 40), (255, 0, 0)), ((50, 50, 53, 53), (0, 0, 255))])
    out = InstancesExtractor(InstancesConfig(method="cluster", min_area_frac=0.01), 64)(_single(img))
    assert set(np.unique(out["instances"][0])) == {0, 1}  # the 3x3 speck is below 1% of the image
    plain = np.full((32, 32, 3), 128, np.uint8)
    assert InstancesExtractor(InstancesConfig(method="cluster"), 32)(_single(plain))["instances"].max() == 0


def test_max_instances_is_respected():
    # Six squares of decreasing size; only the three largest survive.
    sizes = [14, 12, 10, 8, 7, 6]
    boxes = []
    for k, s in enumerate(sizes):
        y0 = 2 + 20 * (k % 3)
        x0 = 2 + 28 * (k // 3)
        boxes.append(((y0, x0, y0 + s, x0 + s), (40 * k, 255 - 40 * k, 128)))
    img, masks = _rectangles(64, boxes, background=(255, 255, 255))
    cfg = InstancesConfig(method="cluster", max_instances=3, clusters=8, min_area_frac=0.0)
    out = InstancesExtractor(cfg, 64)(_single(img))["instances"][0]
    assert set(np.unique(out)) == {0, 1, 2, 3}
    for k in range(3):
        np.testing.assert_array_equal(out == k + 1, masks[k])

    gt = np.zeros((1, 16, 16), np.uint8)
    for k in range(1, 41):  # 40 one-to-six-pixel instances in raster order
        gt.reshape(-1)[k * 6 : k * 6 + 1 + k % 5] = k
    batch = {"image": np.zeros((1, 16, 16, 3), np.uint8), "gt_instances": gt, "has_gt": np.ones(1, bool)}
    ex = InstancesExtractor(
        InstancesConfig(method="ground_truth", max_instances=32), 16, has_ground_truth=True
    )
    out = ex(batch)["instances"][0]
    assert out.max() == 32 and len(np.unique(out)) == 33


# -- auto: ground truth where present, the fallback elsewhere -----------------------------------
def test_auto_mixed_batch_uses_ground_truth_then_cluster():
    batch = make_batch(4, 32, with_gt=True)
    batch["has_gt"] = np.array([True, False, True, False])
    out = InstancesExtractor(InstancesConfig(), 32)(batch)["instances"]
    cluster = InstancesExtractor(InstancesConfig(method="cluster"), 32)(batch)["instances"]
    for i in (0, 2):
        np.testing.assert_array_equal(out[i], renumber(batch["gt_instances"][i], 32))
    for i in (1, 3):
        np.testing.assert_array_equal(out[i], cluster[i])
    assert not np.array_equal(out[0], cluster[0])  # the GT rows really came from the GT


def test_auto_with_weights_uses_the_model_where_no_ground_truth(mask2former_dir, no_network):
    batch = make_batch(4, 32, with_gt=True)
    batch["has_gt"] = np.array([False, True, False, True])
    out = InstancesExtractor(InstancesConfig(weights=mask2former_dir), 32)(batch)["instances"]
    model = InstancesExtractor(InstancesConfig(method="model", weights=mask2former_dir), 32)(batch)[
        "instances"
    ]
    for i in (1, 3):
        np.testing.assert_array_equal(out[i], renumber(batch["gt_instances"][i], 32))
    diff = (out[[0, 2]] != model[[0, 2]]).mean()
    assert diff <= MODEL_MAP_TOL
    assert not no_network, no_network


# -- errors --------------------------------------------------------------------------------------
def test_model_without_weights_is_unavailable():
    ex = InstancesExtractor(InstancesConfig(method="model"), 32)
    reason = ex.unavailable_reason()
    assert reason and "instances.weights" in reason and "mask2former" in reason
    assert "huggingface-cli download" in reason
    with pytest.raises(ExtractorUnavailable, match="instances.weights"):
        ex(make_batch(1, 32))


def test_missing_weights_are_a_clear_error_and_never_downloaded(no_network, tmp_path):
    for weights in (str(tmp_path / "no_such_dir"), "facebook/mask2former-swin-tiny-coco-panoptic"):
        ex = InstancesExtractor(InstancesConfig(method="model", weights=weights), 32)
        with pytest.raises(ExtractorUnavailable, match="huggingface-cli download"):
            ex(make_batch(1, 32))
    empty = tmp_path / "empty"
    empty.mkdir()
    ex = InstancesExtractor(InstancesConfig(weights=str(empty)), 32)
    with pytest.raises(ExtractorUnavailable, match="could not load a universal-segmentation model"):
        ex(make_batch(1, 32))
    assert not no_network, no_network


def test_ground_truth_needs_ground_truth():
    ex = InstancesExtractor(InstancesConfig(method="ground_truth"), 32)
    assert "ground-truth" in ex.unavailable_reason()
    ex = InstancesExtractor(InstancesConfig(method="ground_truth"), 32, has_ground_truth=True)
    batch = make_batch(3, 32, with_gt=True)
    batch["has_gt"][1] = False
    with pytest.raises(ValueError, match=r"rows \[1\] have no ground truth"):
        ex(batch)


def test_wrong_image_size_is_rejected():
    with pytest.raises(ValueError, match="expected images of shape"):
        InstancesExtractor(InstancesConfig(method="cluster"), 32)(make_batch(1, 16))


@pytest.mark.parametrize(
    "bad",
    [
        {"max_instances": 0},
        {"max_instances": 256},
        {"clusters": 1},
        {"min_area_frac": 1.0},
        {"score_threshold": 2.0},
    ],
)
def test_config_validation(bad):
    with pytest.raises(ValueError):
        InstancesConfig(**bad)


def test_fingerprint_follows_outputs_not_resources():
    base = InstancesExtractor(InstancesConfig(), 32).fingerprint()
    assert InstancesExtractor(InstancesConfig(batch_size=2), 32).fingerprint() == base
    assert InstancesExtractor(InstancesConfig(clusters=6), 32).fingerprint() != base
    assert InstancesExtractor(InstancesConfig(weights="/w"), 32).fingerprint() != base


def test_oneformer_metadata_is_never_downloaded(oneformer_dir, no_network, tmp_path):
    # Real OneFormer processors name a class-metadata file that transformers fetches from the hub
    # when the processor is built; offline and uncached, that must be a clear error.
    import json
    import shutil

    weights = tmp_path / "oneformer"
    shutil.copytree(oneformer_dir, weights)
    cfg_path = weights / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["image_processor"]["class_info_file"] = "coco_panoptic.json"
    cfg_path.write_text(json.dumps(cfg))
    ex = InstancesExtractor(InstancesConfig(method="model", weights=str(weights)), 32)
    with pytest.raises(ExtractorUnavailable, match="oneformer_demo"):
        ex(make_batch(1, 32))
    assert not no_network, no_network
