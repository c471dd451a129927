"""``recompose synth`` / ``python -m jobs.synth``: the built-in synthetic shapes dataset.

    recompose synth --output DIR [--count N] [--resolution N] [--seed N] [--split train|heldout]
        [--config FILE] [--set key=value …] [--json]

Writes images, captions and instance and depth ground truth as parquet shards (format:
``pipelines/data/synth.py``); ``recompose decompose`` reads the directory with ``--input``.
"""

from __future__ import annotations

import argparse
import typing

from jobs._runner import add_common_arguments, run
from pipelines.config import add_config_arguments, load_config
from pipelines.data.scene import Split
from pipelines.data.synth import SynthConfig, SynthResult, run_synth


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recompose synth", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--output",
        help="output directory, new, empty or a previous run's; recompose decompose reads it with "
        "--input (config: output)",
    )
    p.add_argument("--count", type=int, help="number of samples (config: count)")
    p.add_argument("--resolution", type=int, help="image side in pixels (config: resolution)")
    p.add_argument("--seed", type=int, help="dataset seed (config: seed)")
    p.add_argument("--split", choices=typing.get_args(Split), help="(config: split)")
    add_config_arguments(p, "SynthConfig in pipelines/data/synth.py for its keys", "rows_per_file=500")
    add_common_arguments(p, json_help="print the summary as JSON on stdout")
    return p


def synth(args: argparse.Namespace) -> SynthResult:
    values = {k: getattr(args, k) for k in ("output", "count", "resolution", "seed", "split")}
    return run_synth(load_config(SynthConfig, args.config, values, args.overrides))


def main(argv: list[str] | None = None) -> int:
    return run(parser(), synth, argv)


if __name__ == "__main__":
    raise SystemExit(main())
