"""Outpainting (DALL-E 2): the source image placed on a larger canvas, the rest regenerated — a
masked edit whose mask is the new border, so the source's pixels are kept exactly.

    --outpaint left=L,right=R,top=T,bottom=B     (output pixels; unnamed sides are 0)

At output side S the source fills the box (S - L - R) × (S - T - B) at (L, T): given at that size
it is kept bit for bit, otherwise it is resized to it first (bicubic). The new border starts as the
source's edge pixels repeated (what the model's masked-image condition sees outside the box is the
source; inside the border, the model regenerates).
"""

from __future__ import annotations

import numpy as np

SIDES = ("left", "right", "top", "bottom")


def parse_outpaint(spec: str) -> dict[str, int]:
    """``'left=16,top=8'`` -> {"left": 16, "right": 0, "top": 8, "bottom": 0}; ``ValueError`` naming
    what is wrong."""
    pad = dict.fromkeys(SIDES, 0)
    for item in filter(None, (i.strip() for i in spec.split(","))):
        side, sep, value = item.partition("=")
        if not sep or side.strip() not in SIDES:
            raise ValueError(f"{item!r} is not SIDE=PIXELS with SIDE one of {', '.join(SIDES)}")
        try:
            pad[side.strip()] = int(value)
        except ValueError:
            raise ValueError(f"{item!r}: {value!r} is not a whole number of pixels") from None
        if pad[side.strip()] < 0:
            raise ValueError(f"{item!r}: pixels must be >= 0")
    if not any(pad.values()):
        raise ValueError(f"{spec!r} extends no side; give e.g. left=16")
    return pad


def inner_box(pad: dict[str, int], side: int) -> tuple[int, int, int, int]:
    """(left, top, width, height) of the source on a side×side canvas."""
    w, h = side - pad["left"] - pad["right"], side - pad["top"] - pad["bottom"]
    if w < 1 or h < 1:
        raise ValueError(
            f"outpaint {pad} leaves no room for the source on the {side}×{side} output "
            f"({w}×{h}); the sides must sum to less than {side}"
        )
    return pad["left"], pad["top"], w, h


def outpaint_canvas(image: np.ndarray, pad: dict[str, int], side: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 source -> (canvas (side, side, 3) uint8, mask (side, side) uint8, 1 = new)."""
    from PIL import Image

    left, top, w, h = inner_box(pad, side)
    image = np.asarray(image, np.uint8)
    if image.shape[:2] != (h, w):
        image = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC))
    canvas = np.pad(image, ((top, side - top - h), (left, side - left - w), (0, 0)), mode="edge")
    mask = np.ones((side, side), np.uint8)
    mask[top : top + h, left : left + w] = 0
    return canvas, mask
