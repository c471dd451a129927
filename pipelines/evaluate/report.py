"""The evaluation's outputs: the table (Parquet + Markdown), the plots and the MLflow run.

``OUTPUT/`` after ``recompose evaluate``:

- ``metrics.parquet``: one row per (group, subset, metric): mean, std, n, direction, the floor
  (subset ``none``) and ratio to it; groups ``fidelity``, ``benchmark``, ``quality``.
- ``per_image.parquet``: every re-extraction metric of every generated image.
- ``results.md``: the same as tables, with the quality bar checked and the settings.
- ``fidelity.png`` (per-condition bars), ``benchmark.png`` (seen vs held-out accuracy),
  ``examples.png`` (condition -> generation grid), ``evaluate.json`` (summary).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

# The headline metric of each representation, its direction, and the quality bar:
# the ratio of its own subset to the unconditional floor ("Evaluate", quality bar).
HEADLINE: dict[str, tuple[str, str, float | None]] = {
    "palette": ("palette.chi2", "lower", 0.5),
    "sketch": ("sketch.f1", "higher", 2.0),
    "instances": ("instances.miou", "higher", 2.0),
    "depth": ("depth.rmse_ssi", "lower", 0.7),
    "intensity": ("intensity.ssim", "higher", None),
}
DIRECTION = {
    "palette.chi2": "lower",
    "palette.intersection": "higher",
    "sketch.precision": "higher",
    "sketch.recall": "higher",
    "sketch.f1": "higher",
    "sketch.ssim": "higher",
    "instances.miou": "higher",
    "depth.rmse_ssi": "lower",
    "intensity.ssim": "higher",
    "intensity.psnr": "higher",
    "mask.max_abs_diff": "lower",
}
PSNR_CAP = 100.0  # dB: identical maps have infinite PSNR; capped so means stay finite
BENCH_METRICS = ("count", "colour", "shape", "relation", "pairs", "all")


# -- aggregation ----------------------------------------------------------------------------------
def _per_image(results: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for res in results:
        if res["name"].startswith("bench"):
            continue
        for i, rec in zip(res["rows"], res["records"], strict=True):
            d = {"subset": res["name"], "row": i, "key": rows[i]["key"]}
            for k, v in rec.items():
                d[k] = min(v, PSNR_CAP) if k == "intensity.psnr" else v
            out.append(d)
    return out


def _stats(values: list[float]) -> tuple[float, float, int]:
    a = np.asarray([v for v in values if v is not None and not math.isnan(v)], np.float64)
    if not len(a):
        return float("nan"), float("nan"), 0
    return float(a.mean()), float(a.std()), int(len(a))


def fidelity_table(per_image: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    """Mean/std/n of every metric per subset, with the ``none`` floor and the ratio to it."""
    metrics = sorted({k for d in per_image for k in d if k in DIRECTION})
    out = []
    floor = {}
    for subset in order:
        recs = [d for d in per_image if d["subset"] == subset]
        for m in metrics:
            mean, std, n = _stats([d.get(m) for d in recs])
            if not n:
                continue
            if subset == "none":
                floor[m] = mean
            out.append(
                {
                    "group": "fidelity",
                    "subset": subset,
                    "metric": m,
                    "direction": DIRECTION[m],
                    "value": mean,
                    "std": std,
                    "n": n,
                }
            )
    for r in out:
        f = floor.get(r["metric"])
        r["floor"] = f
        r["ratio_to_floor"] = r["value"] / f if f not in (None, 0) and not math.isnan(f) else None
    return out


def benchmark_table(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Scene-parser accuracies: caption-only, unconditional (floor) and renders (ceiling), by side."""
    from pipelines.evaluate.scene_parser import summarize

    groups: dict[str, list[dict[str, Any]]] = {}
    for res in results:
        if res["name"].startswith("bench"):
            groups.setdefault(res["name"], []).extend(r["bench"] for r in res["records"])
    out = []
    for name in sorted(groups):
        kind, side = name.split("/")
        s = summarize(groups[name])
        source = {"bench": "caption", "bench-none": "none", "bench-real": "real"}[kind]
        for m in BENCH_METRICS:
            out.append(
                {
                    "group": "benchmark",
                    "subset": f"{source}/{side}",
                    "metric": m,
                    "direction": "higher",
                    "value": float(s[m]),
                    "std": None,
                    "n": int(s["n_images"]),
                }
            )
    return out


