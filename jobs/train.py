"""``recompose train`` / ``python -m jobs.train``: decomposition shards -> a trained pipeline.

    recompose train --data DIR --output RUN_DIR [--preset tiny|small|base] [--max-steps N]
        [--workers N] [--gpus-per-worker N] [--config FILE] [--set key=value …]

Runs on the Ray cluster in ``RAY_ADDRESS`` (as under ``ray job submit``) or a local Ray. Running
the same command again resumes RUN_DIR from its latest checkpoint, in the same MLflow run.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.config import ConfigError, add_config_arguments, load_config
from pipelines.data.batches import DataError
from pipelines.train.config import TrainConfig
from pipelines.train.run import run_train


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recompose train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a `recompose decompose` output directory")
    p.add_argument(
        "--output", required=True, help="RUN_DIR: checkpoints, samples/, export/ (its name names the run)"
    )
    p.add_argument("--preset", default=None, help="model size: tiny (CPU), small, medium, base (GPU cluster)")
    p.add_argument(
        "--max-steps", type=int, default=None, help="optimizer steps in all (a rerun trains on to it)"
    )
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default 2)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="0: CPU workers with gloo (default)")
    add_config_arguments(p, "configs/train-*.yaml", "optim.lr=3e-4")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    values = {
        "data": args.data,
        "output": args.output,
        "model.preset": args.preset,
        "max_steps": args.max_steps,
        "workers": args.workers,
        "gpus_per_worker": args.gpus_per_worker,
    }
    try:
        cfg = load_config(TrainConfig, args.config, values, args.overrides)
        summary = run_train(cfg)
    except (ConfigError, DataError) as e:
        print(f"recompose train: error: {e}", file=sys.stderr)
        return 2
    print(
        f"[train] done: {summary['steps']} steps; pipeline {summary['export']}"
        + (
            f" = models:/{summary['registered_model']}/{summary['model_version']}"
            if summary["model_version"]
            else ""
        ),
        file=sys.stderr,
    )
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
