"""`recompose quickstart --fast`: every stage runs for real (synthetic data, Ray Data decomposition,
Ray Train with MLflow, evaluation, Ray Serve over HTTP, the HTML report), and a rerun reuses them."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipelines.data.synth import SynthResult
from pipelines.diffusion.loading import reference_dir
from pipelines.files import OutputInUse
from pipelines.quickstart.results import (
    DecomposeResult,
    EvaluateResult,
    Generation,
    ReportResult,
    ServeResult,
    Summary,
    TrainResult,
)
from pipelines.quickstart.run import PLAN_RECORD, STAGES, Quickstart
from tests.helpers.serve import free_port

ROOT = Path(__file__).resolve().parents[2]


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.src.append(dict(attrs)["src"])


def _quickstart(workdir: Path, port: int, *flags: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "jobs.quickstart", "--workdir", str(workdir), "--port", str(port), *flags]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_quickstart_fast_runs_every_stage_and_a_rerun_reuses_them(tmp_path):
    from mlflow.tracking import MlflowClient

    work = tmp_path / "qs"
    port = free_port()
    first = _quickstart(work, port, "--fast", "--json")
    assert first.returncode == 0, first.stderr[-4000:]
    where = json.loads(first.stdout)
    assert sorted(where) == sorted(Summary.__dataclass_fields__)
    assert json.loads((work / "quickstart.json").read_text()) == where
    for i, stage in enumerate(STAGES, 1):
        assert f"[quickstart] {i}/{len(STAGES)} {stage}: done" in first.stderr
    assert f"mlflow ui --backend-store-uri sqlite:///{work / 'mlflow.db'}" in first.stderr
    assert f"http://127.0.0.1:{port}/" in first.stderr

    # the report and every picture it shows
    report = Path(where["report"])
    page = report.read_text()
    images = _Images()
    images.feed(page)
    assert len(images.src) >= 10
    for src in images.src:
        f = report.parent / src
        assert f.is_file() and f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
    for needed in ("representations.png", "fidelity.png", "examples.png", "training-metrics.png"):
        assert f"images/{needed}" in images.src
    assert "<table>" in page and "palette.chi2" in page  # the evaluation table

    # generations came back over HTTP from Serve, one set per condition subset
    gens = json.loads((work / "generations" / "generations.json").read_text())
    assert gens["url"] == f"http://127.0.0.1:{port}"
    subsets = {g["subset"] for g in gens["generations"]}
    assert {"caption", "palette", "sketch", "mask+caption", "all"} <= subsets
    for g in gens["generations"]:
        assert len(g["images"]) == 2
        for f in g["images"]:
            assert (work / "generations" / f).read_bytes()[:4] == b"\x89PNG"
    # and from the shipped reference model, served beside it, when this installation has one
    if reference_dir() is not None:
        assert {
            g["subset"] for g in gens["reference"]
        } and f"http://127.0.0.1:{port}/reference/" in first.stderr
        for g in gens["reference"]:
            for f in g["images"]:
                assert (work / "generations" / "reference" / f).read_bytes()[:4] == b"\x89PNG"
                assert f"images/reference-model-{f}" in images.src
    else:
        assert gens["reference"] == [] and "No reference model is installed" in page

    # the MLflow store: the training run with metrics and the registered model, the evaluation nested under it
    client = MlflowClient(tracking_uri=where["mlflow_tracking_uri"])
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    train = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    evals = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(train) == 1 and train[0].info.status == "FINISHED"
    assert "loss" in train[0].data.metrics
    assert evals and evals[0].data.tags["mlflow.parentRunId"] == train[0].info.run_id
    assert where["model_uri"] and client.get_model_version("recompose", where["model_uri"].rsplit("/", 1)[1])

    # a rerun reuses every stage
    second = _quickstart(work, port, "--fast", "--json")
    assert second.returncode == 0, second.stderr[-4000:]
    assert second.stderr.count("finished earlier, reused") == len(STAGES)
    assert json.loads(second.stdout)["report"] == where["report"]

    # the same workdir with another plan is refused, with the reason
    other = _quickstart(work, port, "--detach", timeout=300)
    assert other.returncode == 2, other.stderr[-4000:]
    assert "recompose quickstart: error: --workdir" in other.stderr
    assert "holds a quickstart with another mode ('fast', now 'full')" in other.stderr


def _finished(work: Path) -> None:
    """The records of a finished --fast quickstart (as a run writes them), without running it."""
    records = {
        "synth": SynthResult(
            f"{work}/synth", 48, 1, 1, 0, f"{work}/synth/synth.json", f"{work}/synth/preview.png", 1.0
        ),
        "decompose": DecomposeResult(f"{work}/decomposed", 48, 0),
        "train": TrainResult(
            f"{work}/train", f"{work}/train/export", 6, "recompose", "3", "models:/recompose/3", "r1", 9.0
        ),
        "evaluate": EvaluateResult(f"{work}/eval", 5.0, []),
        "serve": ServeResult(
            "http://127.0.0.1:8000", "a red circle", [Generation("caption", ["text"], ["caption-0.png"], {})]
        ),
        "report": ReportResult(f"{work}/report/index.html", ["caption-0.png"]),
    }
    (work / ".quickstart").mkdir(parents=True)
    (work / PLAN_RECORD).write_text(json.dumps({"mode": "fast", "images": 48, "train_steps": 6, "train_workers": 1, "sample_every": 0, "eval_samples": 4, "eval_steps": 4, "http_images": 2}))  # fmt: skip
    for stage, record in records.items():
        (work / ".quickstart" / f"{stage}.json").write_text(json.dumps(asdict(record), indent=2))


def test_a_rerun_reads_every_finished_stage_back(tmp_path, caplog, monkeypatch):
    work = (tmp_path / "qs").resolve()
    _finished(work)
    # caplog's handler on the logger itself, whether or not pipelines.log.configure stopped propagation
    logger = logging.getLogger("pipelines.quickstart")
    monkeypatch.setattr(logger, "propagate", False)
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("INFO", logger="pipelines.quickstart"):
            summary = Quickstart(work, fast=True, port=8123).run()
    finally:
        logger.removeHandler(caplog.handler)
    assert caplog.text.count("finished earlier, reused") == len(STAGES)
    assert summary.model_uri == "models:/recompose/3" and summary.export == f"{work}/train/export"
    assert summary.web_page == "http://127.0.0.1:8123/"
    assert json.loads((work / "quickstart.json").read_text()) == asdict(summary)


def test_a_workdir_of_another_plan_or_not_a_quickstart_is_refused(tmp_path):
    work = tmp_path / "qs"
    _finished(work)
    with pytest.raises(
        OutputInUse, match=r"--workdir .* holds a quickstart with another mode \('fast', now 'full'\)"
    ):
        Quickstart(work, fast=False).run()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputInUse, match="is not empty and holds no quickstart"):
        Quickstart(other, fast=True).run()
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
