"""Decode encoded images into the stored resolution, one row at a time, never failing the batch.

Each row is decoded with EXIF orientation applied, converted to 8-bit RGB from any mode
(RGBA/LA/P-with-transparency composited on white, CMYK, 16-bit and 32-bit integer grayscale
rescaled rather than clipped, float images), then resized (shorter side to ``resolution``,
antialiased) and centre-cropped to a square. Whatever goes wrong for a row — a truncated file,
random bytes, a decompression bomb, an image below ``min_side``, a format not in ``formats`` —
becomes an error record for that row (stage ``decode``); the other rows of the batch are
unaffected.

Only the formats in ``formats`` are ever decoded (``open_image``): Pillow would otherwise try
every decoder it has on untrusted bytes (EPS even runs Ghostscript where it is installed).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from pydantic import Field

from pipelines.config import Config, added, resource
from pipelines.data.sources import error_message

# Pillow format names read by default: the web's and cameras' formats, nothing that runs code.
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def check_formats(formats: tuple[str, ...], where: str) -> None:
    """``ValueError`` unless every name in ``formats`` is an image format Pillow can open."""
    from PIL import Image

    Image.init()
    if not formats:
        raise ValueError(f"{where} must name at least one image format")
    unknown = [f for f in formats if f not in Image.OPEN]
    if unknown:
        raise ValueError(
            f"{where}: unknown image formats {unknown}; Pillow reads {', '.join(sorted(Image.OPEN))}"
        )


class DecodeConfig(Config):
    max_pixels: int = Field(100_000_000, ge=1)  # larger images are refused: decompression-bomb guard
    formats: tuple[str, ...] = added(IMAGE_FORMATS)  # the only formats decoded; others are error rows
    # A file or tar member larger than this is an error row, never read into memory.
    max_file_bytes: int = added(128 * 2**20, ge=1)
    min_side: int = Field(1, ge=1)  # smaller images are recorded as errors; raise it to drop thumbnails
    batch_size: int = resource(64, ge=1)  # rows per decode task
    num_cpus: float = resource(1.0, gt=0)  # CPUs per decode task


class UnsupportedImageFormat(ValueError):
    """The image is in a format that is not allowed (``DecodeConfig.formats``)."""


def _sniff(data: bytes) -> str | None:
    """The format whose signature ``data`` starts with, by Pillow's prefix tests alone (no
    decoder runs); None when no registered format claims it."""
    from PIL import Image

    Image.init()
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(prefix):
                return name
        except Exception:  # noqa: BLE001,S112 - a prefix test that cannot judge 16 bytes
            continue
    return None


def open_image(data: bytes, formats: tuple[str, ...] = IMAGE_FORMATS):
    """``PIL.Image.open`` restricted to ``formats``; ``UnsupportedImageFormat`` naming the format
    when the bytes are an image of another one, Pillow's own error when they are no image."""
    from PIL import Image

    try:
        return Image.open(io.BytesIO(data), formats=list(formats))
    except Image.UnidentifiedImageError:
        found = _sniff(data)
        if found is not None and found not in formats:
            raise UnsupportedImageFormat(
                f"{found} images are not read (allowed formats: {', '.join(formats)})"
            ) from None
        raise


class ImageTooLarge(ValueError):
    """The image has more pixels than ``max_pixels`` (a decompression bomb or a huge scan)."""


class ImageTooSmall(ValueError):
    """The image's shorter side is below ``min_side``."""


