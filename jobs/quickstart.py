"""``recompose quickstart`` / ``python -m jobs.quickstart``: the whole system end to end, on one machine.

    recompose quickstart [--workdir DIR] [--fast] [--port N] [--exit]

Generates the synthetic dataset, decomposes it, trains the tiny model (MLflow), evaluates it,
serves the export with Ray Serve on 127.0.0.1 and generates through its HTTP API, then writes
an HTML report; a rerun reuses the finished stages. See pipelines/quickstart/run.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recompose quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--workdir", default="runs/quickstart", help="where everything goes (default runs/quickstart)"
    )
    p.add_argument(
        "--fast", action="store_true", help="every stage in seconds: checks the wiring, learns nothing"
    )
    p.add_argument("--port", type=int, default=8000, help="the Serve HTTP port on 127.0.0.1 (default 8000)")
    p.add_argument(
        "--exit",
        action="store_true",
        help="exit after the report; by default an interactive run keeps serving the web page until Ctrl-C",
    )
    p.add_argument("--json", action="store_true", help="print where everything is as JSON on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pipelines.quickstart.run import Quickstart, QuickstartError

    keep = not (args.exit or args.fast) and sys.stdin.isatty()
    # Ray's own messages (raylet, Serve) go to file descriptor 1: keep stdout for the JSON alone.
    sys.stdout.flush()
    stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        where = Quickstart(args.workdir, fast=args.fast, port=args.port).run(keep_serving=keep)
    except (QuickstartError, ValueError, FileExistsError) as e:
        print(f"recompose quickstart: error: {e}", file=sys.stderr)
        return 2
    finally:
        if not keep:
            import ray

            ray.shutdown()  # no late Ray message after stdout is back
        sys.stdout.flush()
        os.dup2(stdout, 1)
        os.close(stdout)
    lines = [
        f"finished in {where['seconds']:.0f}s; everything is in {where['workdir']}",
        f"  report       {where['report']}",
        f"  model        {where['export']}" + (f"  ({where['model_uri']})" if where["model_uri"] else ""),
        f"  evaluation   {where['evaluation']}",
        f"  MLflow       {where['mlflow_ui']}   (then open http://127.0.0.1:5000)",
        f"  web page     {where['web_page']}"
        + ("" if keep else f"   (serve it again: recompose serve --model {where['export']})"),
    ]
    print("\n".join(f"[quickstart] {x}" for x in lines), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(where, indent=2))
    if keep:
        print("[quickstart] serving the web page; Ctrl-C stops", file=sys.stderr, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            from ray import serve

            serve.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
