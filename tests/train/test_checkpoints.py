"""Training checkpoints under attack and damage: nothing in them is unpickled, a damaged latest
checkpoint is skipped for the one before it, and no product code unpickles anything."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from pipelines.train import state as train_state

ROOT = Path(__file__).resolve().parents[2]


class _Planted:
    """What an attacker with write access to the checkpoint storage would plant in state.pt."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _checkpoint(directory: Path, step: int = 3) -> Path:
    model = torch.nn.Linear(2, 2)
    optim = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optim.step()
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: 1.0)
    train_state.save(
        directory,
        {"in_features": 2},
        model.state_dict(),
        model.state_dict(),
        {"decay": 0.9},
        optim.state_dict(),
        sched.state_dict(),
        [torch.Generator().get_state()],
        train_state.Progress(step=step, config_hash="abc"),
    )
    return directory


def test_state_loads_without_unpickling_and_a_planted_pickle_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path / "ok")
    state = train_state.read_state(ckpt)  # optimizer, scheduler and RNG: tensors and plain data
    assert set(state) == {"optimizer", "lr_scheduler", "rng"} and state["rng"][0].dtype == torch.uint8

    bad = _checkpoint(tmp_path / "bad")
    marker = tmp_path / "code-ran"
    with (bad / "state.pt").open("wb") as f:
        pickle.dump({"optimizer": _Planted(str(marker))}, f)
    with pytest.raises(train_state.UnsafeCheckpoint, match="not loaded"):
        train_state.read_state(bad)
    assert not marker.exists()  # nothing ran


def test_verify_finds_damaged_and_missing_files(tmp_path):
    ckpt = _checkpoint(tmp_path / "c")
    files = json.loads((ckpt / "state.json").read_text())["files"]
    assert {
        "model/diffusion_pytorch_model.safetensors",
        "ema/diffusion_pytorch_model.safetensors",
        "state.pt",
    } <= set(files)
    assert train_state.verify(ckpt) == []
    weights = ckpt / "model" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert train_state.verify(ckpt) == [
        "model/diffusion_pytorch_model.safetensors does not match its recorded SHA-256"
    ]
    (ckpt / "state.pt").unlink()
    assert "state.pt is missing" in train_state.verify(ckpt)
    (ckpt / "state.json").unlink()
    assert "state.json" in train_state.verify(ckpt)[0]

    # a checkpoint written before digests were recorded: its files are checked for presence
    old = _checkpoint(tmp_path / "old")
    record = json.loads((old / "state.json").read_text())
    del record["files"]
    (old / "state.json").write_text(json.dumps(record))
    assert train_state.verify(old) == []
    (old / "state.pt").unlink()
    assert train_state.verify(old) == ["state.pt is missing"]


def _call(text: str, open_paren: int) -> str:
    """The text from ``open_paren`` to its matching closing parenthesis."""
    depth = 0
    for i in range(open_paren, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_paren : i + 1]
    return text[open_paren:]


def test_no_product_code_unpickles():
    """pipelines/, models/, jobs/: no torch.load(weights_only=False), pickle.load(s), numpy
    allow_pickle=True, or torch.load without weights_only (its default differs across versions)."""
    forbidden = re.compile(r"weights_only\s*=\s*False|pickle\.loads?\(|allow_pickle\s*=\s*True")
    found = []
    for package in ("pipelines", "models", "jobs"):
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text()
            for m in forbidden.finditer(text):
                found.append(f"{path.relative_to(ROOT)}:{text[: m.start()].count(chr(10)) + 1}: {m.group()}")
            for m in re.finditer(r"torch\.load\(", text):
                call = _call(text, m.end() - 1)
                if "weights_only=True" not in call:
                    found.append(f"{path.relative_to(ROOT)}: {call}")
    assert found == []


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local) -> Path:
    from pipelines.data.synth import write_synth
    from pipelines.decompose.config import DecomposeConfig
    from pipelines.decompose.job import run_decompose

    root = tmp_path_factory.mktemp("ckpt-data")
    write_synth(root / "synth", count=32, resolution=32, seed=0, split="train", progress=False)
    run_decompose(
        DecomposeConfig(
            input=str(root / "synth"),
            output=str(root / "decomposed"),
            resolution=32,
            shard_size=32,
            conditions=("palette", "sketch", "instances", "depth", "intensity"),
            progress=False,
        )
    )
    return root / "decomposed"


