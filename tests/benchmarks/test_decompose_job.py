"""``benchmarks/decompose.py``'s job figures (busy fraction, the GPU stand-in through the real
job) and ``benchmarks/decompose_plan.py``'s arithmetic."""

from __future__ import annotations

import json

import pytest

from benchmarks import decompose, decompose_plan


def test_busy_fraction_skips_the_warm_up_and_counts_gaps(tmp_path):
    calls = tmp_path / "calls.txt"
    # 10 calls of 10 images, 1 s busy each; after the first (warm-up), gaps of 1 s between calls
    lines = ["0 1 10"] + [f"{2 * i} {2 * i + 1} 10" for i in range(1, 10)]
    calls.write_text("\n".join(lines) + "\n")
    busy, rate, seen = decompose.busy_fraction(calls, warmup=0.1)
    assert seen == 100
    assert busy == pytest.approx(9 / 17)  # from t = 2 to t = 19: 9 busy seconds
    assert rate == pytest.approx(90 / 17)


def _figures(kernel: float, eff: float, stored: float) -> dict:
    return {
        "b_cpu_extractors_ips": kernel,
        "job": {"ratio_marginal_over_cpus_x_kernel": eff, "shard_bytes_per_row": {"file": stored}},
    }


def test_the_plan_follows_from_the_measured_figures():
    p = decompose_plan.plan({256: _figures(200.0, 0.5, 100_000.0)}, 8, 96, 32.0, 0.05, 0.02)
    (row,) = p["rows"]
    per_cpu = 100.0
    assert row["job_ips_per_cpu"] == per_cpu
    clip = next(s for s in decompose_plan.GPU_STAGES if s.name.startswith("semantics"))
    assert row["cpus_per_gpu"][clip.name] == round(clip.ips[256] / per_cpu, 2)
    gpu = 1 / sum(1 / s.ips[256] for s in decompose_plan.GPU_STAGES)
    assert row["node_ips"] == round(min(8 * gpu, 96 * per_cpu), 1)
    assert row["node_hours_per_billion"] == round(1e9 / min(8 * gpu, 96 * per_cpu) / 3600)
    assert row["cpu_only_cost_per_billion_usd"] == round(1e9 / per_cpu / 3600 * 0.05)
    extra = sum(s.columns[256] for s in decompose_plan.GPU_STAGES)
    assert row["storage_tb_per_billion"] == round((100_000 + extra) * 1e9 / 1e12, 1)
    assert "| 256 px | 200 | 0.50 | 100 |" in decompose_plan.markdown(p)


def test_the_plan_needs_a_job_measurement(tmp_path):
    f = tmp_path / "b.json"
    f.write_text(json.dumps({"b_cpu_extractors_ips": 100.0}))
    with pytest.raises(SystemExit, match="job's figures"):
        decompose_plan.plan(decompose_plan.load([f"256={f}"]), 8, 96, 1.0, 1.0, 1.0)


@pytest.mark.slow
def test_the_stand_in_sits_in_the_real_job_and_sees_every_row():
    blobs = decompose.make_images(8)
    out = decompose.simulate_gpu(blobs, 64, 96, 2, "palette,intensity", 312.0, [8.0])
    (k,) = out["by_cpus_per_gpu"].values()
    assert k["standin_ips"] == 78.0 and 0 < k["busy_fraction"] <= 1 and k["steady_ips"] > 0
