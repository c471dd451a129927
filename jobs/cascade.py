"""``recompose cascade`` / ``python -m jobs.cascade``: assemble Composer's cascade from trained
exports — a base model and upsamplers (each a ``recompose train`` export, a ``models:/`` URI or
the reference model) — into one directory that ``generate``, ``serve``, ``evaluate`` and
``upscale`` load.

    recompose cascade --base MODEL [--upsampler MODEL …] [--prior DIR] --output DIR [--json]

Each upsampler's input side must be the stage before it's output side (e.g. a 32 px base, a 32→64
upsampler); the chain is checked before anything is copied. See docs/generation.md, "The cascade".
"""

from __future__ import annotations

import argparse
from typing import Any

from jobs._runner import add_common_arguments, run
from pipelines.diffusion.loading import REFERENCE_MODEL


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recompose cascade", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--base",
        default=REFERENCE_MODEL,
        help=f"the base model: a pipeline directory, models:/ or runs:/ URI (default {REFERENCE_MODEL})",
    )
    p.add_argument(
        "--upsampler",
        action="append",
        default=[],
        help="an upsampler export (`recompose train --stage upsampler`); repeat for each stage, in order",
    )
    p.add_argument(
        "--prior",
        help="a prior export (`recompose train --stage prior`): caption -> the base's semantics embedding",
    )
    p.add_argument("--output", required=True, help="the cascade directory to write (must not exist)")
    add_common_arguments(p, json_help="print cascade.json on stdout")
    return p


def cascade(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    from pipelines.diffusion.cascade import CascadeError, assemble, describe
    from pipelines.diffusion.loading import model_path, pipeline_dir

    if not args.upsampler and args.prior is None:
        raise CascadeError("give at least one --upsampler or a --prior to join to the base")
    index = assemble(args.base, args.upsampler, args.output, pipeline_dir, args.prior, model_path)
    logging.getLogger(__name__).info("wrote the cascade %s: %s", args.output, describe(index))
    return index


def main(argv: list[str] | None = None) -> int:
    return run(parser(), cascade, argv)


if __name__ == "__main__":
    raise SystemExit(main())
