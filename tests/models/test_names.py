"""``models/`` speaks the on-disk condition names and stays free of Ray, MLflow and readers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import models
from pipelines.conditions import CONDITION_NAMES

REPO = Path(__file__).resolve().parents[2]


def test_condition_names_match_the_shards():
    assert models.CONDITIONS == CONDITION_NAMES


def test_models_imports_no_ray_mlflow_or_pipelines():
    code = (
        "import models, sys; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow', 'pipelines')]; "
        "assert not bad, bad"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
