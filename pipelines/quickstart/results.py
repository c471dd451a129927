"""What each quickstart stage leaves behind, as the typed records of ``.quickstart/<stage>.json``.

The synth stage's record is ``pipelines.data.synth.SynthResult``; the others are defined here.

A finished stage's record is read back into its dataclass on a rerun, so the later stages get
the same typed object whether the stage ran now or earlier. The JSON keys are the field names
(other tools read these files and the ``--json`` summary).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipelines.errors import UserError
from pipelines.files import write_json

R = TypeVar("R")


class QuickstartError(UserError):
    """A stage failed (its own output, above, says why) or an HTTP request was refused.

    Reported like bad input, as its message and exit code 2: the stage's traceback is already
    on stderr, and a rerun resumes from the stages that finished."""


def write_record(result: Any, path: Path) -> None:
    """A stage's record (a dataclass) as JSON with its field names as keys."""
    write_json(asdict(result), path)


def read_record(kind: type[R], path: Path) -> R:
    """The record ``write_record`` wrote, as ``kind`` again (nested records via ``kind.from_dict``)."""
    data = json.loads(path.read_text())
    from_dict = getattr(kind, "from_dict", None)
    return from_dict(data) if from_dict is not None else kind(**data)


@dataclass(frozen=True)
class DecomposeResult:
    output: str
    rows: int  # rows of the decomposition manifest's totals
    errors: int  # rows recorded as failed


@dataclass(frozen=True)
class TrainResult:
    run_dir: str
    export: str  # the saved pipeline directory (RUN_DIR/export)
    steps: int | None
    registered_model: str | None  # the MLflow registry name, when a version was registered
    model_version: str | None
    model_uri: str | None
    mlflow_run_id: str | None
    seconds: float


@dataclass(frozen=True)
class EvaluateResult:
    output: str
    seconds: float | None
    # evaluate.json's quality bar rows as written there (condition, metric, value, floor,
    # ceiling, ratio, target, pass): the evaluation owns their format.
    quality_bar: list[dict[str, Any]]


@dataclass(frozen=True)
class Generation:
    """One ``POST /v1/generate``: the condition subset sent and the files it wrote."""

    subset: str
    conditions: list[str]
    images: list[str]  # generated PNGs (file names in generations/)
    given: dict[str, str]  # condition -> the PNG of what was given (the mask sent, the maps Serve echoed)


@dataclass(frozen=True)
class ServeResult:
    url: str  # the trained model's app
    text: str  # the caption of the image every generation is conditioned on
    generations: list[Generation]  # the trained model's, in generations/
    # The shipped reference model's (its app at URL/reference), the same requests, in
    # generations/reference/; empty when the installation has no reference model.
    reference: list[Generation] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeResult:
        """Also a record written before the reference model was served (no "reference" key)."""
        gens = [Generation(**g) for g in data["generations"]]
        return cls(data["url"], data["text"], gens, [Generation(**g) for g in data.get("reference", [])])


@dataclass(frozen=True)
class ReportResult:
    report: str  # report/index.html
    images: list[str]  # the files of report/images/


@dataclass(frozen=True)
class Summary:
    """Where everything is: ``quickstart.json`` and the ``--json`` output."""

    workdir: str
    report: str
    export: str
    model_uri: str | None  # models:/<name>/<version> when the export was registered
    mlflow_tracking_uri: str
    mlflow_ui: str  # the command that browses the MLflow store
    web_page: str
    evaluation: str  # results.md
    seconds: float
