"""The quickstart's HTML report: ``report/index.html`` and the PNGs it shows in ``report/images/``.

The page is ``templates/report.html.j2`` (jinja2, autoescaped) rendered from the stages' records
and the evaluation's own data: ``evaluate.json`` (settings, quality bar, what was skipped) and
``metrics.parquet`` (one row per group, subset and metric), as ``recompose evaluate`` wrote them.

Beside the trained model it shows the shipped reference model (``pipelines.diffusion.loading.
REFERENCE_DIR``), when the installation has one: its generations from the serve stage, how long
it was trained (``reference.json``) and the evaluation shipped with it (``evaluation/``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipelines.diffusion import loading
from pipelines.files import write_bytes
from pipelines.quickstart.results import EvaluateResult, ReportResult, ServeResult, Summary, TrainResult

TEMPLATES = Path(__file__).resolve().parent / "templates"
ARROW = {"higher": "↑", "lower": "↓"}  # which way a metric is better, in table headers
BAR_COLUMNS = ("condition", "metric", "value", "floor", "ceiling", "ratio", "target", "pass")
QUALITY_COLUMNS = {"fid": "FID", "kid_mean": "KID", "kid_std": "KID std", "clip_score": "CLIP score"}


@dataclass(frozen=True)
class Table:
    """A table as the template draws it; a cell is text, a number, a bool (yes / no) or None (–)."""

    header: list[str]
    rows: list[list[Any]]


@dataclass(frozen=True)
class Evaluation:
    """What the report shows of one ``recompose evaluate`` output."""

    settings: dict[str, Any]  # evaluate.json's summary (model, data, config, reextract, skipped …)
    fidelity: Table  # subset x metric means
    quality_bar: Table
    benchmark: Table | None  # None: not run (the reason is in settings["skipped"])
    quality: Table | None  # FID / KID / CLIP score; None: not computed
    quality_missing: dict[str, list[str]]  # reason -> the metrics it stopped


def _ordered(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _fidelity(rows: list[dict[str, Any]]) -> Table:
    direction = {r["metric"]: r["direction"] for r in rows}
    metrics = sorted(direction)
    val = {(r["subset"], r["metric"]): r["value"] for r in rows}
    header = ["subset", *(f"{m} {ARROW.get(direction[m], '')}".rstrip() for m in metrics)]
    subsets = _ordered([r["subset"] for r in rows])  # none, the configured subsets, real
    return Table(header, [[s, *(val.get((s, m)) for m in metrics)] for s in subsets])


def _benchmark(rows: list[dict[str, Any]]) -> Table | None:
    if not rows:
        return None
    metrics = _ordered([r["metric"] for r in rows])
    val = {(r["subset"], r["metric"]): r["value"] for r in rows}
    n = {r["subset"]: r["n"] for r in rows}
    names = sorted(n, key=lambda s: (s.split("/")[-1] != "seen", s))  # source/side, seen first
    return Table(
        ["source/side", "images", *metrics], [[s, n[s], *(val.get((s, m)) for m in metrics)] for s in names]
    )


def _quality(rows: list[dict[str, Any]]) -> Table | None:
    if not rows:
        return None
    val = {(r["subset"], r["metric"]): r for r in rows}
    out = []
    for s in _ordered([r["subset"] for r in rows]):
        kid = val.get((s, "kid_mean"), {})
        cells = {m: val.get((s, m), {}).get("value") for m in ("fid", "kid_mean", "clip_score")}
        n = next((r["n"] for r in rows if r["subset"] == s), None)
        out.append([s, cells["fid"], cells["kid_mean"], kid.get("std"), cells["clip_score"], n])
    return Table(["images", *QUALITY_COLUMNS.values(), "n"], out)


def _benchmark_from_summary(metrics: dict[str, float]) -> list[dict[str, Any]]:
    """Benchmark rows from evaluate.json's ``metrics`` ("<source>/<side>/<metric>" -> value;
    image counts unknown), for an evaluation directory without its metrics.parquet."""
    rows = []
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[1] in ("seen", "heldout"):
            rows.append({"subset": f"{parts[0]}/{parts[1]}", "metric": parts[2], "value": value, "n": None})
    return rows


def load_evaluation(out: Path, evaluation: EvaluateResult | None = None) -> Evaluation:
    """The tables of ``out/metrics.parquet`` and the settings and quality bar of ``out/evaluate.json``
    (the quality bar of ``evaluation``, the stage's record, when given). Without metrics.parquet the
    fidelity and quality tables are empty and the benchmark comes from evaluate.json's metrics."""
    import json

    import pyarrow.parquet as pq

    settings = json.loads((out / "evaluate.json").read_text())
    if (out / "metrics.parquet").is_file():
        rows = pq.read_table(out / "metrics.parquet").to_pylist()
    else:
        rows = [{**r, "group": "benchmark"} for r in _benchmark_from_summary(settings.get("metrics") or {})]
    group = {g: [r for r in rows if r["group"] == g] for g in ("fidelity", "benchmark", "quality")}
    missing: dict[str, list[str]] = {}
    for metric, why in (settings.get("quality_unavailable") or {}).items():
        missing.setdefault(why, []).append(metric)  # FID and KID share one reason
    quality_bar = evaluation.quality_bar if evaluation is not None else settings.get("quality_bar") or []
    bar = [[b.get(c) for c in BAR_COLUMNS] for b in quality_bar]
    return Evaluation(
        settings=settings,
        fidelity=_fidelity(group["fidelity"]),
        quality_bar=Table(
            ["condition", "metric", "value", "floor (none)", "ceiling (real)", "ratio", "target", "pass"], bar
        ),
        benchmark=_benchmark(group["benchmark"]),
        quality=_quality(group["quality"]),
        quality_missing=missing,
    )


# Evaluation settings that say where it ran or how fast, not what it measured.
NOT_SETTINGS = {"model", "data", "output", "num_samples", "workers", "cpus_per_worker", "gpus_per_worker"}
NOT_SETTINGS |= {"batch_size", "grid_rows", "progress", "mlflow"}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_differ(theirs: dict[str, Any], ours: dict[str, Any]) -> list[str]:
    """The evaluation settings (``evaluate.json``'s config) of ``theirs`` that differ from ``ours``,
    as "key value (this run: value)"; the rows, model, data and resources left out."""
    t = {k: v for k, v in _flat(theirs).items() if k.split(".")[0] not in NOT_SETTINGS}
    o = {k: v for k, v in _flat(ours).items() if k.split(".")[0] not in NOT_SETTINGS}
    return [
        f"{k} {t.get(k, '–')} (this run: {o.get(k, '–')})"
        for k in sorted(t.keys() | o.keys())
        if t.get(k) != o.get(k)
    ]


@dataclass(frozen=True)
class ReferenceModel:
    """The shipped reference model as the report shows it."""

    path: str
    steps: int | None  # reference.json's training steps
    training: str  # "M steps, H h" of training, as reference.json records them
    machine: str | None  # what it was trained on
    evaluation: Evaluation | None  # the shipped evaluation/ (None: not shipped)
    differs: list[str]  # its evaluation settings that differ from this run's, rows aside


def _machine(m: dict[str, Any]) -> str | None:
    if not m:
        return None
    where = f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores"
    return where + (f", {m['gpu']}" if m.get("gpu") else ", no GPU")


def load_reference(directory: Path, ours: dict[str, Any]) -> ReferenceModel:
    """``directory`` (the installed reference model): ``reference.json`` and ``evaluation/``;
    ``ours``: this run's evaluation settings (evaluate.json's config), to say what differs."""
    import json

    record_path = directory / "reference.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    steps, seconds = record.get("steps"), record.get("train_seconds")
    hours = f"{seconds / 3600:.2f} h" if seconds else "unknown time"
    ev_dir = directory / "evaluation"
    evaluation = load_evaluation(ev_dir) if (ev_dir / "evaluate.json").is_file() else None
    differs = settings_differ(evaluation.settings.get("config") or {}, ours) if evaluation else []
    return ReferenceModel(
        path=str(directory),
        steps=steps,
        training=f"{steps if steps is not None else '?'} steps, {hours}",
        machine=_machine(record.get("machine") or {}),
        evaluation=evaluation,
        differs=differs,
    )


def cell(value: Any, digits: int = 3) -> str:
    """A table cell as text: floats to ``digits`` decimals, None and NaN as –, bools as yes / no."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _copy_pictures(
    paths: Mapping[str, Path], images: Path, generations: ServeResult, reference: Path | None
) -> dict[str, str | None]:
    """Copy every picture the page shows into ``images``; name -> its src (None: not written)."""

    def copy(src: Path, name: str) -> str | None:
        if not src.is_file():
            return None
        write_bytes(src.read_bytes(), images / name)
        return f"images/{name}"

    ev, train, gens = paths["evaluate"], paths["train"], paths["serve"]
    samples = sorted((train / "samples").glob("*.png"))  # the latest training sample grid
    pics = {
        "synth": copy(paths["synth"] / "preview.png", "synth.png"),
        "decomposed": copy(paths["decompose"] / "preview.png", "representations.png"),
        "metrics": copy(train / "metrics.png", "training-metrics.png"),
        "samples": copy(samples[-1], "training-samples.png") if samples else None,
        "fidelity": copy(ev / "fidelity.png", "fidelity.png"),
        "benchmark": copy(ev / "benchmark.png", "benchmark.png"),
        "examples": copy(ev / "examples.png", "examples.png"),
        "reference": copy(gens / "reference.png", "reference.png"),
    }
    for g in generations.generations:
        for f in [*g.images, *g.given.values()]:
            copy(gens / f, f)
    for g in generations.reference:  # the reference model's: generations/reference/<f>
        for f in g.images:
            copy(gens / "reference" / f, f"reference-model-{f}")
    if reference is not None:
        pics["reference_fidelity"] = copy(
            reference / "evaluation" / "fidelity.png", "reference-model-fidelity.png"
        )
    return pics


def render(**context: Any) -> str:
    """``templates/report.html.j2`` with ``context`` (autoescaped)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,  # a misspelt name fails the stage, not silently blank
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["cell"] = cell
    return env.get_template("report.html.j2").render(**context)


def write_report(
    out: Path,
    paths: Mapping[str, Path],
    mode: Literal["full", "fast"],
    summary: Summary,
    train: TrainResult,
    evaluation: EvaluateResult,
    generations: ServeResult,
    reference: Path | None = None,
) -> ReportResult:
    """``out/index.html`` and ``out/images/``; ``paths``: stage name -> its directory;
    ``reference``: the installed reference model's directory (None: there is none)."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    ev = load_evaluation(paths["evaluate"], evaluation)
    seconds = f"{train.seconds:.0f} s" if train.seconds is not None else "unknown time"
    page = render(
        fast=mode == "fast",
        where=summary,
        train=train,
        pics=_copy_pictures(paths, images, generations, reference),
        generations=generations,
        theirs={g.subset: g for g in generations.reference},
        yours=f"{train.steps} steps, {seconds} on this machine",
        ev=ev,
        ref=load_reference(reference, ev.settings.get("config") or {}) if reference is not None else None,
        reference_dir=str(loading.REFERENCE_DIR),
    )
    write_bytes(page.encode(), out / "index.html")
    return ReportResult(report=str(out / "index.html"), images=sorted(p.name for p in images.iterdir()))
