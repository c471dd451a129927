import numpy as np

from pipelines.conditions.intensity import IntensityConfig, IntensityExtractor
from tests.conditions.contract import assert_contract, make_batch


def test_contract():
    assert_contract(IntensityExtractor(IntensityConfig(), 32), make_batch(4, 32))


def test_luma_matches_pil():
    from PIL import Image

    batch = make_batch(2, 16, seed=3)
    out = IntensityExtractor(IntensityConfig(), 16)(batch)["intensity"]
    for i in range(2):
        ref = np.asarray(Image.fromarray(batch["image"][i]).convert("L"))
        assert np.abs(out[i].astype(int) - ref.astype(int)).max() <= 1
