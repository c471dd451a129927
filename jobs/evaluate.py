"""``recompose evaluate`` / ``python -m jobs.evaluate``: how well a trained pipeline recomposes.

    recompose evaluate [--model DIR_OR_MLFLOW_URI] --data DIR --output DIR [--num-samples N]
        [--config FILE] [--set key=value …] [--json]

Condition fidelity (each representation re-extracted from the generated images), the synthetic
compositional benchmark, FID/KID/CLIP score when their weights are given locally; floor
(unconditional) and ceiling (real images) in the same run. Generation runs on Ray actors (the
cluster in ``RAY_ADDRESS``, as under ``ray job submit``, or a local Ray). See docs/evaluation.md.
"""

from __future__ import annotations

import argparse

from jobs._runner import add_common_arguments, run
from pipelines.config import add_config_arguments, load_config
from pipelines.evaluate.config import EvalConfig
from pipelines.evaluate.report import EvalResult
from pipelines.evaluate.run import run_evaluate


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recompose evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default=None,
        help="a saved ComposerPipeline directory, or models:/<name>/<version> (also @alias, runs:/…) "
        "from the MLflow tracking server in MLFLOW_TRACKING_URI (default: recompose:reference, the "
        "reference model shipped with recompose)",
    )
    p.add_argument(
        "--data", required=True, help="a `recompose decompose` output (its --output): the evaluation rows"
    )
    p.add_argument("--output", required=True, help="directory for results.md, metrics.parquet, plots")
    p.add_argument("--num-samples", type=int, default=None, help="evaluation rows (config: num_samples)")
    add_config_arguments(p, "configs/evaluate-*.yaml", "guidance=5")
    add_common_arguments(p, json_help="print the summary (evaluate.json) as JSON on stdout")
    return p


def evaluate(args: argparse.Namespace) -> EvalResult:
    values = {"model": args.model, "data": args.data, "output": args.output, "num_samples": args.num_samples}
    cfg = load_config(EvalConfig, args.config, values, args.overrides)
    return run_evaluate(cfg)


def main(argv: list[str] | None = None) -> int:
    return run(parser(), evaluate, argv)


if __name__ == "__main__":
    raise SystemExit(main())
