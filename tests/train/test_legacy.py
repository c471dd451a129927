"""A training run directory written by an earlier version resumes under this one.

``tests/helpers/legacy/train-run/`` is what the previous main wrote (its README says how): a
decomposition of 8 synthetic images at 16 px (``decomposed/``), a 2-step run of a shrunken tiny
model with one checkpoint (``run/``), and the local MLflow store beside it (``mlflow.db``,
``mlartifacts/``). Here it is resumed to step 4 with the same command.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from jobs.cli import main

pytestmark = pytest.mark.slow

LEGACY = Path(__file__).parents[1] / "helpers" / "legacy" / "train-run"
# The command that wrote the run (README.md), less --max-steps.
ARGS = [
    "--preset",
    "tiny",
    "--workers",
    "1",
    "--set",
    "model.overrides={block_out_channels: [8, 16], norm_num_groups: 4, cross_attention_dim: 16, "
    "attention_head_dim: 4, caption_sentence_dim: 16, caption_token_dim: 16, text_layers: 1, "
    "text_vocab_size: 64, local_channels: 4, local_hidden: 8, caption_length: 8}",
]
for item in (
    "loader.conditions=[palette, sketch]",
    "optim.batch_size=4",
    "optim.warmup_steps=0",
    "checkpoint_every=2",
    "keep_checkpoints=1",
    "mlflow.log_every=1",
    "mlflow.sample_every=0",
    "mlflow.sample_rows=1",
    "mlflow.sample_steps=2",
    "mlflow.system_metrics=false",
    "progress=false",
    "mlflow.registered_model=recompose-legacy",
    "cpus_per_worker=1",
):
    ARGS += ["--set", item]


def relocate(root: Path, old: str) -> None:
    """Rewrite the absolute paths recorded under ``old`` to ``root``, as a user who moves a run
    directory (with its data and MLflow store) must: ``train.json`` names the data and the store,
    Ray's checkpoint-manager snapshot names the checkpoints, and the SQLite store names the
    artifact locations. (Recreating the fixture's original absolute layout instead would put
    test files outside ``tmp_path``.)"""
    new = str(root)
    for path in (root / "run").glob("*.json"):
        path.write_text(path.read_text().replace(old, new))
    with sqlite3.connect(root / "mlflow.db") as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for _, column, kind, *_ in db.execute(f'PRAGMA table_info("{table}")').fetchall():
                if kind.upper().startswith(("TEXT", "VARCHAR")):
                    db.execute(f'UPDATE "{table}" SET "{column}" = REPLACE("{column}", ?, ?)', (old, new))


@pytest.fixture
def legacy(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "legacy"
    shutil.copytree(LEGACY, root, ignore=shutil.ignore_patterns("README.md"))
    old = str(Path(json.loads((root / "run" / "train.json").read_text())["data"]).parent)
    relocate(root, old)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the store beside the run, as written
    # The run was started with --data relative to its folder, and the config hash covers `data` as
    # given: the same command from the moved folder is the same config.
    monkeypatch.chdir(root)
    return root


def test_legacy_run_resumes_from_its_checkpoint(legacy, ray_local):
    from mlflow import MlflowClient

    record = json.loads((legacy / "run" / "train.json").read_text())
    run_id = record["mlflow"]["run_id"]
    client = MlflowClient(record["mlflow"]["tracking_uri"])
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2]

    run_dir = legacy / "run"
    rc = main(["train", "--data", "decomposed", "--output", "run", "--max-steps", "4", *ARGS])
    assert rc == 0
    assert json.loads((run_dir / "train.json").read_text())["mlflow"]["run_id"] == run_id
    # Restored at step 2: steps 3 and 4 trained, none twice, in the same MLflow run.
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == [1, 2, 3, 4]
    runs = client.search_runs([record["mlflow"]["experiment_id"]])
    assert [r.info.run_id for r in runs] == [run_id] and runs[0].info.status == "FINISHED"
    (latest,) = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]  # keep_checkpoints=1
    progress = json.loads((latest / "state.json").read_text())
    assert progress["step"] == 4 and progress["images"] == 4 * 4 and progress["mlflow_run_id"] == run_id
    export = json.loads((run_dir / "export" / "recompose-training.json").read_text())
    assert export["step"] == 4 and export["run_id"] == run_id and export["version"] == 2
