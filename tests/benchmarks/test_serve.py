"""``benchmarks/serve.py`` end to end on tiny settings: the JSON's fields and no errors, no timings.

The benchmark starts (and shuts down) a Ray of its own, which cannot share a process with the
module's ``ray_local``; so ``main([...])`` runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--requests", "4", "--steps", "2", "--concurrency", "1,2", "--repeats", "1"]
ARGS += ["--model-cpus", "0.5"]


@pytest.fixture(scope="module")
def report() -> dict:
    code = f"from benchmarks.serve import main; raise SystemExit(main({ARGS!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)  # stdout holds the JSON alone (Ray's output goes to stderr)


def test_results_per_mode_and_concurrency(report):
    assert report["benchmark"] == "serve"
    assert report["machine"]["ray_cpus"] >= 2 and report["replica_torch_threads"]["torch_threads"] >= 1
    assert report["apps"]["batched"]["batching"]["enabled"] is True
    assert report["apps"]["unbatched"]["batching"]["enabled"] is False
    assert report["apps"]["batched"]["model_deployment"]["max_ongoing_requests"] >= 16
    for mode in ("batched", "unbatched"):
        assert report["warmup"][mode]["errors"] == 0
        for c in ("1", "2"):
            r = report["results"][mode][c]
            assert r["errors"] == 0, r["error_examples"]
            assert r["completed"] == 4 and r["requests_per_s"] > 0
            lat = r["latency_s"]
            assert 0 < lat["p50"] <= lat["p95"] <= lat["max"]
            assert len(r["requests_per_s_runs"]) == 1
            assert 1 <= r["batch_requests_mean"] <= r["batch_requests_max"] <= int(c)
    assert report["results"]["unbatched"]["2"]["batch_requests_max"] == 1  # no batching there
    assert report["errors_total"] == 0


def test_ratios_and_goal(report):
    res, ratios = report["results"], report["ratios"]
    for c in ("1", "2"):
        expected = res["batched"][c]["requests_per_s"] / res["unbatched"][c]["requests_per_s"]
        assert ratios["requests_per_s"][c] == pytest.approx(expected, rel=1e-2)
        assert ratios["p95_latency"][c] > 0 and ratios["requests_per_s_pairs_median"][c] > 0
    top = res["batched"]["2"]["requests_per_s"] > res["unbatched"]["2"]["requests_per_s"]
    assert report["goal_met"] is top
    assert "concurrency 2" in report["goal"]
