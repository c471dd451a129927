"""Caption-only probe of a saved pipeline: sample N seen benchmark captions at each guidance scale,
read the samples back with the scene parser, print one JSON line per scale (with ``fit``, the
parsed objects' mean template fit: are they shapes at all) and save a picture
(top: the generator's render of each caption, below: the sample).

    python benchmarks/caption_probe.py PIPELINE_DIR N GUIDANCES [STEPS] [OUT_DIR]
    python benchmarks/caption_probe.py pipelines/diffusion/reference 32 1,3,5,9
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.data.scene import render_sample
from pipelines.diffusion.loading import load_pipeline
from pipelines.diffusion.requests import SampleRequest
from pipelines.evaluate.config import BenchmarkConfig
from pipelines.evaluate.scene_parser import parse_scene, score, summarize

BENCH_SEED = BenchmarkConfig().seed  # the evaluation's benchmark captions


def template_fit(fits: list[float]) -> float | None:
    """Mean template fit of the parsed objects (``ParsedObject.fit``): how much each object looks
    like some shape at all, whatever the caption asked (the generator's renders: ~0.96)."""
    return round(float(np.mean(fits)), 3) if fits else None


def seen_rows(n: int, size: int) -> list:
    """The first ``n`` seen benchmark scenes (caption and render) at ``size`` pixels."""
    return [render_sample(BENCH_SEED, "train", i, size) for i in range(n)]


def read_back(images: list[np.ndarray], rows: list) -> tuple[dict, collections.Counter]:
    """The scene parser's reading of each sample against its row's caption: the summary's
    accuracies (rounded), ``fit`` (``template_fit``), and how often each shape was parsed."""
    scores, shapes, fits = [], collections.Counter(), []
    for image, r in zip(images, rows, strict=True):
        parsed = parse_scene(image)
        scores.append(score(parsed, r.caption))
        shapes.update(o.shape for o in parsed.objects)
        fits += [o.fit for o in parsed.objects]
    figures = {k: round(v, 3) for k, v in summarize(scores).items() if isinstance(v, float)}
    return figures | {"fit": template_fit(fits)}, shapes


def sample(pipe, requests: list[SampleRequest], steps: int) -> list[np.ndarray]:
    """One (R, R, 3) uint8 image per request, sampled 8 requests at a time."""
    images = []
    for b in range(0, len(requests), 8):
        images += [
            np.asarray(o.images[0]) for o in pipe.sample_batch(requests[b : b + 8], num_inference_steps=steps)
        ]
    return images


def main(model: str, n: int, scales: list[float], steps: int, out: Path) -> None:
    torch.set_num_threads(2)
    pipe = load_pipeline(model, "cpu")
    pipe.set_progress_bar_config(disable=True)
    rows = seen_rows(n, pipe.image_size)
    out.mkdir(parents=True, exist_ok=True)
    for g in scales:
        requests = [SampleRequest({"text": r.caption}, guidance=g, seed=i) for i, r in enumerate(rows)]
        images = sample(pipe, requests, steps)
        figures, shapes = read_back(images, rows)
        print(json.dumps({"guidance": g, **figures, "parsed_shapes": dict(shapes)}), flush=True)
        grid = np.concatenate(
            [np.concatenate([r.image, im], 0) for r, im in zip(rows[:16], images[:16], strict=True)], 1
        )
        Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(
            out / f"caption-probe-g{g}.png"
        )


if __name__ == "__main__":
    a = sys.argv[1:]
    main(
        a[0],
        int(a[1]),
        [float(g) for g in a[2].split(",")],
        int(a[3]) if len(a) > 3 else 25,
        Path(a[4]) if len(a) > 4 else Path("."),
    )
