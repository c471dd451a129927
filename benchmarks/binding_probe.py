"""Does the caption bind each colour to its shape? A probe of a saved pipeline that needs no shapes
drawn from scratch: the scene's instance map gives the layout, the caption has to say which object
gets which colour.

    python benchmarks/binding_probe.py PIPELINE_DIR N [GUIDANCE] [STEPS] [OUT_DIR]
    python benchmarks/binding_probe.py pipelines/diffusion/reference 48 3

The first N benchmark scenes (seen pairs, the evaluation's caption seed) with two or three
objects, sampled twice with the same seeds: given the instance map alone (the floor: nothing says
which colour goes where) and given the instance map and the caption. The scene parser reads each
sample back; ``pairs`` is the share of the caption's objects whose (colour, shape) some parsed
object has: with the shapes fixed by the map, this is the binding of colour to shape. A caption
encoder that reads the caption as a bag of words can name the colours (``colour``) but not put
them on the right objects. Prints one JSON line per condition set; saves a picture (top: the
generator's render, then instance-map-only and instance-map + caption samples).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.caption_probe import BENCH_SEED, sample  # noqa: E402
from pipelines.conditions.instances import renumber  # noqa: E402
from pipelines.data.scene import render_sample  # noqa: E402
from pipelines.diffusion.loading import load_pipeline  # noqa: E402
from pipelines.diffusion.requests import SampleRequest  # noqa: E402
from pipelines.evaluate.scene_parser import parse_scene, score, summarize  # noqa: E402

MAX_INSTANCES = 32  # InstancesConfig.max_instances default (a scene has at most 3 objects)


def scenes(n: int, size: int) -> list:
    rows, i = [], 0
    while len(rows) < n:
        r = render_sample(BENCH_SEED, "train", i, size)
        if len(r.scene["objects"]) >= 2:
            rows.append(r)
        i += 1
    return rows


def main(model: str, n: int, guidance: float, steps: int, out: Path) -> None:
    torch.set_num_threads(2)
    pipe = load_pipeline(model, "cpu")
    pipe.set_progress_bar_config(disable=True)
    rows = scenes(n, pipe.image_size)
    out.mkdir(parents=True, exist_ok=True)
    pictures = [np.concatenate([r.image for r in rows[:16]], 1)]
    for name, with_caption in (("instances", False), ("instances+caption", True)):
        requests = []
        for i, r in enumerate(rows):
            conditions = {"instances": renumber(r.instances, MAX_INSTANCES)}
            if with_caption:
                conditions["text"] = r.caption
            requests.append(SampleRequest(conditions, guidance=guidance, seed=i))
        images = sample(pipe, requests, steps)
        s = summarize(score(parse_scene(im), r.caption) for im, r in zip(images, rows, strict=True))
        keys = ("pairs", "colour", "shape", "count", "n_images", "n_objects")
        print(
            json.dumps({"given": name, "guidance": guidance} | {k: round(float(s[k]), 3) for k in keys}),
            flush=True,
        )
        pictures.append(np.concatenate(images[:16], 1))
    grid = np.concatenate(pictures, 0)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(
        out / f"binding-probe-g{guidance:g}.png"
    )


if __name__ == "__main__":
    a = sys.argv[1:]
    main(
        a[0],
        int(a[1]),
        float(a[2]) if len(a) > 2 else 3.0,
        int(a[3]) if len(a) > 3 else 25,
        Path(a[4]) if len(a) > 4 else Path("."),
    )
