"""Training ablations of the embedded default: which settings learn every condition in fewest steps.

    python benchmarks/ablation.py --data runs/decomposed --workdir runs/ablation --steps 1000 \\
        --variant vpred='{"model": {"prediction": "v_prediction"}, "optim": {"loss_weighting": "min_snr"}}' \\
        --variant lr1e-3='{"optim": {"lr": 1e-3}}'

Not a speed benchmark: each variant is ``configs/train-laptop.yaml`` (``--base``) with its JSON
merged in, trained by the project's own job (``python -m jobs.train``, Ray Train, the same
workers and data loader as a user's run) for ``--steps`` steps, then evaluated by ``python -m
jobs.evaluate`` on the first ``--rows`` rows (the quality bar's ratios and the compositional
benchmark). The base config itself always runs first as ``laptop``, in the same invocation, so
every variant is compared with it on the same machine and load. A variant whose evaluation is
already in WORKDIR is read back, not rerun (``--rerun`` forces it). Prints one JSON line per
variant and a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = (  # (header, metric key in evaluate.json's metrics, kind)
    ("palette χ²", "palette", "ratio"),
    ("sketch F1", "sketch", "ratio"),
    ("instances mIoU", "instances", "ratio"),
    ("depth RMSE", "depth", "ratio"),
    ("intensity SSIM", "intensity", "ratio"),
    ("seen colour", "caption/seen/colour", "value"),
    ("seen shape", "caption/seen/shape", "value"),
    ("held-out colour", "caption/heldout/colour", "value"),
    ("held-out shape", "caption/heldout/shape", "value"),
)


def flat_sets(variant: dict[str, Any], prefix: str = "") -> list[str]:
    """{"optim": {"lr": 1e-3}} -> ["optim.lr=0.001"]; lists and leaf dicts (overrides) as JSON."""
    out = []
    for k, v in variant.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k not in ("overrides", "per_condition"):
            out += flat_sets(v, key + ".")
        else:
            out.append(f"{key}={json.dumps(v)}")
    return out


def run(cmd: list[str], log: Path) -> None:
    with log.open("a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc:
        raise SystemExit(f"{cmd[2]} failed (exit {rc}); see {log}")


def summary(evaluation: dict[str, Any]) -> dict[str, Any]:
    """The quality bar's ratios and the benchmark's per-object accuracies of one evaluate.json."""
    ratios = {r["condition"]: r["ratio"] for r in evaluation["quality_bar"] if r.get("ratio") is not None}
    mask = [r["value"] for r in evaluation["quality_bar"] if r["metric"] == "mask.max_abs_diff"]
    out: dict[str, Any] = {}
    for _, key, kind in COLUMNS:
        out[key] = ratios.get(key) if kind == "ratio" else evaluation["metrics"].get(key)
    out["mask max |Δ|"] = max(mask) if mask else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a `recompose decompose` output of the synthetic set")
    p.add_argument("--workdir", required=True, help="one RUN_DIR and evaluation per variant")
    p.add_argument("--base", default=str(ROOT / "configs/train-laptop.yaml"))
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--rows", type=int, default=32, help="evaluation rows (and benchmark captions per side)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=JSON")
    p.add_argument("--only", action="append", default=[], help="run only these variant names")
    p.add_argument("--rerun", action="store_true")
    args = p.parse_args()
    variants: dict[str, dict[str, Any]] = {"laptop": {}}
    for item in args.variant:
        name, _, text = item.partition("=")
        variants[name] = json.loads(text)
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    os.environ.update(env)
    py = sys.executable
    rows = []
    for name, variant in variants.items():
        if args.only and name not in args.only:
            continue
        run_dir, eval_dir, log = work / name, work / f"{name}-eval", work / f"{name}.log"
        result_path = eval_dir / "evaluate.json"
        if args.rerun or not result_path.is_file():
            sets = flat_sets(variant) + ["mlflow.sample_every=0", "checkpoint_every=100000"]
            t0 = time.perf_counter()
            cmd = [py, "-m", "jobs.train", "--data", args.data, "--output", str(run_dir)]
            cmd += ["--config", args.base, "--max-steps", str(args.steps), "-q"]
            run(cmd + [a for s in sets for a in ("--set", s)], log)
            train_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            cmd = [py, "-m", "jobs.evaluate", "--model", str(run_dir / "export"), "--data", args.data]
            cmd += ["--output", str(eval_dir), "--set", f"num_samples={args.rows}", "-q"]
            run(cmd, log)
            (work / f"{name}.json").write_text(
                json.dumps({"train_s": train_s, "eval_s": time.perf_counter() - t0, "variant": variant})
            )
        meta = json.loads((work / f"{name}.json").read_text())
        row = {"name": name, "steps": args.steps, **meta, **summary(json.loads(result_path.read_text()))}
        print(json.dumps(row), flush=True)
        rows.append(row)
    head = ["variant", "min train"] + [c[0] for c in COLUMNS] + ["mask max |Δ|"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [r["name"], f"{r['train_s'] / 60:.1f}"]
        for _, key, kind in COLUMNS:
            v = r[key]
            cells.append("–" if v is None else (f"{v:.2f}×" if kind == "ratio" else f"{v:.2f}"))
        cells.append("–" if r["mask max |Δ|"] is None else f"{r['mask max |Δ|']:g}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
