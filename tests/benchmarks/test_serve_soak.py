"""``benchmarks/serve_soak.py`` end to end on its mix three times: every valid request answered,
every invalid one refused with its code, memory read from both replicas (no timings asserted).

The benchmark starts (and shuts down) a Ray of its own, so it runs in a fresh interpreter.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_soak_answers_every_request_as_expected():
    args = ["--requests", "81", "--window", "27", "--concurrency", "8", "--steps", "1"]  # the mix 3 times
    code = f"from benchmarks.serve_soak import main; raise SystemExit(main({args!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=900)
    out = json.loads(proc.stdout)  # stdout holds the JSON alone (Ray's output goes to stderr)
    assert out["requests"] == 81 and out["valid"]["count"] == 39 and out["invalid"]["count"] == 42
    assert out["valid"]["failures"] == 0, out["valid"]["failed"]
    assert out["invalid"]["mismatches"] == 0, out["invalid"]["mismatched"]
    assert set(out["rss_mb"]) == {"ComposerServer", "Ingress"}
    assert all(v["first"] > 50 for v in out["rss_mb"].values())  # real processes were read
    assert out["passed"] is (proc.returncode == 0)
