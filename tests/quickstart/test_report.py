"""The quickstart report: rendered from the evaluation's data (evaluate.json, metrics.parquet) and
the stage records, every picture copied beside it, every value escaped."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.files import encode_png
from pipelines.quickstart.report import cell, load_evaluation, write_report
from pipelines.quickstart.results import EvaluateResult, Generation, ServeResult, Summary, TrainResult

PNG = encode_png(__import__("numpy").zeros((4, 4, 3), "uint8"))
BAR = [
    {
        "condition": "palette",
        "metric": "palette.chi2",
        "value": 0.2,
        "floor": 0.8,
        "ceiling": 0.01,
        "ratio": 0.25,
        "target": "≤ 0.5×",
        "pass": True,
    },
    {
        "condition": "sketch",
        "metric": "sketch.f1",
        "value": 0.1,
        "floor": 0.1,
        "ceiling": None,
        "ratio": 1.0,
        "target": "≥ 2.0×",
        "pass": False,
    },
]


def _row(group, subset, metric, value, direction="higher", n=4, std=None):
    return {
        "group": group,
        "subset": subset,
        "metric": metric,
        "direction": direction,
        "value": value,
        "std": std,
        "n": n,
        "floor": None,
        "ratio_to_floor": None,
    }


def _evaluation(out: Path, quality: bool) -> EvaluateResult:
    """An evaluation output as `recompose evaluate` writes it (the files the report reads)."""
    rows = [
        _row("fidelity", s, m, v, d)
        for s in ("none", "palette", "<b>sketch</b>", "real")
        for m, v, d in (("palette.chi2", 0.5, "lower"), ("sketch.f1", float("nan"), "higher"))
    ]
    rows += [
        _row("benchmark", f"{src}/{side}", m, 0.5, n=3)
        for side in ("heldout", "seen")
        for src in ("caption", "real")
        for m in ("count", "all")
    ]
    if quality:
        rows += [
            _row("quality", "caption", "fid", 123.4, "lower", n=8),
            _row("quality", "caption", "kid_mean", 0.1, "lower", 8, 0.01),
        ]
        rows += [_row("quality", "real", "clip_score", 25.0, n=8)]
    out.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "metrics.parquet")
    summary = {
        "model": "/m/export",
        "data": "/d",
        "num_rows": 4,
        "manifest_hash": "abc",
        "config_hash": "def",
        "config": {
            "seed": 0,
            "steps": 4,
            "guidance": 3.0,
            "benchmark": {"guidance": 5.0},
            "quality": {"inception_weights": "/w/inception.pt", "clip_model": None, "kid_subset_size": 1000},
        },
        "reextract": {"depth": "scene", "instances": "scene"},
        "skipped": {"depth fidelity": "no <depth> weights"},
        "quality_unavailable": {}
        if quality
        else {"fid": "no Inception weights", "kid": "no Inception weights", "clip_score": "no CLIP"},
        "quality_bar": BAR,
        "seconds": 12.0,
    }
    (out / "evaluate.json").write_text(json.dumps(summary))
    for name in ("fidelity.png", "examples.png"):  # no benchmark.png: a picture not written is left out
        (out / name).write_bytes(PNG)
    return EvaluateResult(output=str(out), seconds=12.0, quality_bar=BAR)


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag, attrs):
        self.tables += tag == "table"
        if tag == "img":
            self.src.append(dict(attrs)["src"])


def _workdir(tmp_path: Path, quality: bool):
    paths = {
        s: tmp_path / d
        for s, d in (
            ("synth", "synth"),
            ("decompose", "decomposed"),
            ("train", "train"),
            ("evaluate", "eval"),
            ("serve", "generations"),
            ("report", "report"),
        )
    }
    for key, name in (
        ("synth", "preview.png"),
        ("decompose", "preview.png"),
        ("train", "metrics.png"),
        ("serve", "reference.png"),
    ):
        paths[key].mkdir(parents=True, exist_ok=True)
        (paths[key] / name).write_bytes(PNG)
    (paths["train"] / "samples").mkdir()
    for step in ("step-000010.png", "step-000020.png"):
        (paths["train"] / "samples" / step).write_bytes(PNG)
    gens = [
        Generation("caption", ["text"], ["caption-0.png"], {}),
        Generation(
            "mask+caption", ["mask", "text"], ["mask+caption-0.png"], {"mask": "mask+caption-given-mask.png"}
        ),
    ]
    for g in gens:
        for f in [*g.images, *g.given.values()]:
            (paths["serve"] / f).write_bytes(PNG)
    evaluation = _evaluation(paths["evaluate"], quality)
    summary = Summary(
        str(tmp_path),
        str(paths["report"] / "index.html"),
        "/m/export",
        None,
        "sqlite:///x/mlflow.db",
        "mlflow ui --backend-store-uri sqlite:///x/mlflow.db",
        "http://127.0.0.1:8000/",
        "/x/eval/results.md",
        0.0,
    )
    train = TrainResult("/m", "/m/export", 6, None, None, None, None, 1.5)
    serve = ServeResult("http://127.0.0.1:8000", "a red <circle> & a blue square", gens)
    return paths, summary, train, evaluation, serve


@pytest.mark.parametrize("quality", [True, False])
def test_report_shows_every_picture_and_the_evaluation_tables(tmp_path, quality):
    paths, summary, train, evaluation, serve = _workdir(tmp_path, quality)
    result = write_report(paths["report"], paths, "fast", summary, train, evaluation, serve)
    page = Path(result.report).read_text()
    parsed = _Page()
    parsed.feed(page)
    for src in parsed.src:
        assert (paths["report"] / src).read_bytes() == PNG, src
    for needed in (
        "synth.png",
        "representations.png",
        "training-metrics.png",
        "training-samples.png",
        "fidelity.png",
        "examples.png",
        "reference.png",
        "caption-0.png",
        "mask+caption-given-mask.png",
    ):
        assert f"images/{needed}" in parsed.src
    assert "images/benchmark.png" not in parsed.src
    assert set(result.images) == {Path(s).name for s in parsed.src}
    # info, fidelity, quality bar, benchmark (+ FID/KID when computed)
    assert parsed.tables == 4 + quality
    assert "palette.chi2 ↓" in page and "sketch.f1 ↑" in page and "–" in page  # NaN shown as –
    assert "<td><b>no</b></td>" in page and "<td>yes</td>" in page  # the quality bar's pass column
    assert "--fast" in page and "no &lt;depth&gt; weights" in page
    # values are escaped, never markup
    assert "&lt;b&gt;sketch&lt;/b&gt;" in page and "a red &lt;circle&gt; &amp; a blue square" in page
    if quality:
        assert "123.400" in page and "FID / KID / CLIP score" in page
    else:
        assert "Not computed: fid/kid: no Inception weights; clip_score: no CLIP" in page


def test_evaluation_tables_come_from_metrics_parquet(tmp_path):
    evaluation = _evaluation(tmp_path / "eval", quality=True)
    ev = load_evaluation(tmp_path / "eval", evaluation)
    assert [r[0] for r in ev.fidelity.rows] == ["none", "palette", "<b>sketch</b>", "real"]
    assert ev.benchmark.header == ["source/side", "images", "count", "all"]
    assert [r[0] for r in ev.benchmark.rows] == [
        "caption/seen",
        "real/seen",
        "caption/heldout",
        "real/heldout",
    ]
    assert ev.quality.rows == [["caption", 123.4, 0.1, 0.01, None, 8], ["real", None, None, None, 25.0, 8]]
    assert [r[-1] for r in ev.quality_bar.rows] == [True, False]


def test_cells():
    assert [cell(None), cell(float("nan")), cell(True), cell(0.12345), cell(3), cell("x")] == [
        "–",
        "–",
        "yes",
        "0.123",
        "3",
        "x",
    ]
