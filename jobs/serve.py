"""``recompose serve`` / ``python -m jobs.serve``: the Ray Serve app for a trained pipeline.

    recompose serve --model DIR_OR_MLFLOW_URI [--host 127.0.0.1] [--port 8000] [--config FILE]
        [--set key=value …]

Starts (or joins, with RAY_ADDRESS) a Ray cluster, deploys the ingress and model deployments
(``pipelines/serve_app.py``) and serves until Ctrl-C; see README.md, "Serve".
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from pipelines.config import ConfigError, add_config_arguments, load_config
from pipelines.serve_config import ServeConfig


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recompose serve", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default=None,
        help="a saved ComposerPipeline directory (e.g. RUN_DIR/export) or models:/<name>/<version> "
        "(MLFLOW_TRACKING_URI)",
    )
    p.add_argument("--host", default=None, help="HTTP address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    add_config_arguments(p, "configs/serve-*.yaml", "batching.max_batch_size=16")
    p.add_argument("--no-block", action="store_true", help="deploy and return (the app keeps running)")
    return p


def say(msg: str) -> None:
    print(f"[serve] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    values = {"model": args.model, "host": args.host, "port": args.port}
    try:
        cfg = load_config(ServeConfig, args.config, values, args.overrides)
    except ConfigError as e:
        print(f"recompose serve: error: {e}", file=sys.stderr)
        return 2
    from pipelines.generate import GenerateError, pipeline_dir

    try:  # a bad model is the user's error: say so here, not in a replica's log
        say(f"checking the model {cfg.model}")
        pipeline_dir(cfg.model)  # the replicas load the weights; the driver only checks the directory
    except GenerateError as e:
        print(f"recompose serve: error: {e}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from pipelines.serve_app import build_app

    address = os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():  # a caller (recompose quickstart) may have started it already
        say(f"starting Ray ({'joining ' + address if address else 'local'})")
        ray.init(address=address or None, logging_level="WARNING", log_to_driver=False)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    say(
        f"deploying {cfg.name}: model x{cfg.model_deployment.num_replicas} "
        f"({cfg.model_deployment.num_cpus} CPU, {cfg.model_deployment.num_gpus} GPU), "
        f"batching {'on' if cfg.batching.enabled else 'off'}"
    )
    t = time.perf_counter()
    serve.run(build_app(cfg), name=cfg.name, route_prefix=cfg.route_prefix)
    base = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/"
    say(f"ready in {time.perf_counter() - t:.1f}s")
    say(f"web page   {base}")
    say(f"API docs   {base}docs   (OpenAPI: {base}openapi.json)")
    say(
        f"endpoints  POST {base}v1/generate, {base}v1/edit, {base}v1/decompose; GET {base}v1/model, {base}healthz"
    )
    if args.no_block:
        return 0
    say("serving; Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("stopping")
        serve.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
