"""A decomposition written by the previous release resumes under this one: nothing is recomputed,
every file keeps its bytes, and training reads it.

``tests/helpers/legacy/`` holds what that release wrote, in one folder, with the input given
relative to it (see its README.md)::

    recompose synth --output synth --count 24 --resolution 32
    recompose decompose --input synth --output decomposed --set resolution=32 --set shard_size=8

Shard states record the input's paths as given, so the test runs from the copy's folder with the
same relative ``--input``. The base hash records the input's absolute path: the test checks it
against the path the old run recorded, then rewrites it for the copy's location (as a run made
there would have written it) before resuming.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines import files
from pipelines.config import config_hash, load_config
from pipelines.data.batches import open_data
from pipelines.decompose.config import DecomposeConfig
from pipelines.decompose.job import run_decompose

LEGACY = Path(__file__).parents[1] / "helpers" / "legacy"
OUT = Path("decomposed")


def _config(**kw: str) -> DecomposeConfig:
    values = {"input": "synth", "output": str(OUT), "resolution": 32, "shard_size": 8, "progress": False}
    return load_config(DecomposeConfig, values={**values, **kw})


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def _snapshot() -> dict[Path, tuple[bytes, int | None]]:
    """Every file's bytes and mtime (not for the lock and job.json, which every run rewrites)."""
    every_run = {OUT / ".recompose" / "lock", OUT / ".recompose" / "job.json"}
    return {
        p: (p.read_bytes(), None if p in every_run else p.stat().st_mtime_ns)
        for p in OUT.rglob("*")
        if p.is_file()
    }


@pytest.fixture
def legacy(tmp_path, monkeypatch) -> Path:
    shutil.copytree(LEGACY / "synth", tmp_path / "synth")
    shutil.copytree(LEGACY / "decomposed", tmp_path / OUT)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_hashes_are_the_ones_the_old_release_recorded(legacy):
    job, manifest = _read(OUT / ".recompose" / "job.json"), _read(OUT / "manifest.json")
    assert _config(input=job["input"]).base_hash("parquet") == job["base_hash"] == manifest["base_hash"]
    assert config_hash(_config()) == manifest["config_hash"]


def test_resumes_without_recomputing_and_training_reads_it(legacy):
    base = _config().base_hash("parquet")
    job_file, manifest_file = OUT / ".recompose" / "job.json", OUT / "manifest.json"
    files.write_json({**_read(job_file), "base_hash": base, "input": str(legacy / "synth")}, job_file)
    files.write_json({**_read(manifest_file), "base_hash": base}, manifest_file)
    before = _snapshot()

    s = run_decompose(_config())

    assert (s.shards_computed, s.shards_reused, s.computed) == (0, 3, {})
    assert (s.inputs, s.rows, s.errors) == (24, 24, 0)
    # Not one output rewritten: shards, states, errors, manifest and preview keep bytes and mtimes.
    assert _snapshot() == before
    spec = open_data(OUT)
    assert spec.rows == 24 and spec.resolution == 32 and len(spec.files) == 3
    assert {"palette", "sketch", "instances", "depth", "intensity"} <= set(spec.conditions)
