"""``recompose ensemble`` / ``python -m jobs.ensemble``: join expert denoisers (eDiffi) into one
pipeline directory that ``generate``, ``serve``, ``evaluate`` and ``cascade`` load as any model.

    recompose ensemble --expert MODEL[=LO:HI] --expert MODEL[=LO:HI] … --output DIR [--json]

Each MODEL is a training run directory (its export), a pipeline directory or a ``models:/`` URI.
An expert trained with ``recompose train --expert-of RUN --noise-range LO:HI`` knows its range; one
model trained on every timestep (e.g. the run the experts came from) takes the range the others
leave. The ranges must cover the noise schedule's timesteps exactly once; each sampling step runs
the expert of its timestep. See docs/training.md, "Experts".
"""

from __future__ import annotations

import argparse
from typing import Any

from jobs._runner import add_common_arguments, run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recompose ensemble", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--expert",
        action="append",
        required=True,
        metavar="MODEL[=LO:HI]",
        help="an expert: a training run directory, a pipeline directory or a models:/ URI, with its "
        "timesteps [LO, HI) unless its export records them; repeat for each expert",
    )
    p.add_argument("--output", required=True, help="the ensemble directory to write (must not exist)")
    add_common_arguments(p, json_help="print ensemble.json on stdout")
    return p


def ensemble(args: argparse.Namespace) -> dict[str, Any]:
    import logging

    from pipelines.diffusion.ensemble import assemble, describe, parse_expert, run_export
    from pipelines.diffusion.loading import pipeline_dir

    parsed = [parse_expert(e) for e in args.expert]
    models = [m for m, _ in parsed]
    index = assemble(models, [r for _, r in parsed], args.output, lambda m: pipeline_dir(run_export(m)))
    logging.getLogger(__name__).info("wrote the ensemble %s: %s", args.output, describe(index))
    return index


def main(argv: list[str] | None = None) -> int:
    return run(parser(), ensemble, argv)


if __name__ == "__main__":
    raise SystemExit(main())
