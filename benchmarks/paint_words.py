"""Paint-with-words on a trained model of the synthetic set: does the painted object land in its region?

For N captions of the synthetic benchmark (seen pairs), the caption's first object ("red circle")
is painted onto a random square covering a quarter of the image; each caption is sampled from the
caption alone and with the painting (same seed). The scene parser reads each sample; a sample
scores when the largest object of the painted colour has its centre inside the painted square.
Prints one JSON line per paint weight (weight 0 = the caption alone) and saves a picture (a row per
caption: the caption, the painted region, the sample at each weight).

    python benchmarks/paint_words.py [--model recompose:reference] [--count 64] [--weights 0,1,4]
        [--guidance 5] [--steps 25] [--figure benchmarks/figures/paint-words.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEED = 11  # the synthetic scenes whose captions are painted (not the training set's seed 0)


@dataclass
class Case:
    caption: str
    phrase: str
    colour: str
    region: np.ndarray  # (R, R) uint8 {0, 1}


def cases(count: int, side: int) -> list[Case]:
    from pipelines.data.scene import parse_caption, render_sample

    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        caption = render_sample(SEED, "train", i, side).caption
        obj = parse_caption(caption)["objects"][0]
        half = side // 2
        x0, y0 = rng.integers(0, side - half + 1, 2)
        region = np.zeros((side, side), np.uint8)
        region[y0 : y0 + half, x0 : x0 + half] = 1
        out.append(Case(caption, f"{obj['colour']} {obj['shape']}", obj["colour"], region))
    return out


def inside(image: np.ndarray, case: Case) -> bool:
    """Whether the largest parsed object of the painted colour has its centre in the region."""
    from pipelines.evaluate.scene_parser import parse_scene

    side = image.shape[0]
    found = [o for o in parse_scene(image).objects if o.colour == case.colour]
    if not found:
        return False
    cx, cy = max(found, key=lambda o: o.area).centre
    x, y = min(int(cx * side), side - 1), min(int(cy * side), side - 1)
    return bool(case.region[y, x])


def measure(pipe, items: list[Case], weight: float, guidance: float, steps: int) -> tuple[float, np.ndarray]:
    """(share of samples whose painted object is inside its region, the samples)."""
    from pipelines.diffusion.requests import SampleRequest

    images = []
    for b in range(0, len(items), 8):
        requests = [
            SampleRequest(
                {"text": c.caption},
                guidance=guidance,
                seed=i,
                paint={c.phrase: c.region} if weight > 0 else None,
                paint_weight=weight,
            )
            for i, c in enumerate(items[b : b + 8], start=b)
        ]
        images += [o.images[0] for o in pipe.sample_batch(requests, steps)]
    hits = [inside(im, c) for im, c in zip(images, items, strict=True)]
    return float(np.mean(hits)), np.stack(images)


def main(argv: list[str] | None = None) -> int:
    import torch

    from pipelines.diffusion.loading import REFERENCE_MODEL, load_pipeline

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=REFERENCE_MODEL)
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--weights", default="0,1,4")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--figure", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    pipe = load_pipeline(a.model, "cpu")
    pipe.set_progress_bar_config(disable=True)
    from pipelines.diffusion.pictures import layout, text_tile

    items = cases(a.count, pipe.image_size)
    size = 96
    rows = [
        [("caption", text_tile(c.caption, size)), (f"painted: {c.phrase}", c.region * 255)] for c in items[:8]
    ]
    for w in [float(x) for x in a.weights.split(",")]:
        share, images = measure(pipe, items, w, a.guidance, a.steps)
        line = {"weight": w, "inside": round(share, 3), "count": a.count, "area": 0.25}
        print(json.dumps(line), flush=True)
        for row, im, c in zip(rows, images, items, strict=False):
            row.append((f"w={w:g}" + (" (in)" if inside(im, c) else ""), im))
    if a.figure:
        from PIL import Image

        Path(a.figure).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(layout(rows, size)).save(a.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
