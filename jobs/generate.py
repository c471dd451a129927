"""``recompose generate`` / ``python -m jobs.generate``: a trained pipeline + conditions -> images.

    recompose generate --model DIR --output DIR [--text …] [--palette '#ff0000,#00ff00']
        [--semantics-from IMG] [--sketch-from IMG] [--depth-from IMG] [--instances-from IMG]
        [--intensity-from IMG] [--mask IMG --source IMG] [--guidance …] [--steps N] [--seed S]
        [--num-images N]

A condition "from IMG" is decomposed with the extractors and settings of the training shards
(the pipeline's model_index.json ``decompose``); see README.md, "Generate".
"""

from __future__ import annotations

import argparse
import sys

from pipelines.conditions import ExtractorUnavailable
from pipelines.config import ConfigError
from pipelines.generate.run import GenerateError, GenerateRequest, run_generate


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recompose generate", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        required=True,
        help="a saved ComposerPipeline directory, or a registered model models:/<name>/<version> "
        "(or models:/<name>@<alias>, runs:/<run id>/<path>) from the MLflow tracking server in "
        "MLFLOW_TRACKING_URI",
    )
    p.add_argument(
        "--output", required=True, help="output directory (samples, conditions/, grid.png, generate.json)"
    )
    g = p.add_argument_group("conditions (any subset)")
    g.add_argument("--text", help="the caption")
    g.add_argument("--palette", help="hex colours, '#ff0000,#00ff00' (weights: '#ff0000:3,#00ff00:1')")
    for name in ("palette", "semantics", "sketch", "depth", "instances", "intensity"):
        g.add_argument(f"--{name}-from", metavar="IMG", help=f"decompose {name} from this image")
    for name in ("sketch", "depth", "instances", "intensity"):
        g.add_argument(
            f"--{name}-map", metavar="IMG", help=f"a ready {name} map (e.g. an edited conditions/{name}.png)"
        )
    g.add_argument("--mask", metavar="IMG", help="edit mask, white = regenerate (needs --source)")
    g.add_argument("--source", metavar="IMG", help="the image to edit (--mask) or invert (--bidirectional)")
    g.add_argument(
        "--bidirectional", action="store_true", help="invert --source under its own conditions first"
    )
    g.add_argument("--source-text", help="the source's caption for --bidirectional (default: --text)")
    s = p.add_argument_group("sampling")
    s.add_argument("--guidance", default="3", help="a scale, or per condition: 'text=5,sketch=2' (default 3)")
    s.add_argument(
        "--invert-guidance", default="1", help="guidance of the --bidirectional inversion (default 1)"
    )
    s.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    s.add_argument("--seed", type=int, default=0, help="same seed, same images (default 0)")
    s.add_argument("--num-images", type=int, default=1, help="samples to draw (default 1)")
    s.add_argument("--scheduler", choices=["ddim", "dpm++"], default="ddim")
    s.add_argument(
        "--threshold",
        choices=["clip", "dynamic", "none"],
        default=None,
        help="x_0 thresholding (default: clip in pixel space, none for latents and --bidirectional)",
    )
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--overwrite", action="store_true", help="replace a previous generation in --output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        record = run_generate(GenerateRequest(**vars(args)))
    except (GenerateError, ConfigError, ExtractorUnavailable, ValueError) as e:
        print(f"recompose generate: error: {e}", file=sys.stderr)
        return 2
    print(
        f"[generate] wrote {len(record['images'])} image(s) and grid.png to {args.output} "
        f"in {record['wall_time_s']:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