def quality_table(quality: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for subset, entry in quality.items():
        for m, d in (("fid", "lower"), ("kid_mean", "lower"), ("clip_score", "higher")):
            if m in entry:
                n = entry.get("n_fake", entry.get("n"))
                out.append(
                    {
                        "group": "quality",
                        "subset": subset,
                        "metric": m,
                        "direction": d,
                        "value": float(entry[m]),
                        "std": entry.get("kid_std") if m == "kid_mean" else None,
                        "n": n,
                    }
                )
    return out


def quality_bar(table: list[dict[str, Any]], subsets: dict[str, tuple[str, ...]]) -> list[dict[str, Any]]:
    """The issue's targets: each local condition's own subset against the floor; masks exact."""
    val = {(r["subset"], r["metric"]): r for r in table if r["group"] == "fidelity"}
    out = []
    for name, (metric, direction, target) in HEADLINE.items():
        r, f = val.get((name, metric)), val.get(("none", metric))
        if r is None or f is None:
            continue
        ratio = r["ratio_to_floor"]
        ok = None
        if target is not None and ratio is not None:
            ok = ratio >= target if direction == "higher" else ratio <= target
        out.append(
            {
                "condition": name,
                "metric": metric,
                "value": r["value"],
                "floor": f["value"],
                "ceiling": val.get(("real", metric), {}).get("value"),
                "ratio": ratio,
                "target": None
                if target is None
                else ("≥ " if direction == "higher" else "≤ ") + f"{target}×",
                "pass": ok,
            }
        )
    for subset, conds in subsets.items():
        r = val.get((subset, "mask.max_abs_diff"))
        if "mask" in conds and r is not None:
            out.append(
                {
                    "condition": f"mask ({subset})",
                    "metric": "mask.max_abs_diff",
                    "value": r["value"],
                    "floor": None,
                    "ceiling": None,
                    "ratio": None,
                    "target": "= 0",
                    "pass": r["value"] == 0 and r["n"] > 0,
                }
            )
    return out


# -- writing --------------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(
    summary: dict[str, Any],
    table: list[dict[str, Any]],
    bar: list[dict[str, Any]],
    order: list[str],
    quality: dict[str, Any],
) -> str:
    cfg = summary["config"]
    val = {(r["group"], r["subset"], r["metric"]): r["value"] for r in table}
    cols = [m for m in DIRECTION if any(r["metric"] == m for r in table if r["group"] == "fidelity")]
    parts = [
        "# Evaluation",
        "",
        f"- model: `{summary['model']}`; data: `{summary['data']}` ({summary['num_rows']} rows, "
        f"manifest {summary['manifest_hash']})",
        f"- seeds {cfg['seed']}..{cfg['seed'] + summary['num_rows'] - 1} (row i: seed + i in every subset); "
        f"{cfg['steps']} DDIM steps; guidance {cfg['guidance']}; evaluation hash {summary['config_hash']}",
        "- re-extraction: "
        + ", ".join(f"{k} = {v}" for k, v in summary["reextract"].items())
        + " (scene: the synthetic scene parser re-renders what it reads)",
        "- `none`: every condition dropped (the floor); `real`: the real image re-extracted the same way "
        "(the ceiling). Ratios are to `none`.",
        "",
        "## Condition fidelity (mean over images)",
        "",
        _md_table(["subset", *cols], [[s, *[val.get(("fidelity", s, m)) for m in cols]] for s in order]),
        "",
        "## Quality bar",
        "",
        _md_table(
            ["condition", "metric", "value", "floor (none)", "ceiling (real)", "ratio", "target", "pass"],
            [
                [
                    b["condition"],
                    b["metric"],
                    b["value"],
                    b["floor"],
                    b["ceiling"],
                    b["ratio"],
                    b["target"],
                    b["pass"],
                ]
                for b in bar
            ],
        ),
    ]
    bench = [r for r in table if r["group"] == "benchmark"]
    if bench:
        names = sorted({r["subset"] for r in bench}, key=lambda s: (s.split("/")[1] != "seen", s))
        n = {r["subset"]: r["n"] for r in bench}
        parts += [
            "",
            "## Synthetic compositional benchmark (scene parser; caption only, guidance "
            f"{cfg['benchmark']['guidance']})",
            "",
            _md_table(
                ["source/side", "images", *BENCH_METRICS],
                [[s, n[s], *[val.get(("benchmark", s, m)) for m in BENCH_METRICS]] for s in names],
            ),
            "",
            "seen: only (colour, shape) pairs seen in training; heldout: at least one held-out pair. "
            "caption: generated from the caption alone; none: unconditional (floor); real: the generator's "
            "own render (the parser's ceiling).",
        ]
    parts += ["", "## FID / KID / CLIP score", ""]
    if quality:
        rows = []
        for s, e in quality.items():
            rows.append(
                [
                    s,
                    e.get("fid"),
                    e.get("kid_mean"),
                    e.get("kid_std"),
                    e.get("clip_score"),
                    e.get("n_fake", e.get("n")),
                ]
            )
        parts.append(_md_table(["images", "FID", "KID", "KID std", "CLIP score", "n"], rows))
        proto = {
            k: v
            for e in quality.values()
            for k, v in e.items()
            if k
            in ("inception_resize", "inception", "clip_variant", "clip_resize", "kid_subset_size", "n_real")
        }
        parts += [
            "",
            "Protocol: captions of the evaluation rows -> images -> FID/KID against the real images "
            "of those rows (zero-shot COCO protocol); " + "; ".join(f"{k}: {v}" for k, v in proto.items()),
        ]
    else:
        why: dict[str, list[str]] = {}
        for k, v in (summary.get("quality_unavailable") or {}).items():
            why.setdefault(v, []).append(k)  # FID and KID share one reason
        parts.append(
            "Not computed: "
            + ("; ".join(f"{'/'.join(ks)}: {v}" for v, ks in why.items()) or "no caption subset")
        )
    if summary.get("skipped"):
        parts += ["", "## Skipped", ""] + [f"- {k}: {v}" for k, v in summary["skipped"].items()]
    return "\n".join(parts) + "\n"


