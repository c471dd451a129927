"""``recompose evaluate`` / ``python -m jobs.evaluate``: how well a trained pipeline recomposes.

    recompose evaluate --model DIR_OR_MLFLOW_URI --data DIR --output DIR [--num-samples N]
        [--config FILE] [--set key=value …]

Condition fidelity (each representation re-extracted from the generated images), the synthetic
compositional benchmark, FID/KID/CLIP score when their weights are given locally; floor
(unconditional) and ceiling (real images) in the same run. Generation runs on Ray actors (the
cluster in ``RAY_ADDRESS``, as under ``ray job submit``, or a local Ray). See README, "Evaluate".
"""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.config import ConfigError, add_config_arguments, load_config
from pipelines.evaluate.config import EvalConfig
from pipelines.evaluate.run import EvalError, run_evaluate


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recompose evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        required=True,
        help="a saved ComposerPipeline directory, or models:/<name>/<version> (also @alias, runs:/…) "
        "from the MLflow tracking server in MLFLOW_TRACKING_URI",
    )
    p.add_argument("--data", required=True, help="a `recompose decompose` output: the evaluation rows")
    p.add_argument("--output", required=True, help="directory for results.md, metrics.parquet, plots")
    p.add_argument("--num-samples", type=int, default=None, help="evaluation rows (default 64)")
    add_config_arguments(p, "configs/evaluate-*.yaml", "guidance=5")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    values = {"model": args.model, "data": args.data, "output": args.output, "num_samples": args.num_samples}
    try:
        cfg = load_config(EvalConfig, args.config, values, args.overrides)
        summary = run_evaluate(cfg)
    except (ConfigError, EvalError) as e:
        print(f"recompose evaluate: error: {e}", file=sys.stderr)
        return 2
    for b in summary["quality_bar"]:
        verdict = "" if b["pass"] is None else ("  pass" if b["pass"] else "  FAIL")
        ratio = "" if b["ratio"] is None else f"  {b['ratio']:.2f}x the unconditional floor"
        print(
            f"[evaluate] {b['condition']:<22} {b['metric']:<18} {b['value']:.3f}{ratio}{verdict}",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
