"""The evaluation's outputs: the table (Parquet + Markdown) and the summary; plots in ``plots.py``.

``OUTPUT/`` after ``recompose evaluate``:

- ``metrics.parquet``: one row per (group, subset, metric): mean, std, n, direction, the floor
  (subset ``none``) and ratio to it; groups ``fidelity``, ``benchmark``, ``quality``.
- ``per_image.parquet``: every re-extraction metric of every generated image.
- ``results.md``: the same as tables, with the quality bar checked and the settings.
- ``fidelity.png`` (per-condition bars), ``benchmark.png`` (seen vs held-out accuracy),
  ``examples.png`` (condition -> generation grid), ``evaluate.json`` (``EvalResult``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.evaluate.units import Row, UnitResult

FORMAT = "recompose.evaluate/1"
OUTPUTS = (  # every file an evaluation writes into its output directory
    "metrics.parquet",
    "per_image.parquet",
    "results.md",
    "fidelity.png",
    "benchmark.png",
    "examples.png",
    "evaluate.json",
)


@dataclass(frozen=True)
class EvalResult:
    """The summary of one evaluation, written as ``evaluate.json`` (``to_dict``)."""

    format: str  # FORMAT
    model: str  # as given: a directory or an MLflow models:/ / runs:/ URI
    pipeline_dir: str  # where the pipeline was loaded from
    data: str  # the decomposition output's root
    manifest_hash: str
    config_hash: str  # of the output-affecting settings: equal hashes measured the same thing
    config: dict[str, Any]
    num_rows: int
    synthetic: bool  # the rows' captions are the synthetic generator's
    reextract: dict[str, str]  # representation -> "extractor" / "scene"
    skipped: dict[str, str]  # subset, benchmark or fidelity left out -> why
    training: dict[str, Any]  # the pipeline's recompose-training.json ({} when none)
    quality_unavailable: dict[str, str]  # FID / KID / CLIP score not computed -> why
    seconds: float | None = None
    quality_bar: list[dict[str, Any]] = field(default_factory=list)  # quality_bar() rows
    metrics: dict[str, float] = field(default_factory=dict)  # "<subset>/<metric>" -> value
    plots: list[str] = field(default_factory=list)  # file names in the output directory
    mlflow: dict[str, Any] | None = None  # the MLflow run (mlflow_run.log_run); None: not logged
    resolution: int | None = None  # the side of the images measured (a cascade's output side)
    cascade: list[int] | None = None  # a cascade: each stage's side, base first

    def to_dict(self) -> dict[str, Any]:
        """The evaluate.json mapping; no "mlflow" / "cascade" key when nothing was logged / no cascade."""
        d = dataclasses.asdict(self)
        for key in ("mlflow", "cascade"):
            if d[key] is None:
                del d[key]
        return d


# The headline metric of each representation, its direction, and the quality bar: the target
# ratio of its own subset to the unconditional floor (None: reported, no target).
HEADLINE: dict[str, tuple[str, str, float | None]] = {
    "palette": ("palette.chi2", "lower", 0.5),
    "sketch": ("sketch.f1", "higher", 2.0),
    "instances": ("instances.miou", "higher", 2.0),
    "depth": ("depth.rmse_ssi", "lower", 0.7),
    "intensity": ("intensity.ssim", "higher", 2.0),
}
# The compositional benchmark's bar (caption only, per object): seen pairs at least these
# accuracies, held-out pairs within HELDOUT_GAP of seen (compositional generalisation).
BENCH_BAR: dict[str, float] = {"colour": 0.8, "shape": 0.7}
HELDOUT_GAP = 0.1
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
def _per_image(results: list[UnitResult], rows: list[Row]) -> list[dict[str, Any]]:
    out = []
    for res in results:
        if res.name.startswith("bench"):
            continue
        for i, rec in zip(res.rows, res.records, strict=True):
            d = {"subset": res.name, "row": i, "key": rows[i]["key"]}
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


def benchmark_table(results: list[UnitResult]) -> list[dict[str, Any]]:
    """Scene-parser accuracies: caption-only, unconditional (floor) and renders (ceiling), by side."""
    from pipelines.evaluate.scene_parser import summarize

    groups: dict[str, list[dict[str, Any]]] = {}
    for res in results:
        if res.name.startswith("bench"):
            groups.setdefault(res.name, []).extend(r["bench"] for r in res.records)
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
    """The quality bar: each condition's own subset against the floor; masks exact; the benchmark's
    per-object accuracies from the caption alone (``BENCH_BAR``, ``HELDOUT_GAP``)."""
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
    return out + _benchmark_bar(table)


def _benchmark_bar(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    val = {(r["subset"], r["metric"]): r["value"] for r in table if r["group"] == "benchmark"}
    out = []
    for metric, target in BENCH_BAR.items():
        seen = val.get(("caption/seen", metric))
        if seen is None:
            continue
        for side in ("seen", "heldout"):
            value = val.get((f"caption/{side}", metric))
            if value is None:
                continue
            bar = target if side == "seen" else seen - HELDOUT_GAP
            out.append(
                {
                    "condition": f"caption ({side} pairs)",
                    "metric": f"benchmark.{metric}",
                    "value": value,
                    "floor": val.get((f"none/{side}", metric)),
                    "ceiling": val.get((f"real/{side}", metric)),
                    "ratio": None,
                    "target": f"≥ {target}" if side == "seen" else f"≥ seen − {HELDOUT_GAP}",
                    "pass": value >= bar,
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
    result: EvalResult,
    table: list[dict[str, Any]],
    bar: list[dict[str, Any]],
    order: list[str],
    quality: dict[str, Any],
) -> str:
    """results.md: the settings, the fidelity table, the quality bar, the benchmark, FID/KID/CLIP
    score and what was skipped."""
    parts = (
        _md_fidelity(result, table, bar, order) + _md_benchmark(result, table) + _md_quality(result, quality)
    )
    if result.skipped:
        parts += ["", "## Skipped", ""] + [f"- {k}: {v}" for k, v in result.skipped.items()]
    return "\n".join(parts) + "\n"


def _md_fidelity(
    result: EvalResult, table: list[dict[str, Any]], bar: list[dict[str, Any]], order: list[str]
) -> list[str]:
    cfg = result.config
    val = {(r["subset"], r["metric"]): r["value"] for r in table if r["group"] == "fidelity"}
    cols = [m for m in DIRECTION if any(r["metric"] == m for r in table if r["group"] == "fidelity")]
    bar_keys = ("condition", "metric", "value", "floor", "ceiling", "ratio", "target", "pass")
    return [
        "# Evaluation",
        "",
        f"- model: `{result.model}`; data: `{result.data}` ({result.num_rows} rows, "
        f"manifest {result.manifest_hash})",
        f"- seeds {cfg['seed']}..{cfg['seed'] + result.num_rows - 1} (row i: seed + i in every subset); "
        f"{cfg['steps']} DDIM steps; guidance {cfg['guidance']}; evaluation hash {result.config_hash}",
        "- re-extraction: "
        + ", ".join(f"{k} = {v}" for k, v in result.reextract.items())
        + " (scene: the synthetic scene parser re-renders what it reads)",
        "- `none`: every condition dropped (the floor); `real`: the real image re-extracted the same way "
        "(the ceiling). Ratios are to `none`.",
        "",
        "## Condition fidelity (mean over images)",
        "",
        _md_table(["subset", *cols], [[s, *[val.get((s, m)) for m in cols]] for s in order]),
        "",
        "## Quality bar",
        "",
        _md_table(
            ["condition", "metric", "value", "floor (none)", "ceiling (real)", "ratio", "target", "pass"],
            [[b[k] for k in bar_keys] for b in bar],
        ),
    ]


def _md_benchmark(result: EvalResult, table: list[dict[str, Any]]) -> list[str]:
    bench = [r for r in table if r["group"] == "benchmark"]
    if not bench:
        return []
    val = {(r["subset"], r["metric"]): r["value"] for r in bench}
    names = sorted({r["subset"] for r in bench}, key=lambda s: (s.split("/")[1] != "seen", s))
    n = {r["subset"]: r["n"] for r in bench}
    return [
        "",
        "## Synthetic compositional benchmark (scene parser; caption only, guidance "
        f"{result.config['benchmark']['guidance']})",
        "",
        _md_table(
            ["source/side", "images", *BENCH_METRICS],
            [[s, n[s], *[val.get((s, m)) for m in BENCH_METRICS]] for s in names],
        ),
        "",
        "seen: only (colour, shape) pairs seen in training; heldout: at least one held-out pair. "
        "caption: generated from the caption alone; none: unconditional (floor); real: the generator's "
        "own render (the parser's ceiling).",
    ]


_PROTOCOL = ("inception_resize", "inception", "clip_variant", "clip_resize", "kid_subset_size", "n_real")


def _md_quality(result: EvalResult, quality: dict[str, Any]) -> list[str]:
    parts = ["", "## FID / KID / CLIP score", ""]
    if not quality:
        why: dict[str, list[str]] = {}
        for k, v in (result.quality_unavailable or {}).items():
            why.setdefault(v, []).append(k)  # FID and KID share one reason
        reasons = "; ".join(f"{'/'.join(ks)}: {v}" for v, ks in why.items())
        return [*parts, "Not computed: " + (reasons or "no caption subset")]
    rows = [
        [
            s,
            e.get("fid"),
            e.get("kid_mean"),
            e.get("kid_std"),
            e.get("clip_score"),
            e.get("n_fake", e.get("n")),
        ]
        for s, e in quality.items()
    ]
    proto = {k: v for e in quality.values() for k, v in e.items() if k in _PROTOCOL}
    return [
        *parts,
        _md_table(["images", "FID", "KID", "KID std", "CLIP score", "n"], rows),
        "",
        "Protocol: captions of the evaluation rows -> images -> FID/KID against the real images "
        "of those rows (zero-shot COCO protocol); " + "; ".join(f"{k}: {v}" for k, v in proto.items()),
    ]


def write_report(
    out: Path,
    result: EvalResult,
    rows: list[Row],
    results: list[UnitResult],
    images: dict[str, np.ndarray],
    quality: dict[str, Any],
    cfg: Any,
) -> EvalResult:
    """Write every output file but evaluate.json (module docstring); returns ``result`` with the
    quality bar, the headline numbers and the plots' names."""
    import pyarrow as pa

    from pipelines.data.shards import write_parquet
    from pipelines.evaluate import plots as plot
    from pipelines.files import write_bytes

    subsets = {k: v for k, v in cfg.subsets.items() if k not in result.skipped}
    order = ["none", *subsets, "real"]
    per_image = _per_image(results, rows)
    table = fidelity_table(per_image, order) + benchmark_table(results) + quality_table(quality)
    bar = quality_bar(table, subsets)
    cols = ["group", "subset", "metric", "direction", "value", "std", "n", "floor", "ratio_to_floor"]
    write_parquet(pa.Table.from_pylist([{c: r.get(c) for c in cols} for r in table]), out / "metrics.parquet")
    write_parquet(pa.Table.from_pylist(per_image), out / "per_image.parquet")
    write_bytes(markdown(result, table, bar, order, quality).encode(), out / "results.md")
    plot.plot_fidelity(out / "fidelity.png", table, subsets)
    plots = ["fidelity.png", "examples.png"]
    if any(r["group"] == "benchmark" for r in table):
        plot.plot_benchmark(out / "benchmark.png", table)
        plots.insert(1, "benchmark.png")
    plot.plot_examples(out / "examples.png", rows, images, subsets, cfg.grid_rows)
    headline = {f"{r['subset']}/{r['metric']}": r["value"] for r in table}
    return dataclasses.replace(result, quality_bar=bar, metrics=headline, plots=plots)