def _plot_fidelity(path: Path, table: list[dict[str, Any]], subsets: dict[str, tuple[str, ...]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val = {(r["subset"], r["metric"]): r["value"] for r in table if r["group"] == "fidelity"}
    panels = [(n, m) for n, (m, _, _) in HEADLINE.items() if ("none", m) in val]
    if any(r["metric"] == "mask.max_abs_diff" for r in table):
        panels.append(("mask", "mask.max_abs_diff"))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(3.2 * max(1, len(panels)), 3.4), squeeze=False)
    for ax, (name, metric) in zip(axes[0], panels, strict=False):
        own = [s for s, c in subsets.items() if name in c]
        names = ["none", *own[:3], "real"]
        names = [s for s in dict.fromkeys(names) if (s, metric) in val]
        colours = ["#999999" if s == "none" else "#2b8cbe" if s == "real" else "#e34a33" for s in names]
        ys = [val[(s, metric)] for s in names]
        ax.bar(range(len(names)), ys, color=colours)
        for x, y in enumerate(ys):
            ax.annotate(f"{y:.3g}", (x, y), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{metric} ({DIRECTION[metric]} is better)", fontsize=8)
    fig.suptitle(
        "condition fidelity: grey = unconditional floor, red = generated, blue = real ceiling", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_benchmark(path: Path, table: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val = {(r["subset"], r["metric"]): r["value"] for r in table if r["group"] == "benchmark"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    x = np.arange(len(BENCH_METRICS))
    for ax, side in zip(axes, ("seen", "heldout"), strict=True):
        for k, (source, colour) in enumerate(
            (("none", "#999999"), ("caption", "#e34a33"), ("real", "#2b8cbe"))
        ):
            ys = [val.get((f"{source}/{side}", m), np.nan) for m in BENCH_METRICS]
            ax.bar(x + (k - 1) * 0.27, ys, 0.27, label=source, color=colour)
        ax.set_xticks(x, BENCH_METRICS)
        ax.set_ylim(0, 1.2)  # headroom for the legend
        ax.set_title(f"{side} (colour, shape) pairs")
    axes[0].legend(fontsize=8, ncol=3, loc="upper center")
    axes[0].set_ylabel("accuracy (scene parser)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _examples(
    path: Path,
    rows: list[dict[str, Any]],
    images: dict[str, np.ndarray],
    subsets: dict[str, tuple[str, ...]],
    n: int,
) -> None:
    from PIL import Image

    from pipelines.diffusion.pictures import condition_pictures, layout, text_tile

    size = 96
    grid = []
    for i in range(min(n, len(rows))):
        r = rows[i]
        line = [("real", r["image"]), ("caption", text_tile(r["text"], size))]
        for name in ("none", *subsets):
            if name not in images:
                continue
            conds = subsets.get(name, ())
            if len(conds) == 1 and conds[0] in r["given"]:
                pics = condition_pictures({conds[0]: r["given"][conds[0]]}, None, None, {})
                line.append((f"{name} given", pics[conds[0]]))
            elif "mask" in conds:
                shown = r["image"].copy()
                shown[r["mask"].astype(bool)] = 128
                line.append((f"{name} given", shown))
            line.append((f"{name} ->", images[name][i]))
        grid.append(line)
    Image.fromarray(layout(grid, size)).save(path)


def write_report(
    out: Path,
    summary: dict[str, Any],
    rows: list[dict[str, Any]],
    results: list[dict[str, Any]],
    images: dict[str, np.ndarray],
    quality: dict[str, Any],
    cfg: Any,
) -> dict[str, Any]:
    """Write every output file (module docstring); returns the headline numbers for the summary."""
    import pyarrow as pa

    from pipelines.data.shards import write_parquet
    from pipelines.files import write_bytes

    subsets = {k: v for k, v in cfg.subsets.items() if k not in summary["skipped"]}
    order = ["none", *subsets, "real"]
    per_image = _per_image(results, rows)
    table = fidelity_table(per_image, order) + benchmark_table(results) + quality_table(quality)
    bar = quality_bar(table, subsets)
    cols = ["group", "subset", "metric", "direction", "value", "std", "n", "floor", "ratio_to_floor"]
    write_parquet(pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in table]), out / "metrics.parquet")
    write_parquet(pa.Table.from_pylist(per_image), out / "per_image.parquet")
    write_bytes(markdown(summary, table, bar, order, quality).encode(), out / "results.md")
    _plot_fidelity(out / "fidelity.png", table, subsets)
    plots = ["fidelity.png", "examples.png"]
    if any(r["group"] == "benchmark" for r in table):
        _plot_benchmark(out / "benchmark.png", table)
        plots.insert(1, "benchmark.png")
    _examples(out / "examples.png", rows, images, subsets, cfg.grid_rows)
    headline = {f"{r['subset']}/{r['metric']}": r["value"] for r in table}
    return {"quality_bar": bar, "metrics": headline, "plots": plots}


# -- MLflow ---------------------------------------------------------------------------------------
def tracking_uri(cfg: Any, pdir: Path, out: Path) -> str:
    """The config's, else $MLFLOW_TRACKING_URI, else the training run's (train.json beside an
    export directory), else sqlite:///<OUTPUT's parent>/mlflow.db."""
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    train = pdir.parent / "train.json"
    if train.is_file():
        uri = json.loads(train.read_text()).get("mlflow", {}).get("tracking_uri")
        if uri:
            return uri
    return f"sqlite:///{out.resolve().parent}/mlflow.db"


def _key(name: str) -> str:
    # MLflow keys allow alphanumerics, _ - . / and spaces.
    return "".join(c if c.isalnum() or c in "_-./" else "_" for c in name)


def log_mlflow(out: Path, summary: dict[str, Any], cfg: Any, pdir: Path, prev: dict[str, Any] | None) -> dict:
    """A run nested under the model's training run (``mlflow.parentRunId``) in its experiment;
    every evaluation of the output directory is its own run, the earlier ones listed."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException

    from pipelines.config import flatten

    uri = tracking_uri(cfg, pdir, out)
    client = MlflowClient(uri)
    parent_id = (summary.get("training") or {}).get("run_id")
    parent = None
    if parent_id:
        try:
            parent = client.get_run(parent_id)
        except MlflowException:
            parent = None
    tags = {
        "recompose.stage": "evaluate",
        "recompose.model": summary["model"],
        "recompose.config_hash": summary["config_hash"],
        "recompose.manifest_hash": summary["manifest_hash"],
    }
    if parent is not None:
        experiment_id = parent.info.experiment_id
        tags["mlflow.parentRunId"] = parent_id
    else:
        exp = client.get_experiment_by_name(cfg.mlflow.experiment)
        experiment_id = exp.experiment_id if exp else client.create_experiment(cfg.mlflow.experiment)
        tags["recompose.parent"] = f"training run {parent_id or '(none recorded)'} not found in {uri}"
    run = client.create_run(experiment_id, run_name=f"evaluate-{out.name}", tags=tags)
    rid = run.info.run_id
    params = [
        Param(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v)[:500])
        for k, v in flatten(cfg).items()
    ]
    ts = int(time.time() * 1000)
    metrics = [
        Metric(_key(k), float(v), ts, 0)
        for k, v in summary["metrics"].items()
        if v is not None and math.isfinite(v)
    ]
    for b in summary["quality_bar"]:
        if b["ratio"] is not None:
            metrics.append(Metric(_key(f"ratio_to_none/{b['condition']}"), float(b["ratio"]), ts, 0))
    for i in range(0, len(params), 100):
        client.log_batch(rid, params=params[i : i + 100])
    for i in range(0, len(metrics), 500):
        client.log_batch(rid, metrics=metrics[i : i + 500])
    for name in ("results.md", "metrics.parquet", "per_image.parquet", *summary["plots"]):
        client.log_artifact(rid, str(out / name))
    client.set_terminated(rid)
    earlier = list((prev or {}).get("mlflow", {}).get("earlier_runs", []))
    if prev and prev.get("mlflow", {}).get("run_id"):
        earlier.append(prev["mlflow"]["run_id"])
    return {
        "tracking_uri": uri,
        "run_id": rid,
        "experiment_id": experiment_id,
        "parent_run_id": parent_id if parent is not None else None,
        "earlier_runs": earlier,
    }
