"""The quickstart report: rendered from the evaluation's data (evaluate.json, metrics.parquet) and
the stage records, every picture copied beside it, every value escaped."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipelines.quickstart.report import cell, load_evaluation, settings_differ, write_report
from pipelines.quickstart.results import Generation, ServeResult, Summary, TrainResult
from tests.quickstart.fabricate import PNG, REFERENCE_BAR, write_evaluation


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag, attrs):
        self.tables += tag == "table"
        if tag == "img":
            self.src.append(dict(attrs)["src"])


def _workdir(tmp_path: Path, quality: bool, reference: bool = False):
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
    # the reference model's, in generations/reference/ (mask+caption: not asked of it)
    theirs = [Generation("caption", ["text"], ["caption-0.png", "caption-1.png"], {})] if reference else []
    for g in theirs:
        (paths["serve"] / "reference").mkdir()
        for f in g.images:
            (paths["serve"] / "reference" / f).write_bytes(PNG)
    evaluation = write_evaluation(paths["evaluate"], quality)
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
    serve = ServeResult("http://127.0.0.1:8000", "a red <circle> & a blue square", gens, theirs)
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
    # no reference model: said once in the evaluation section and in the header table, no reference rows
    assert page.count("No reference model is installed") == 1
    assert "<th>reference model</th><td>none installed" in page
    assert "your model: 6 steps, 2 s on this machine" in page and "reference model:" not in page
    assert not any("reference-model" in src for src in parsed.src)


def test_report_compares_with_the_reference_model(tmp_path, reference_model):
    paths, summary, train, evaluation, serve = _workdir(tmp_path, quality=True, reference=True)
    result = write_report(
        paths["report"], paths, "fast", summary, train, evaluation, serve, reference=reference_model
    )
    page = Path(result.report).read_text()
    parsed = _Page()
    parsed.feed(page)
    for src in parsed.src:
        assert (paths["report"] / src).read_bytes() == PNG, src
    assert set(result.images) == {Path(s).name for s in parsed.src}
    # both models' generations of a subset, each row labelled with how long it was trained
    for needed in ("caption-0.png", "reference-model-caption-0.png", "reference-model-caption-1.png"):
        assert f"images/{needed}" in parsed.src
    yours, theirs = (
        "your model: 6 steps, 2 s on this machine",
        "reference model: 20000 steps, 2.50 h (reference.json)",
    )
    assert page.count(yours) == 2 and page.count(theirs) == 2  # one row each per subset
    caption = page[page.index("<h3>caption</h3>") : page.index("<h3>mask+caption</h3>")]
    assert caption.index(yours) < caption.index("images/caption-0.png") < caption.index(theirs)
    assert caption.index(theirs) < caption.index("images/reference-model-caption-0.png")
    assert "not generated" in page[page.index("<h3>mask+caption</h3>") :]  # not asked of it
    # the header row: where it is, how long and on what it was trained
    assert (
        f"<code>{reference_model}</code>: 20000 steps, 2.50 h of training on Test CPU, 8 cores, no GPU"
        in page
    )
    # its shipped evaluation: fidelity plot, quality bar and benchmark, on its own 64 rows
    assert "images/reference-model-fidelity.png" in parsed.src
    assert parsed.tables == 5 + 2  # this run's tables (with FID/KID), then the reference's two
    shipped = page[page.index("The reference model's shipped evaluation") :]
    assert "on its own 64 rows" in shipped and "steps 25 (this run: 4)" in shipped
    assert "<td>0.050</td>" in shipped and "<td>1.050</td>" in shipped  # its quality bar
    assert "<td>0.875</td>" in shipped and "caption/seen" in shipped  # its benchmark
    assert "<td><b>no</b></td>" not in shipped  # every bar of it passes
    assert "No reference model is installed" not in page


def test_the_reference_evaluation_loads_from_its_own_files(tmp_path, reference_model):
    ev = load_evaluation(reference_model / "evaluation")  # the quality bar from its evaluate.json
    assert [r[2] for r in ev.quality_bar.rows] == [b["value"] for b in REFERENCE_BAR]
    assert ev.settings["num_rows"] == 64 and ev.benchmark.rows[0][:2] == ["caption/seen", 3]
    # without metrics.parquet, the benchmark comes from evaluate.json's metrics (counts unknown)
    (reference_model / "evaluation" / "metrics.parquet").unlink()
    ev = load_evaluation(reference_model / "evaluation")
    assert ev.benchmark.header == ["source/side", "images", "count", "all"]
    assert ev.benchmark.rows[0] == ["caption/seen", None, 0.875, 0.875] and len(ev.benchmark.rows) == 4
    assert ev.fidelity.rows == [] and ev.quality is None


def test_settings_that_differ_leave_out_rows_and_resources():
    ours = {"steps": 4, "num_samples": 4, "workers": 1, "quality": {"clip_model": None}}
    theirs = {"steps": 25, "num_samples": 64, "workers": 2, "quality": {"clip_model": "c"}, "seed": 0}
    assert settings_differ(theirs, ours) == [
        "quality.clip_model c (this run: None)",
        "seed 0 (this run: –)",
        "steps 25 (this run: 4)",
    ]
    assert settings_differ(ours, ours) == []


def test_evaluation_tables_come_from_metrics_parquet(tmp_path):
    evaluation = write_evaluation(tmp_path / "eval", quality=True)
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
