"""``recompose decompose`` / ``python -m jobs.decompose``: image dataset → condition shards.

    recompose decompose --input SRC --output DIR [--format auto|folder|webdataset|parquet]
        [--conditions a,b,…] [--resolution N] [--config FILE] [--set key=value …]

Runs on the Ray cluster in ``RAY_ADDRESS`` (as under ``ray job submit``) or a local Ray.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.config import ConfigError, add_config_arguments, load_config
from pipelines.data.sources import SourceError
from pipelines.decompose.config import DecomposeConfig
from pipelines.decompose.job import run_decompose


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recompose decompose", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="image folder, webdataset tar(s) or parquet file(s)")
    p.add_argument(
        "--output", required=True, help="output directory (shards/, errors.parquet, manifest.json)"
    )
    p.add_argument("--format", choices=["auto", "folder", "webdataset", "parquet"], default=None)
    p.add_argument("--conditions", default=None, help="comma-separated; default: every available one")
    p.add_argument("--resolution", type=int, default=None, help="stored side length (default 64)")
    add_config_arguments(p, "configs/", "sketch.method=canny")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    values = {
        "input": args.input,
        "output": args.output,
        "format": args.format,
        "conditions": args.conditions,
        "resolution": args.resolution,
    }
    try:
        cfg = load_config(DecomposeConfig, args.config, values, args.overrides)
        summary = run_decompose(cfg)
    except (ConfigError, SourceError, ValueError) as e:
        print(f"recompose decompose: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
