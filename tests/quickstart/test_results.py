"""The stage records: written as JSON with their field names, read back as the same dataclass."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from pipelines.data.synth import SynthResult
from pipelines.quickstart.results import (
    DecomposeResult,
    EvaluateResult,
    Generation,
    ReportResult,
    ServeResult,
    TrainResult,
    read_record,
    write_record,
)

RECORDS = [
    SynthResult("/w/synth", 48, 1, 1, 0, "/w/synth/synth.json", "/w/synth/preview.png", 0.5),
    DecomposeResult("/w/decomposed", 48, 0),
    TrainResult("/w/train", "/w/train/export", 6, "recompose", "1", "models:/recompose/1", "abc", 12.5),
    EvaluateResult("/w/eval", 3.0, [{"condition": "palette", "pass": None}]),
    ServeResult(
        "http://127.0.0.1:8000",
        "a red circle",
        [Generation("mask+caption", ["mask", "text"], ["m-0.png"], {"mask": "m-given-mask.png"})],
        [Generation("caption", ["text"], ["caption-0.png"], {})],  # the reference model's
    ),
    ServeResult("http://127.0.0.1:8000", "a red circle", [Generation("caption", ["text"], ["c-0.png"], {})]),
    ReportResult("/w/report/index.html", ["a.png"]),
]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_a_record_reads_back_as_itself(tmp_path, record):
    path = tmp_path / "stage.json"
    write_record(record, path)
    assert json.loads(path.read_text()) == asdict(record)
    assert read_record(type(record), path) == record


def test_records_keep_the_keys_earlier_runs_wrote():
    """.quickstart/<stage>.json of a finished run is read by a rerun and by other tools."""
    keys = {type(r).__name__: sorted(asdict(r)) for r in RECORDS}
    assert keys["SynthResult"] == sorted(
        ["output", "count", "files", "written", "skipped", "manifest", "preview", "seconds"]
    )
    assert keys["TrainResult"] == sorted(
        [
            "run_dir",
            "export",
            "steps",
            "registered_model",
            "model_version",
            "model_uri",
            "mlflow_run_id",
            "seconds",
        ]
    )
    assert keys["EvaluateResult"] == ["output", "quality_bar", "seconds"]
    assert keys["ServeResult"] == ["generations", "reference", "text", "url"]
    assert sorted(asdict(RECORDS[4])["generations"][0]) == ["conditions", "given", "images", "subset"]
    assert sorted(asdict(RECORDS[4])["reference"][0]) == ["conditions", "given", "images", "subset"]


def test_a_serve_record_from_before_the_reference_model_reads_back(tmp_path):
    """A rerun of a work directory whose serve stage finished before "reference" was recorded."""
    path = tmp_path / "serve.json"
    gen = {"subset": "caption", "conditions": ["text"], "images": ["c-0.png"], "given": {}}
    path.write_text(
        json.dumps({"url": "http://127.0.0.1:8000", "text": "a red circle", "generations": [gen]})
    )
    record = read_record(ServeResult, path)
    assert record == ServeResult(
        "http://127.0.0.1:8000", "a red circle", [Generation("caption", ["text"], ["c-0.png"], {})]
    )
    assert record.reference == []
