"""``recompose decompose`` / ``python -m jobs.decompose``: image dataset → condition shards.

    recompose decompose --input SRC --output DIR [--format auto|folder|webdataset|parquet]
        [--conditions a,b,…] [--resolution N] [--base BASE] [--config FILE] [--set key=value …] [--json]

Runs on the Ray cluster in ``RAY_ADDRESS`` (as under ``ray job submit``) or a local Ray. Its output
directory is what ``recompose train`` and ``recompose evaluate`` read with ``--data``.
"""

from __future__ import annotations

import argparse

from jobs._runner import add_common_arguments, run
from pipelines.config import add_config_arguments, load_config
from pipelines.decompose.config import DecomposeConfig
from pipelines.decompose.job import DecomposeResult, run_decompose


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recompose decompose", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", help="image folder, webdataset tar(s) or parquet file(s) (config: input)")
    p.add_argument(
        "--output",
        help="output directory (shards/, errors.parquet, manifest.json); recompose train and evaluate "
        "read it with --data (config: output)",
    )
    p.add_argument("--format", choices=["auto", "folder", "webdataset", "parquet"], help="(config: format)")
    p.add_argument("--conditions", help="comma-separated; empty: every available one (config: conditions)")
    p.add_argument("--resolution", type=int, help="stored side length in pixels (config: resolution)")
    p.add_argument(
        "--base",
        help="a Stable Diffusion 1.x/2.x diffusers pipeline directory, or a repo id in the local Hugging "
        "Face cache: also store `latents` (its VAE's encoding; the resolution must be a multiple of the "
        "VAE's scale factor, 8 for SD) and the caption as its text encoder's embeddings, what "
        "`recompose train` on that base reads (config: base)",
    )
    add_config_arguments(p, "configs/decompose-*.yaml", "sketch.method=canny")
    add_common_arguments(p, json_help="print the summary as JSON on stdout")
    return p


def decompose(args: argparse.Namespace) -> DecomposeResult:
    keys = ("input", "output", "format", "conditions", "resolution", "base")
    cfg = load_config(DecomposeConfig, args.config, {k: getattr(args, k) for k in keys}, args.overrides)
    return run_decompose(cfg)


def main(argv: list[str] | None = None) -> int:
    return run(parser(), decompose, argv)


if __name__ == "__main__":
    raise SystemExit(main())
