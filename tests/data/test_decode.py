"""pipelines/data/decode.py: only allowed formats are opened, and maps are size-checked too."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.data.decode import (
    DecodeConfig,
    ImageTooLarge,
    UnsupportedImageFormat,
    decode_image,
    decode_map,
    open_image,
)
from tests.helpers import images


def test_other_formats_are_refused_by_their_signature():
    for make in images.OTHER_FORMATS.values():
        with pytest.raises(UnsupportedImageFormat, match="not read"):
            decode_image(make(), 32, DecodeConfig())
        # allowed when configured: the list is the only gate
        assert open_image(make(), ("PNG", "EPS", "PSD", "ICO", "PCX")).format in ("EPS", "PSD", "ICO", "PCX")
    with pytest.raises(Exception) as e:  # not an image at all: Pillow's own error, not a format one
        open_image(images.random_bytes())
    assert not isinstance(e.value, UnsupportedImageFormat)
    assert decode_image(images.good_png(0), 32, DecodeConfig()).shape == (32, 32, 3)


def test_a_map_over_max_pixels_is_refused_before_decoding():
    from PIL import Image

    from tests.helpers.images import encode

    bomb = encode(Image.new("L", (15000, 10000)), "PNG")  # a tiny file, 150 megapixels
    with pytest.raises(ImageTooLarge):
        decode_map(bomb, 32)
    small = encode(Image.fromarray(np.full((8, 8), 7, np.uint8)), "PNG")
    assert (decode_map(small, 4) == 7).all()
    with pytest.raises(UnsupportedImageFormat):  # maps are PNGs only
        decode_map(images.other_format("PCX"), 4)
