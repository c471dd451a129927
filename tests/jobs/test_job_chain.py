"""decompose → train → evaluate as `ray job submit` jobs on a `ray start --head` cluster, as README's
walkthrough for a Ray cluster runs them (infra/runtime-env.yaml uploads this checkout).

The cluster is this test's own: free ports, its own --temp-dir and HOME (so its token file is
not the user's ~/.ray/auth_token), its own process session, ended by signal. Never `ray stop`:
that would end every Ray on the machine, the in-process ones of the other tests included.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.data.synth import write_synth
from tests.helpers.serve import free_port

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = os.path.dirname(sys.executable)
RAY = os.path.join(VENV_BIN, "ray")
TRAIN_STEPS = 4


@dataclass(frozen=True)
class Head:
    env: dict[str, str]  # what a client shell exports (README): RAY_API_SERVER_ADDRESS, RAY_AUTH_MODE
    dashboard: str


def _clean_env(home: Path) -> dict[str, str]:
    """This process's environment without Ray's client settings or an MLflow store (an in-process
    Ray of another test may have set RAY_AUTH_MODE here), the venv first on PATH, HOME private."""
    drop = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_", "MLFLOW_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["HOME"] = str(home)
    return env


def _session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (Linux /proc): the head and everything it started."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # fields after the parenthesised command name: state ppid pgrp session …; zombies are gone
        state, _, _, session = stat.rsplit(")", 1)[1].split()[:4]
        if int(session) == sid and state != "Z":
            pids.append(int(entry))
    return pids


def _pgrep(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def _get(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _stop(head: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM to the head's process group, then SIGKILL to whatever of its session or temp dir is
    left: after jobs ran, `ray start --block` takes ~30 s to stop gracefully, and nothing here
    needs a graceful stop (the temp dir is deleted next)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=5)
    for pid in set(_session_pids(head.pid)) | set(_pgrep(temp_dir)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    head.wait(timeout=10)
    deadline = time.time() + 10
    while (left := set(_session_pids(head.pid)) | set(_pgrep(temp_dir))) and time.time() < deadline:
        time.sleep(0.2)  # SIGKILLed processes take a moment to be reaped by their parents
    assert not left, f"processes of the test cluster survived SIGKILL: {sorted(left)}"


@pytest.fixture
def ray_head(tmp_path) -> Iterator[Head]:
    """`ray start --head --num-cpus 2` on free ports, with a token in its (private) ~/.ray/auth_token."""
    home = tmp_path / "home"
    # `ray start --head` turns token auth on only when it finds a token (in a fresh HOME it starts
    # without auth and writes none): write one, as `ray get-auth-token --generate` would.
    token = secrets.token_hex(32)
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(token)
    # Ray's socket paths must stay under 107 characters: a short temp dir, not tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="rcj", dir="/tmp")
    env = _clean_env(home)
    gcs, dash, agent, client = (free_port() for _ in range(4))
    cmd = [
        RAY, "start", "--head", "--block", "--num-cpus", "2", "--disable-usage-stats", "--temp-dir", temp_dir,
        "--port", str(gcs), "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
    ]  # fmt: skip
    log = tmp_path / "ray-start.log"
    with open(log, "w") as out:
        head = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    dashboard = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:
            assert head.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(OSError):
                if _get(f"{dashboard}/api/jobs/", token)[0] == 200:
                    break
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        env = env | {"RAY_API_SERVER_ADDRESS": dashboard, "RAY_AUTH_MODE": "token"}
        yield Head(env=env, dashboard=dashboard)
    finally:
        try:
            _stop(head, temp_dir)
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(head: Head, submission_id: str, *command: str) -> subprocess.CompletedProcess:
    """README's `ray job submit --runtime-env infra/runtime-env.yaml -- python -m jobs.<stage> …`."""
    cmd = [RAY, "job", "submit", "--submission-id", submission_id, "--runtime-env", "infra/runtime-env.yaml"]
    done = subprocess.run(
        [*cmd, "--", "python", "-m", *command],
        cwd=ROOT,
        env=head.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{submission_id}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.mark.slow
def test_decompose_train_evaluate_run_as_ray_jobs(ray_head, tmp_path):
    from mlflow.tracking import MlflowClient

    # token auth is on: the dashboard refuses a request without the token the client sent
    assert _get(f"{ray_head.dashboard}/api/jobs/")[0] == 401

    synth, decomposed, run_dir, evaluated = (tmp_path / n for n in ("synth", "decomposed", "train", "eval"))
    store = tmp_path / "mlflow" / "mlflow.db"  # not beside any output: evaluate must find it via train.json
    store.parent.mkdir()
    uri = f"sqlite:///{store}"
    write_synth(synth, count=24, resolution=64, seed=0, split="train", progress=False)

    _submit(
        ray_head,
        "chain-decompose",
        "jobs.decompose",
        "--input", str(synth),
        "--output", str(decomposed),
        "--config", "configs/decompose-laptop.yaml",
    )  # fmt: skip
    manifest = json.loads((decomposed / "manifest.json").read_text())
    assert manifest["totals"]["rows"] == 24 and manifest["totals"]["errors"] == 0, manifest["totals"]
    assert all((decomposed / s["path"]).is_file() for s in manifest["shards"])

    train = _submit(
        ray_head,
        "chain-train",
        "jobs.train",
        "--data", str(decomposed),
        "--output", str(run_dir),
        "--config", "configs/train-laptop.yaml",
        "--max-steps", str(TRAIN_STEPS),
        "--workers", "1",
        "--set", "optim.batch_size=4",
        "--set", "optim.warmup_steps=1",
        "--set", f"checkpoint_every={TRAIN_STEPS}",
        "--set", "mlflow.log_every=2",
        "--set", "mlflow.sample_every=0",
        "--set", "mlflow.sample_steps=2",
        "--set", "mlflow.system_metrics=false",
        "--set", f"mlflow.tracking_uri={uri}",
    )  # fmt: skip
    assert f"[train] done: {TRAIN_STEPS} steps" in train.stdout + train.stderr  # the job's log, streamed
    assert (run_dir / "export" / "model_index.json").is_file()
    train_state = json.loads((run_dir / "train.json").read_text())
    assert train_state["mlflow"]["tracking_uri"] == uri

    _submit(
        ray_head,
        "chain-evaluate",
        "jobs.evaluate",
        "--model", str(run_dir / "export"),
        "--data", str(decomposed),
        "--output", str(evaluated),
        "--num-samples", "2",
        "--set", "steps=2",
        "--set", "workers=1",
        "--set", "batch_size=2",
        "--set", "grid_rows=2",
        "--set", "benchmark.enabled=off",
    )  # fmt: skip
    assert pq.read_table(evaluated / "metrics.parquet").num_rows > 0
    assert "palette" in (evaluated / "results.md").read_text()
    eval_run_id = json.loads((evaluated / "evaluate.json").read_text())["mlflow"]["run_id"]

    # the MLflow store: the training run finished with its loss curve, the evaluation nested under it
    client = MlflowClient(uri)
    train_run = client.get_run(train_state["mlflow"]["run_id"])
    assert train_run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(train_run.info.run_id, "loss")] == [2, 4]
    eval_run = client.get_run(eval_run_id)
    assert eval_run.info.status == "FINISHED"
    assert eval_run.data.tags.get("mlflow.parentRunId") == train_run.info.run_id
    assert eval_run.info.experiment_id == train_run.info.experiment_id

    # and the cluster ran exactly these three, as jobs
    listed = subprocess.run(
        [RAY, "job", "list"], cwd=ROOT, env=ray_head.env, capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    jobs = dict(re.findall(r"submission_id='([^']+)'.*?status=<JobStatus\.(\w+)", listed.stdout))
    assert jobs == {
        "chain-decompose": "SUCCEEDED",
        "chain-train": "SUCCEEDED",
        "chain-evaluate": "SUCCEEDED",
    }, listed.stdout[-3000:]
