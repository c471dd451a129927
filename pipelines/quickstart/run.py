"""``recompose quickstart``: the whole system end to end on the embedded default, on one machine.

Stages, each in its own directory under the work directory and each skipped when a rerun finds it
finished (``.quickstart/<stage>.json``, read back as its record in ``results.py``):

    synth      the built-in synthetic dataset                  synth/
    decompose  its eight representations (Ray Data)           decomposed/
    train      the tiny model, tracked in MLflow (Ray Train)   train/ (export: train/export), mlflow.db
    evaluate   condition fidelity and the benchmark (Ray)     eval/
    serve      Ray Serve on 127.0.0.1, samples over HTTP      generations/  (client.py)
               from the trained model (/) and the shipped      generations/reference/
               reference model (/reference/), when installed
    report     an HTML page with PNGs of all of the above     report/index.html  (report.py)

``--fast`` shrinks every stage to seconds (the CI check that everything is wired up); its model
learns nothing. The default plan is sized to finish within 12 minutes on an idle 2-core machine
(benchmarks/RESULTS.md, "Quickstart"): its 100-step model is a first model, shown beside the
shipped reference model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pipelines.data.synth import SynthResult, write_synth
from pipelines.diffusion import loading
from pipelines.files import claim_output, write_json
from pipelines.quickstart.client import ServeClient, first_synth_image, generate_subsets
from pipelines.quickstart.report import write_report
from pipelines.quickstart.results import (
    DecomposeResult,
    EvaluateResult,
    QuickstartError,
    ReportResult,
    ServeResult,
    Summary,
    TrainResult,
    read_record,
    write_record,
)
from pipelines.tracking import sqlite_uri

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("synth", "decompose", "train", "evaluate", "serve", "report")
PLAN_RECORD = ".quickstart/plan.json"  # the work directory's identity: a rerun must have the same plan

R = TypeVar("R")


@dataclass(frozen=True)
class Plan:
    """How big each stage is."""

    mode: Literal["full", "fast"]
    images: int  # synthetic images
    train_steps: int
    train_workers: int
    sample_every: int  # training sample grids (MLflow, train/samples/); 0: only the last one
    eval_samples: int  # evaluation rows
    eval_steps: int  # DDIM steps in evaluation and in the HTTP generations
    http_images: int  # images per HTTP request


PLANS = {
    "full": Plan("full", 500, 100, 2, 0, 8, 20, 1),
    "fast": Plan("fast", 48, 6, 1, 0, 4, 4, 2),
}

# The Serve apps: the trained model at /, the shipped reference model (when installed) at
# /reference. Both must fit the local Ray of a 2-CPU machine (a replica that cannot be scheduled
# waits forever): 2 x (0.5 + 0.1) CPUs, where the defaults (1 + 0.25 each) would need 2.5.
APPS = {"recompose": "/", "reference": "/reference"}
APP_RESOURCES = {"model_deployment": {"num_cpus": 0.5}, "ingress": {"num_cpus": 0.1}}


class Quickstart:
    """The stages of one work directory (module docstring), run or reused in order."""

    def __init__(self, workdir: str | Path, fast: bool = False, port: int = 8000):
        self.dir = Path(workdir).resolve()
        self.plan = PLANS["fast" if fast else "full"]
        self.port = port
        self.state = self.dir / ".quickstart"
        self.tracking_uri = sqlite_uri(self.dir)
        self.paths = {
            "synth": self.dir / "synth",
            "decompose": self.dir / "decomposed",
            "train": self.dir / "train",
            "evaluate": self.dir / "eval",
            "serve": self.dir / "generations",
            "report": self.dir / "report",
        }

    def run(self) -> Summary:
        """Runs (or resumes) every stage; returns where everything is (also ``quickstart.json``)."""
        self._claim()
        t0 = time.perf_counter()
        self._stage("synth", SynthResult, self._synth)
        self._stage("decompose", DecomposeResult, self._decompose)
        train = self._stage("train", TrainResult, self._train)
        evaluation = self._stage("evaluate", EvaluateResult, lambda: self._evaluate(train))
        generations = self._stage("serve", ServeResult, lambda: self._serve(train))
        self._stage("report", ReportResult, lambda: self._report(train, evaluation, generations))
        summary = self.summary(train, round(time.perf_counter() - t0, 1))
        write_json(asdict(summary), self.dir / "quickstart.json")
        return summary

    def summary(self, train: TrainResult, seconds: float) -> Summary:
        return Summary(
            workdir=str(self.dir),
            report=str(self.paths["report"] / "index.html"),
            export=train.export,
            model_uri=f"models:/{train.registered_model}/{train.model_version}"
            if train.model_version
            else None,
            mlflow_tracking_uri=self.tracking_uri,
            mlflow_ui=f"mlflow ui --backend-store-uri {self.tracking_uri}",
            web_page=self.web_page("recompose"),
            evaluation=str(self.paths["evaluate"] / "results.md"),
            seconds=seconds,
        )

    def web_page(self, app: str) -> str:
        """The web page of the Serve app ``app`` (``APPS``), ending with "/"."""
        return f"http://127.0.0.1:{self.port}{APPS[app].rstrip('/')}/"

    def deploy(self, export: str) -> tuple[str, str | None]:
        """``recompose serve --model EXPORT --port PORT --detach`` (the app "recompose" at /), and
        the reference model as the app "reference" at /reference on the same port when it is
        installed: their base URLs (no trailing slash; None: no reference model), ready."""
        from pipelines.config import from_dict
        from pipelines.serve import launch
        from pipelines.serve.config import ServeConfig

        models = {"recompose": export}
        ref = loading.reference_dir()
        if ref is not None:
            # its directory, not REFERENCE_MODEL: the replicas load what this process checked
            models["reference"] = str(ref)
        else:
            log.info(
                "  no reference model in this installation (%s): serving yours alone", loading.REFERENCE_DIR
            )
        urls = {}
        for app, model in models.items():
            fields = {"model": model, "port": self.port, "name": app, "route_prefix": APPS[app]}
            urls[app] = launch.deploy(from_dict(ServeConfig, {**fields, **APP_RESOURCES})).rstrip("/")
        return urls["recompose"], urls.get("reference")

    # -- bookkeeping ---------------------------------------------------------------------------
    def _claim(self) -> None:
        """Refuse a work directory of another plan, or one holding anything but a quickstart."""
        identity = asdict(self.plan)
        if claim_output(self.dir, PLAN_RECORD, "quickstart", identity=identity, flag="--workdir") is None:
            write_json(identity, self.dir / PLAN_RECORD)

    def _stage(self, stage: str, kind: type[R], make: Callable[[], R]) -> R:
        """The stage's record: read back when an earlier run finished it, else ``make()`` it."""
        i, n = STAGES.index(stage) + 1, len(STAGES)
        record = self.state / f"{stage}.json"
        if record.is_file():
            log.info("%d/%d %s: finished earlier, reused (%s)", i, n, stage, self.paths[stage])
            return read_record(kind, record)
        log.info("%d/%d %s -> %s", i, n, stage, self.paths[stage])
        t = time.perf_counter()
        result = make()
        write_record(result, record)
        log.info("%d/%d %s: done in %.0fs", i, n, stage, time.perf_counter() - t)
        return result

    # -- stages --------------------------------------------------------------------------------
    # Each Ray stage runs as its own `python -m jobs.<stage>` process, exactly the command a user
    # would type, with its own local Ray: nothing one stage leaves behind (actor pools, object
    # store) holds CPUs the next one waits for.
    def _synth(self) -> SynthResult:
        out = self.paths["synth"]
        return write_synth(out, count=self.plan.images, resolution=64, seed=0, split="train")

    def _decompose(self) -> DecomposeResult:
        out = self.paths["decompose"]
        args = ["--input", str(self.paths["synth"]), "--output", str(out)]
        _job("decompose", [*args, "--config", str(ROOT / "configs/decompose-laptop.yaml")])
        totals = json.loads((out / "manifest.json").read_text())["totals"]
        return DecomposeResult(output=str(out), rows=totals["rows"], errors=totals["errors"])

    def _train(self) -> TrainResult:
        p, run = self.plan, self.paths["train"]
        sets = {
            "checkpoint_every": max(1, p.train_steps // 3),
            "mlflow.tracking_uri": self.tracking_uri,
            "mlflow.sample_every": p.sample_every,
            "mlflow.log_every": max(1, min(10, p.train_steps)),
            "optim.warmup_steps": min(100, p.train_steps // 2),
        }
        if p.mode == "fast":  # the last sample grid of a 6-step model: as few DDIM steps as the rest
            sets["mlflow.sample_steps"] = p.eval_steps
        args = ["--data", str(self.paths["decompose"]), "--output", str(run)]
        args += ["--config", str(ROOT / "configs/train-laptop.yaml"), "--max-steps", str(p.train_steps)]
        t0 = time.perf_counter()
        _job("train", [*args, "--workers", str(p.train_workers), *_sets(sets)])
        export = json.loads((run / "export" / "recompose-training.json").read_text())
        return TrainResult(
            run_dir=str(run),
            export=str(run / "export"),
            steps=export.get("step"),
            registered_model="recompose" if export.get("version") else None,
            model_version=export.get("version"),
            model_uri=export.get("model_uri"),
            mlflow_run_id=export.get("run_id"),
            seconds=round(time.perf_counter() - t0, 1),
        )

    def _evaluate(self, train: TrainResult) -> EvaluateResult:
        p, out = self.plan, self.paths["evaluate"]
        args = ["--model", train.export, "--data", str(self.paths["decompose"])]
        args += ["--output", str(out), "--num-samples", str(p.eval_samples)]
        sets = {
            "steps": p.eval_steps,
            "mlflow.tracking_uri": self.tracking_uri,
            "grid_rows": min(4, p.eval_samples),
        }
        _job("evaluate", [*args, *_sets(sets)])
        summary = json.loads((out / "evaluate.json").read_text())
        return EvaluateResult(
            output=str(out), seconds=summary.get("seconds"), quality_bar=summary["quality_bar"]
        )

    def _serve(self, train: TrainResult) -> ServeResult:
        """Serve the export (and the reference model, when installed) and ask each HTTP API for
        generations under each condition subset, the same requests to both."""
        from ray import serve

        base, reference = self.deploy(train.export)
        try:
            image = first_synth_image(self.paths["synth"])
            return generate_subsets(
                ServeClient(base),
                image,
                self.paths["serve"],
                self.plan.eval_steps,
                self.plan.http_images,
                reference_app=ServeClient(reference) if reference else None,
            )
        finally:
            serve.shutdown()

    def _report(
        self, train: TrainResult, evaluation: EvaluateResult, generations: ServeResult
    ) -> ReportResult:
        summary = self.summary(train, seconds=0.0)  # the report shows where things are, not how long
        return write_report(
            self.paths["report"],
            self.paths,
            self.plan.mode,
            summary,
            train,
            evaluation,
            generations,
            reference=loading.reference_dir(),
        )


def _sets(values: dict[str, Any]) -> list[str]:
    return [x for k, v in values.items() for x in ("--set", f"{k}={v}")]


def _job(stage: str, args: list[str]) -> None:
    """``python -m jobs.<stage> ARGS`` in a process of its own; its progress goes to our stderr."""
    cmd = [sys.executable, "-m", f"jobs.{stage}", *args]
    log.info("  $ %s", " ".join(cmd[1:]))
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    code = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": path}, stdout=sys.stderr).returncode
    if code != 0:
        raise QuickstartError(
            f"the {stage} stage failed (exit {code}); its output is above. Rerun to resume."
        )


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """File descriptor 1 onto 2 meanwhile: Ray's own messages (raylet, Serve) write to fd 1, and
    stdout holds the ``--json`` answer alone."""
    sys.stdout.flush()
    stdout = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
        os.close(stdout)


def _log_summary(s: Summary, serving: bool, reference_page: str | None) -> None:
    again = "" if serving else f"   (serve it again: recompose serve --model {s.export})"
    log.info("finished in %.0fs; everything is in %s", s.seconds, s.workdir)
    log.info("  report       %s", s.report)
    log.info("  model        %s%s", s.export, f"  ({s.model_uri})" if s.model_uri else "")
    log.info("  evaluation   %s", s.evaluation)
    log.info("  MLflow       %s   (then open http://127.0.0.1:5000)", s.mlflow_ui)
    log.info("  web page     %s%s", s.web_page, again)
    if reference_page is not None:
        again = "" if serving else "   (serve it alone: recompose serve, its default --model)"
        log.info("  reference    %s%s", reference_page, again)


def run_quickstart(workdir: str | Path, fast: bool = False, port: int = 8000, detach: bool = True) -> Summary:
    """Every stage (module docstring), then, unless ``detach``, serve the web page until Ctrl-C."""
    import ray

    qs = Quickstart(workdir, fast=fast, port=port)
    with _stdout_to_stderr():
        try:
            summary = qs.run()
            if not detach:
                qs.deploy(summary.export)
        finally:
            if detach:
                ray.shutdown()  # no late Ray message after stdout is back
    _log_summary(summary, not detach, qs.web_page("reference") if loading.reference_dir() else None)
    if not detach:
        from pipelines.serve import launch

        launch.block()
    return summary
