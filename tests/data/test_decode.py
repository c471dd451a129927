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


def test_files_and_tar_members_over_the_limit_are_error_rows_never_read(tmp_path):
    import io
    import tarfile

    from pipelines.data.sources import WorkUnit, read_unit

    small, big = images.good_png(0), images.random_bytes() + images.good_png(1)
    assert len(small) < 1000 < len(big)
    (tmp_path / "small.png").write_bytes(small)
    (tmp_path / "big.png").write_bytes(big)
    unit = WorkUnit("folder-00000", "folder", "", ("small.png", "big.png"))
    rows = read_unit(unit, str(tmp_path), max_bytes=1000)
    assert rows[0]["data"] == small and not rows[0]["err_stage"]
    assert rows[1]["err_type"] == "FileTooLarge" and not rows[1]["data"]

    tar = tmp_path / "in.tar"
    with tarfile.open(tar, "w") as tf:
        for key, data in (("a", small), ("b", big)):
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    rows = read_unit(WorkUnit("in-0000", "webdataset", str(tar), ("a", "b")), str(tmp_path), max_bytes=1000)
    assert rows[0]["data"] == small and rows[1]["err_type"] == "FileTooLarge"


def test_tar_member_names_are_relative_and_never_climb(tmp_path):
    import tarfile

    import pyarrow as pa

    from pipelines.data.webdataset_out import member_key, write_tar

    assert member_key("sub/good01") == "sub/good01"  # ordinary keys are unchanged
    assert member_key("/etc/passwd") == "etc/passwd"
    assert member_key("../../x.y") == "x_y"
    assert member_key("..") == "_"
    keys = ["/abs/one", "../../two", "a/./b"]
    table = pa.table(
        {
            "key": keys,
            "source": keys,
            "text": ["", "", ""],
            "image": pa.array([bytes(4 * 4 * 3)] * 3, pa.binary(4 * 4 * 3)),
        }
    )
    table = table.replace_schema_metadata(None)
    schema = table.schema.set(
        3, pa.field("image", pa.binary(48), metadata={b"shape": b"[4, 4, 3]", b"dtype": b"uint8"})
    )
    write_tar(table.cast(schema), tmp_path / "x.tar")
    with tarfile.open(tmp_path / "x.tar") as tf:
        names = tf.getnames()
    assert names and all(not n.startswith("/") and ".." not in n.split("/") for n in names), names
