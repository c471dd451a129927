"""The import layers of docs/architecture.md, checked with import-linter's own command (as .ci/run
does), and shown to catch a violation: the same contracts over a small copy of the package tree
in which the data layer imports a stage."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).with_name("lint-imports"))


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LINT, "--config", str(cwd / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_code_keeps_its_layers():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 kept, 0 broken" in r.stdout


def test_a_layer_violation_is_caught(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for module in ("jobs", "pipelines", "pipelines.quickstart", "pipelines.reference", "pipelines.decompose", "pipelines.train", "pipelines.evaluate",
                   "pipelines.generate", "pipelines.serve", "pipelines.diffusion", "pipelines.data",
                   "pipelines.conditions", "pipelines.config", "pipelines.files", "pipelines.log",
                   "pipelines.tracking", "pipelines.errors", "models"):  # fmt: skip
        path = tmp_path.joinpath(*module.split("."))
        path.mkdir(parents=True, exist_ok=True)
        (path / "__init__.py").write_text("")
    (tmp_path / "pipelines" / "data" / "reader.py").write_text("import pipelines.train\n")
    r = _lint(tmp_path)
    assert r.returncode != 0
    assert "pipelines.data is not allowed to import pipelines.train" in r.stdout, r.stdout
    (tmp_path / "pipelines" / "data" / "reader.py").write_text("import pipelines.conditions\n")
    assert _lint(tmp_path).returncode == 0
