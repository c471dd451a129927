"""`recompose quickstart --fast`: every stage runs for real (synthetic data, Ray Data decomposition,
Ray Train with MLflow, evaluation, Ray Serve over HTTP, the HTML report), and a rerun reuses them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipelines.quickstart.run import STAGES, markdown_to_html
from tests.helpers.serve import free_port

ROOT = Path(__file__).resolve().parents[2]


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.src: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.src.append(dict(attrs)["src"])


def _quickstart(workdir: Path, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.quickstart",
            "--workdir",
            str(workdir),
            "--fast",
            "--port",
            str(port),
            "--json",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.slow
def test_quickstart_fast_runs_every_stage_and_a_rerun_reuses_them(tmp_path):
    from mlflow.tracking import MlflowClient

    work = tmp_path / "qs"
    port = free_port()
    first = _quickstart(work, port)
    assert first.returncode == 0, first.stderr[-4000:]
    where = json.loads(first.stdout)
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
    second = _quickstart(work, port)
    assert second.returncode == 0, second.stderr[-4000:]
    assert second.stderr.count("finished earlier, reused") == len(STAGES)
    assert json.loads(second.stdout)["report"] == where["report"]

    # the same workdir with another plan is refused, with the reason
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    other = subprocess.run(
        [sys.executable, "-m", "jobs.quickstart", "--workdir", str(work), "--exit", "--port", str(port)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert other.returncode == 2 and "holds a 'fast' quickstart" in other.stderr


def test_markdown_tables_become_html_tables():
    text = "# Evaluation\n\n- a `b`\n\n| x | y |\n|---|---|\n| 1 | **no** |\n\nplain"
    out = markdown_to_html(text)
    assert "<h2>Evaluation</h2>" in out and "<li>a <code>b</code></li>" in out
    assert re.search(
        r"<table><tr><th>x</th><th>y</th></tr>\s*<tr><td>1</td><td><b>no</b></td></tr>\s*</table>", out
    )
    assert "<p>plain</p>" in out
