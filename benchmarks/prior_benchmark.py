"""Does the prior help a caption alone? The compositional benchmark with and without it.

    python benchmarks/prior_benchmark.py --cascade DIR [--count 64] [--steps 25] [--guidance 5]
        [--prior-guidance 4] [--prior-steps 50] [--figure PNG]

The cascade's base model generates ``--count`` captions per side (seen pairs, held-out pairs:
``recompose evaluate``'s benchmark captions, seed 1000003) in four ways, each read back by the
scene parser (colour and shape accuracy per caption object, as ``evaluate`` reports them):

  caption          the caption alone (evaluate's caption-only benchmark)
  caption+prior    the caption, and the semantics the cascade's prior samples from it
  caption+truth    the caption, and the semantics of the scene's own render (the ceiling of
                   the semantics path: what a perfect prior could give)
  none             nothing (the unconditional floor)

Guidance ``--guidance`` over every given condition. Prints one JSON object on stdout;
``--figure`` writes render | caption | caption+prior | caption+truth rows.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.data.decomposer import ImageDecomposer  # noqa: E402
from pipelines.data.scene import render_sample  # noqa: E402
from pipelines.diffusion.loading import load_cascade  # noqa: E402
from pipelines.diffusion.requests import SampleRequest  # noqa: E402
from pipelines.evaluate.scene_parser import parse_scene, score  # noqa: E402

SEED = 1_000_003  # pipelines/evaluate/config.py BenchmarkConfig.seed
log = logging.getLogger("prior_benchmark")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--cascade", required=True, help="a cascade directory with a prior (recompose cascade --prior)"
    )
    p.add_argument("--count", type=int, default=64, help="captions per side")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--prior-guidance", type=float, default=4.0)
    p.add_argument("--prior-steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--figure")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[prior_benchmark] %(message)s", stream=sys.stderr)

    cascade = load_cascade(args.cascade, "cpu")
    if cascade.prior is None:
        raise SystemExit(f"{args.cascade}: no prior in this cascade (recompose cascade --prior)")
    base = cascade.base
    base.set_progress_bar_config(disable=True)
    side = base.image_size
    dec = ImageDecomposer.for_pipeline(base)
    result: dict = {"cascade": args.cascade, "side": side, "count": args.count, "guidance": args.guidance}
    shown: list[list[tuple[str, np.ndarray]]] = []
    for label, split in (("seen", "train"), ("heldout", "heldout")):
        scenes = [render_sample(SEED, split, i, side) for i in range(args.count)]
        texts = [s.caption for s in scenes]
        sampled = [
            cascade.sample_semantics(dec, t, args.prior_guidance, args.prior_steps, i)
            for i, t in enumerate(texts)
        ]
        ways = {
            "caption": [dec.caption(t) for t in texts],
            "caption+prior": [
                {**dec.caption(t), "semantics": s} for t, s in zip(texts, sampled, strict=True)
            ],
            "caption+truth": [
                {**dec.caption(t), **dec.decompose(sc.image, ["semantics"])}
                for t, sc in zip(texts, scenes, strict=True)
            ],
            "none": [{} for _ in texts],
        }
        images: dict[str, list[np.ndarray]] = {}
        for way, conds in ways.items():
            log.info("%s: %s, %d captions", label, way, len(conds))
            out = []
            for start in range(0, len(conds), args.batch):
                chunk = conds[start : start + args.batch]
                reqs = [
                    SampleRequest(c, guidance=args.guidance if c else 1.0, seed=start + j)
                    for j, c in enumerate(chunk)
                ]
                out += [r.images[0] for r in base.sample_batch(reqs, args.steps)]
            images[way] = out
            scores = [score(parse_scene(im), t) for im, t in zip(out, texts, strict=True)]
            result[f"{label}/{way}"] = {
                "colour": round(float(np.mean([s["colour"] for s in scores])), 4),
                "shape": round(float(np.mean([s["shape"] for s in scores])), 4),
            }
        for i in range(min(3, args.count)):
            shown.append(
                [("render", scenes[i].image)]
                + [(w, images[w][i]) for w in ("caption", "caption+prior", "caption+truth")]
            )
    if args.figure:
        from pipelines.diffusion.pictures import layout
        from pipelines.files import encode_png, write_bytes

        write_bytes(encode_png(layout(shown, 96)), args.figure)
        result["figure"] = args.figure
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
