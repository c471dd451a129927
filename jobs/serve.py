"""``recompose serve`` / ``python -m jobs.serve``: the Ray Serve app for a trained pipeline.

    recompose serve [--model DIR_OR_MLFLOW_URI] [--host H] [--port N] [--allow-unauthenticated]
        [--detach] [--config FILE] [--set key=value …]

Starts (or joins, with RAY_ADDRESS) a Ray cluster, deploys the ingress and model deployments
(``pipelines/serve/app.py``) and serves until Ctrl-C; see docs/serving.md.
"""

from __future__ import annotations

import argparse

from jobs._runner import add_common_arguments, run
from pipelines.config import add_config_arguments, load_config
from pipelines.serve import launch
from pipelines.serve.config import ServeConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recompose serve", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default=None,
        help="a saved ComposerPipeline directory (e.g. RUN_DIR/export), a cascade directory "
        "(recompose cascade) or models:/<name>/<version> (MLFLOW_TRACKING_URI); default: "
        "recompose:reference, the reference model shipped with recompose",
    )
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="a cascade: the output side, how far it runs (default its last stage; config: resolution)",
    )
    p.add_argument("--host", default=None, help="HTTP address (config: host)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (config: port)")
    p.add_argument(
        "--allow-unauthenticated",
        action="store_const",
        const=True,
        default=None,
        help="serve on a non-loopback --host without auth.token_env (refused otherwise; "
        "config: allow_unauthenticated)",
    )
    add_config_arguments(p, "configs/serve-*.yaml", "batching.max_batch_size=16")
    p.add_argument(
        "--detach", action="store_true", help="deploy and return; the app keeps running on the cluster"
    )
    add_common_arguments(p, json_help="print the app's URL and model as JSON on stdout once deployed")
    return p


def serve(args: argparse.Namespace) -> dict[str, str]:
    values = {
        "model": args.model,
        "host": args.host,
        "port": args.port,
        "allow_unauthenticated": args.allow_unauthenticated,
        "resolution": args.resolution,
    }
    cfg = load_config(ServeConfig, args.config, values, args.overrides)
    url = launch.deploy(cfg)
    if not args.detach:
        launch.block()
    return {"url": url, "model": cfg.model}


def main(argv: list[str] | None = None) -> int:
    return run(parser(), serve, argv)


if __name__ == "__main__":
    raise SystemExit(main())