def _train(data: Path, root: Path, max_steps: int) -> int:
    """``recompose train`` of the tiny model into ``root/run``: checkpoints every 2 steps, 2 kept,
    no restart after a failure, every step's loss logged, the export registered."""
    from jobs.cli import main

    args = ["train", "--data", str(data), "--output", str(root / "run"), "--preset", "tiny"]
    args += ["--max-steps", str(max_steps), "--workers", "2"]
    sets = [
        "optim.batch_size=4",
        "checkpoint_every=2",
        "keep_checkpoints=2",
        "progress=false",
        "max_failures=0",
    ]
    sets += [
        f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        "mlflow.sample_every=0",
        "mlflow.sample_rows=1",  # the grid at the end: 2 DDIM steps, not 4 rows × 25 (~15 s a run)
        "mlflow.sample_steps=2",
        "mlflow.log_every=1",
    ]
    sets += ["mlflow.registered_model=recompose-faults"]
    for item in sets:
        args += ["--set", item]
    return main(args)


@pytest.mark.slow
def test_kills_mid_export_and_a_damaged_checkpoint_are_survived(data, tmp_path, monkeypatch):
    """One run dir, five `recompose train` runs (each costs ~40 s here):
    1. to step 4 (checkpoints at 2 and 4): export v1;
    2. step 4's checkpoint damaged, to step 6: resumes from step 2's, trains 3-6; export v2;
    3. to step 8, rank 0 killed right after the new export is swapped in (old one not deleted);
    4. the same, killed after registering step 8 and before recording it;
    5. again: finishes and records v3, no duplicate version; every moment left a whole export."""
    import ray.train
    from mlflow import MlflowClient

    from pipelines.diffusion.loading import load_pipeline
    from pipelines.train import run as train_run
    from tests.train.faults import KillAt

    run_dir = tmp_path / "run"
    export = run_dir / "export"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def recorded() -> dict:
        info = export / "recompose-training.json"
        return json.loads(info.read_text()) if info.is_file() else {}

    def checkpoints() -> dict[int, Path]:
        found = {}
        for p in run_dir.glob("checkpoint_*"):
            if (p / "state.json").is_file():
                found[json.loads((p / "state.json").read_text())["step"]] = p
        return found

    assert _train(data, tmp_path, 4) == 0
    assert recorded()["step"] == 4 and recorded()["version"] == 1
    kept = checkpoints()
    assert sorted(kept) == [2, 4]
    weights = kept[4] / "model" / "diffusion_pytorch_model.safetensors"
    damaged = bytearray(weights.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # one flipped byte in the weights: a disk error
    weights.write_bytes(bytes(damaged))
    assert _train(data, tmp_path, 6) == 0
    assert recorded()["step"] == 6 and recorded()["version"] == 2
    run_id = json.loads((run_dir / "train.json").read_text())["mlflow"]["run_id"]
    steps = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
    assert sorted(set(steps)) == list(range(1, 7))
    assert steps.count(3) == 2 and steps.count(4) == 2 and steps.count(5) == 1  # resumed from step 2

    for point in ("export-swapped", "registered"):
        monkeypatch.setattr(train_run, "finish_hook", KillAt(point))
        with pytest.raises(ray.train.WorkerGroupError, match="died"):  # rank 0 killed there
            _train(data, tmp_path, 8)
        load_pipeline(str(export), "cpu")  # a whole pipeline: the old one or the new, never none
    monkeypatch.setattr(train_run, "finish_hook", None)
    assert _train(data, tmp_path, 8) == 0
    assert recorded()["step"] == 8 and recorded()["version"] == 3
    versions = sorted(int(v.version) for v in client.search_model_versions("name = 'recompose-faults'"))
    assert versions == [1, 2, 3]  # the kill after registering did not make the rerun register again
