"""``recompose reference`` / ``python -m jobs.reference``: pack a finished training run as the
reference model shipped with recompose, evaluate it and write its README.

    recompose reference --run RUN_DIR --data DIR [--synth DIR] [--output DIR] [--num-samples N] [--json]

The weights go in float16 when that is lossless enough, into ``pipelines/diffusion/reference``
(what every command uses without ``--model``) unless ``--output`` says otherwise; the README
beside them gives the commands that made them, the config hash, data seed, steps, time in
optimizer steps, machine and the evaluation table. See pipelines/reference/pack.py and docs/model.md.
"""

from __future__ import annotations

import argparse

from jobs._runner import add_common_arguments, run
from pipelines.reference.pack import ReferenceResult, pack


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recompose reference", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--run", required=True, help="a finished `recompose train` RUN_DIR (its export/ is packed)"
    )
    p.add_argument("--data", required=True, help="the `recompose decompose` output it was trained on")
    p.add_argument(
        "--synth", help="the `recompose synth` output DATA came from (its seed goes in the README)"
    )
    p.add_argument("--output", help="where to write it (default: pipelines/diffusion/reference)")
    p.add_argument("--num-samples", type=int, default=64, help="evaluation rows (default: 64)")
    add_common_arguments(p, json_help="print the summary (reference.json) as JSON on stdout")
    return p


def reference(args: argparse.Namespace) -> ReferenceResult:
    return pack(args.run, args.data, args.output, args.synth, args.num_samples)


def main(argv: list[str] | None = None) -> int:
    return run(parser(), reference, argv)


if __name__ == "__main__":
    raise SystemExit(main())
