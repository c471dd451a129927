"""Fixtures of the quickstart tests: the installation with or without a reference model."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.diffusion import loading
from tests.quickstart.fabricate import write_reference


@pytest.fixture
def reference_model(tmp_path, monkeypatch, tiny_model_dir) -> Path:
    """A fabricated shipped reference model (a random-init tiny pipeline, reference.json and
    evaluation/) where ``loading.REFERENCE_DIR`` points."""
    out = write_reference(tmp_path / "installed-reference", tiny_model_dir)
    monkeypatch.setattr(loading, "REFERENCE_DIR", out)
    return out


@pytest.fixture
def no_reference_model(tmp_path, monkeypatch) -> Path:
    """An installation without a reference model (``loading.REFERENCE_DIR`` missing)."""
    out = tmp_path / "no-reference"
    monkeypatch.setattr(loading, "REFERENCE_DIR", out)
    return out
