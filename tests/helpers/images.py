"""Builders of good and deliberately broken image files for the decomposition tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

RED, BLUE = (220, 30, 30), (30, 30, 220)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def two_colour(w: int, h: int, left=RED, right=BLUE) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = left
    a[:, w // 2 :] = right
    return Image.fromarray(a)


def good_png(seed: int, size: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    a = np.zeros((size, size, 3), np.uint8)
    a[:] = rng.integers(0, 255, 3)
    y, x = rng.integers(0, size // 2, 2)
    a[y : y + size // 3, x : x + size // 3] = rng.integers(0, 255, 3)
    return encode(Image.fromarray(a), "PNG")


def exif_rotated_jpeg() -> bytes:
    """40x20 stored, left red / right blue, EXIF orientation 6 (display rotated 90° clockwise)."""
    im = two_colour(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(im, "JPEG", quality=95, exif=exif.tobytes())


def cmyk_jpeg() -> bytes:
    return encode(Image.new("RGB", (24, 24), RED).convert("CMYK"), "JPEG", quality=95)


def png16() -> bytes:
    a = np.full((24, 24), 40000, np.uint16)  # ≈ 155/255: must be rescaled, not clipped to 255
    return encode(Image.fromarray(a), "PNG")


def rgba_png() -> bytes:
    a = np.zeros((24, 24, 4), np.uint8)
    a[..., 0] = 255
    a[:, 12:, 3] = 255  # left half fully transparent → white
    return encode(Image.fromarray(a, "RGBA"), "PNG")


def palette_png() -> bytes:
    return encode(
        Image.new("RGB", (24, 24), BLUE).convert("P", palette=Image.Palette.ADAPTIVE, colors=4), "PNG"
    )


def one_pixel() -> bytes:
    return encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")


def bomb_png() -> bytes:
    """A tiny file that decodes to 150 megapixels."""
    return encode(Image.new("1", (15000, 10000)), "PNG")


def truncated_jpeg() -> bytes:
    data = encode(two_colour(64, 64), "JPEG", quality=90)
    return data[: len(data) // 2]


def random_bytes() -> bytes:
    return np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes()


def psd() -> bytes:
    """A valid 8-bit RGB Photoshop file (Pillow reads PSD but cannot write it)."""
    import struct

    h = w = 8
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, 8, 3)  # version 1, 3 channels, RGB
    sections = struct.pack(">III", 0, 0, 0)  # no colour-mode data, image resources, layers
    planes = bytes([220] * (h * w)) + bytes([30] * (h * w)) + bytes([30] * (h * w))
    return header + sections + struct.pack(">H", 0) + planes  # raw (uncompressed) planar data


def other_format(fmt: str) -> bytes:
    """A small red image in Pillow format ``fmt`` (EPS, ICO, PCX): decodable, but not allowed."""
    return encode(Image.new("RGB", (16, 16), RED), fmt)


# Images in formats that are read by Pillow but not allowed (pipelines.data.decode.IMAGE_FORMATS),
# under image names, as a scraped dataset may hold them; each must become an error row.
OTHER_FORMATS = {
    "postscript.jpg": lambda: other_format("EPS"),
    "photoshop.png": psd,
    "icon.png": lambda: other_format("ICO"),
    "paintbrush.jpg": lambda: other_format("PCX"),
}

BAD = {  # name → (bytes, expected error stage)
    "truncated.jpg": truncated_jpeg,
    "empty.jpg": lambda: b"",
    "random.jpg": random_bytes,
    "bomb.png": bomb_png,
    **OTHER_FORMATS,
}
ODD_BUT_GOOD = {
    "cmyk.jpg": cmyk_jpeg,
    "sixteen.png": png16,
    "rotated.jpg": exif_rotated_jpeg,
    "tiny.png": one_pixel,
    "alpha.png": rgba_png,
    "pal.png": palette_png,
}


def write_folder(root: Path, n_good: int = 6, with_bad: bool = True) -> dict[str, bytes]:
    """A folder (with a subfolder) of good images with sidecar captions, plus the odd and bad ones."""
    files: dict[str, bytes] = {}
    for i in range(n_good):
        files[f"{'sub/' if i % 2 else ''}good{i:02d}.png"] = good_png(i)
    if with_bad:
        files.update({k: f() for k, f in {**BAD, **ODD_BUT_GOOD}.items()})
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.with_suffix(".txt").write_text(f"caption of {Path(rel).stem}\n")
    return files