def _to_rgb(im):  # PIL.Image -> PIL.Image (RGB, 8-bit)
    from PIL import Image

    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.float64)
        # 16-bit data (also when Pillow widened it to mode I) is rescaled, not clipped to 255.
        top = 65535.0 if (mode.startswith("I;16") or a.max(initial=0) > 255) else 255.0
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im).astype(np.float64)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        return Image.fromarray(np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    if mode != "RGB":
        return im.convert("RGB")
    return im


def decode_image(data: bytes, resolution: int, cfg: DecodeConfig) -> np.ndarray:
    """Encoded bytes → (resolution, resolution, 3) uint8 RGB; raises on any bad input."""
    from PIL import Image

    return resize_center_crop(decode_rgb(data, cfg), resolution, Image.Resampling.BICUBIC)


def decode_rgb(data: bytes, cfg: DecodeConfig):
    """Encoded bytes → the image as it is (a PIL RGB image, EXIF orientation applied, first
    frame); the same checks as ``decode_image``."""
    from PIL import Image, ImageOps

    if not data:
        raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = open_image(data, cfg.formats)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise ImageTooLarge(f"decompression bomb refused by Pillow: {e}") from None
        w, h = im.size
        if w * h > cfg.max_pixels:
            raise ImageTooLarge(f"{w}x{h} = {w * h} pixels exceeds max_pixels={cfg.max_pixels}")
        if min(w, h) < cfg.min_side:
            raise ImageTooSmall(f"{w}x{h} is below min_side={cfg.min_side}")
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)  # animated GIF/WebP: the first frame
        im.load()
        im = ImageOps.exif_transpose(im)
        return _to_rgb(im)


def resize_center_crop(im, resolution: int, resample) -> np.ndarray:
    """Shorter side to ``resolution`` then a centre crop; the same geometry for image and maps."""
    w, h = im.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), resample=resample, reducing_gap=None)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return np.asarray(im.crop((left, top, left + resolution, top + resolution)))


def decode_map(data: bytes, resolution: int, max_pixels: int = DecodeConfig().max_pixels) -> np.ndarray:
    """A ground-truth PNG map (mode L) → (resolution, resolution) uint8, nearest-neighbour;
    ``ImageTooLarge`` past ``max_pixels`` (checked from the header, before decoding)."""
    from PIL import Image

    im = open_image(data, ("PNG",))
    w, h = im.size
    if w * h > max_pixels:
        raise ImageTooLarge(f"{w}x{h} = {w * h} pixels exceeds max_pixels={max_pixels}")
    im.load()
    if im.mode != "L":
        im = im.convert("L")
    return resize_center_crop(im, resolution, Image.Resampling.NEAREST)


def decode_batch(
    batch: dict[str, np.ndarray], resolution: int, cfg: DecodeConfig, with_gt: bool = False
) -> dict[str, np.ndarray]:
    """The Ray Data decode stage: bytes columns in, image (and GT) arrays out, errors per row.

    ``with_gt``: the source carries ground-truth maps (the synthetic set); otherwise the GT
    columns are left out rather than carried as zeros through every later stage.
    """
    n = len(batch["key"])
    r = resolution
    image = np.zeros((n, r, r, 3), np.uint8)
    gt_inst = np.zeros((n, r, r) if with_gt else (n, 0, 0), np.uint8)
    gt_depth = np.zeros_like(gt_inst)
    has_gt = np.zeros((n,), bool)
    stage, etype, emsg = (list(batch[c]) for c in ("err_stage", "err_type", "err_msg"))
    for i in range(n):
        if stage[i]:
            continue
        try:
            image[i] = decode_image(batch["data"][i], r, cfg)
            gi, gd = batch["gt_instances_png"][i], batch["gt_depth_png"][i]
            if with_gt and gi and gd:
                gt_inst[i], gt_depth[i] = decode_map(gi, r, cfg.max_pixels), decode_map(gd, r, cfg.max_pixels)
                has_gt[i] = True
        except Exception as e:  # noqa: BLE001 - every failure is recorded for this row
            stage[i], etype[i], emsg[i] = "decode", type(e).__name__, error_message(e)
    out = {k: batch[k] for k in ("shard", "index", "key", "source", "text", "todo")}
    out.update(image=image, has_gt=has_gt)
    if with_gt:
        out.update(gt_instances=gt_inst, gt_depth=gt_depth)
    out.update(
        err_stage=np.array(stage, object), err_type=np.array(etype, object), err_msg=np.array(emsg, object)
    )
    return out
