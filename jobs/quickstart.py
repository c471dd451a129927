"""``recompose quickstart`` / ``python -m jobs.quickstart``: the whole system end to end, on one machine.

    recompose quickstart [--workdir DIR] [--fast] [--port N] [--detach] [--json]

Generates the synthetic dataset, decomposes it, trains the tiny model (MLflow), evaluates it,
serves the export with Ray Serve on 127.0.0.1 and generates through its HTTP API, then writes
an HTML report; a rerun reuses the finished stages. See pipelines/quickstart/run.py.
"""

from __future__ import annotations

import argparse
import sys

from jobs._runner import add_common_arguments, run
from pipelines.quickstart.results import Summary
from pipelines.quickstart.run import run_quickstart


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recompose quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--workdir", default="runs/quickstart", help="where everything goes (default: %(default)s)"
    )
    p.add_argument(
        "--fast", action="store_true", help="every stage in seconds: checks the wiring, learns nothing"
    )
    p.add_argument(
        "--port", type=int, default=8000, help="the Serve HTTP port on 127.0.0.1 (default: %(default)s)"
    )
    p.add_argument(
        "--detach",
        action="store_true",
        help="return once the report is written; otherwise a run from a terminal keeps serving the web "
        "page until Ctrl-C (a --fast run always returns)",
    )
    add_common_arguments(p, json_help="print where everything is as JSON on stdout")
    return p


def quickstart(args: argparse.Namespace) -> Summary:
    detach = args.detach or args.fast or not sys.stdin.isatty()
    return run_quickstart(args.workdir, fast=args.fast, port=args.port, detach=detach)


def main(argv: list[str] | None = None) -> int:
    return run(parser(), quickstart, argv)


if __name__ == "__main__":
    raise SystemExit(main())
