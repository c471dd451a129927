"""A LAION-scale decomposition on paper: CPUs per GPU, images/s per node, node-hours, cost and
storage per billion images, from this machine's measured figures and published GPU rates.

    python benchmarks/decompose_plan.py --measured 256=runs/bench/decompose-256.json \\
        --measured 512=runs/bench/decompose-512.json [--node-gpus 8 --node-cpus 96 --node-price 32.77]
        [--cpu-price 0.0425] [--storage-price 0.023] [--json]

Each ``--measured R=FILE`` is the JSON ``benchmarks/decompose.py --resolution R`` printed: its
single-core kernel (decode + the no-weights CPU extractors, ``b_cpu_extractors_ips``), the job's
efficiency against it (``job.ratio_marginal_over_cpus_x_kernel``: what the Ray job gets out of a
CPU) and the bytes per row of its shards. A resolution measured without the job uses the
efficiency of another resolution's run (said in the output).

The GPU stages are the published rates in ``GPU_STAGES``, each with its source; the prices are
on-demand list prices (flags to change them). Prints Markdown tables (or ``--json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GpuStage:
    name: str
    ips: dict[int, float]  # images/s per GPU at each stored resolution
    source: str
    columns: dict[int, float]  # bytes per row it adds to a shard (float16 / uint8, uncompressed)


# Published rates. The CLIP and depth models read a fixed input size (224, 384), so their rate
# does not depend on the stored resolution; the VAE encodes the stored image itself (~4× the
# work at 512 px than at 256 px).
GPU_STAGES = (
    GpuStage(
        "semantics + caption (CLIP ViT-L/14)",
        {256: 312.0, 512: 312.0},
        "clip-retrieval's inference figure on 8×A100, ~312 images/s per A100 (as issue 21 cites it); "
        "the text tower is cheaper per row and is not added",
        # image embedding 768 + pooled text 768 + text token states 77×768, float16
        {256: 2 * (768 + 768 + 77 * 768), 512: 2 * (768 + 768 + 77 * 768)},
    ),
    GpuStage(
        "depth (MiDaS v2.1 large, 384 px)",
        {256: 59.0, 512: 59.0},
        "59 FPS on an RTX 2080 Ti, batch 1 (MiDaS README); no A100 figure is published, so this is a floor",
        {256: 256 * 256, 512: 512 * 512},  # one uint8 map, before compression
    ),
    GpuStage(
        "latents (SD VAE encoder)",
        {256: 344.0, 512: 91.0},
        "derived from mosaicml/diffusion's README (SD-2 base, 8×A100: U-Net 1,100 images/s at 256 px and 290 at "
        "512 px with precomputed latents; 1.4× the time when the VAE and CLIP latents are computed while "
        "training): U-Net rate / (0.4 × 8) → ~344 images/s per A100 at 256 px, ~91 at 512 px for the VAE "
        "and the CLIP text encoder together, the VAE assumed to be all of it (a floor)",
        {256: 2 * 4 * 32 * 32, 512: 2 * 4 * 64 * 64},
    ),
)


def load(measured: list[str]) -> dict[int, dict]:
    out = {}
    for item in measured:
        r, _, path = item.partition("=")
        out[int(r)] = json.loads(Path(path).read_text())
    return out


def plan(
    figures: dict[int, dict],
    node_gpus: int,
    node_cpus: int,
    node_price: float,
    cpu_price: float,
    storage_price: float,
) -> dict:
    with_job = {r: f["job"] for r, f in figures.items() if "job" in f}
    if not with_job:
        raise SystemExit(
            "no --measured file has the job's figures (run benchmarks/decompose.py without --no-ray)"
        )
    rows = []
    for r, f in sorted(figures.items()):
        kernel = f["b_cpu_extractors_ips"]
        source = r if r in with_job else min(with_job, key=lambda k: abs(k - r))
        job = with_job[source]
        eff = job["ratio_marginal_over_cpus_x_kernel"]
        per_cpu = kernel * eff  # images/s the job gets out of one CPU
        stored = f.get("job", {}).get("shard_bytes_per_row", {}).get("file")
        gpu_rate = 1.0 / sum(1.0 / s.ips[r] for s in GPU_STAGES)  # the three on one GPU, in turn
        node_ips = min(node_gpus * gpu_rate, node_cpus * per_cpu)
        node_hours = 1e9 / node_ips / 3600
        extra = sum(s.columns[r] for s in GPU_STAGES)
        row = {
            "resolution": r,
            "kernel_ips_per_core": kernel,
            "job_efficiency": eff,
            "efficiency_measured_at": source,
            "job_ips_per_cpu": round(per_cpu, 1),
            "cpus_per_gpu": {s.name: round(s.ips[r] / per_cpu, 2) for s in GPU_STAGES},
            "all_three_gpu_ips": round(gpu_rate, 1),
            "cpus_per_gpu_all_three": round(gpu_rate / per_cpu, 2),
            "node_ips": round(node_ips, 1),
            "node_bound_by": "GPU" if node_gpus * gpu_rate <= node_cpus * per_cpu else "CPU",
            "node_hours_per_billion": round(node_hours),
            "cost_per_billion_usd": round(node_hours * node_price),
            "cpu_only_vcpu_hours_per_billion": round(1e9 / per_cpu / 3600),
            "cpu_only_cost_per_billion_usd": round(1e9 / per_cpu / 3600 * cpu_price),
            "stored_bytes_per_row_cpu_set": stored,
            "stored_bytes_per_row_model_columns": extra,
        }
        if stored:
            tb = (stored + extra) * 1e9 / 1e12
            row["storage_tb_per_billion"] = round(tb, 1)
            row["storage_usd_per_month_per_billion"] = round(tb * 1000 * storage_price)
        rows.append(row)
    return {
        "node": {"gpus": node_gpus, "cpus": node_cpus, "usd_per_hour": node_price},
        "cpu_usd_per_vcpu_hour": cpu_price,
        "storage_usd_per_gb_month": storage_price,
        "gpu_stages": [{"name": s.name, "ips": s.ips, "source": s.source} for s in GPU_STAGES],
        "rows": rows,
    }


def markdown(p: dict) -> str:
    n = p["node"]
    lines = [
        f"Node: {n['gpus']} GPUs, {n['cpus']} vCPUs, ${n['usd_per_hour']}/h; CPU-only: "
        f"${p['cpu_usd_per_vcpu_hour']}/vCPU-h; storage ${p['storage_usd_per_gb_month']}/GB-month.",
        "",
        "| stored side | CPU kernel, img/s/core | job efficiency | job img/s per CPU | "
        + " | ".join(f"CPUs per GPU: {s['name']}" for s in p["gpu_stages"])
        + " | CPUs per GPU, all three | node img/s (bound) | node-hours / 10⁹ | $ / 10⁹ (GPU nodes) "
        "| $ / 10⁹ (CPU set only) | TB / 10⁹ stored | $ / month / 10⁹ stored |",
        "|" + "---|" * (11 + len(p["gpu_stages"])),
    ]
    for r in p["rows"]:
        cells = [
            f"{r['resolution']} px",
            f"{r['kernel_ips_per_core']:.0f}",
            f"{r['job_efficiency']:.2f}" + ("" if r["efficiency_measured_at"] == r["resolution"] else "*"),
            f"{r['job_ips_per_cpu']:.0f}",
            *(f"{v:.1f}" for v in r["cpus_per_gpu"].values()),
            f"{r['cpus_per_gpu_all_three']:.1f}",
            f"{r['node_ips']:.0f} ({r['node_bound_by']})",
            f"{r['node_hours_per_billion']:,}",
            f"{r['cost_per_billion_usd']:,}",
            f"{r['cpu_only_cost_per_billion_usd']:,}",
            f"{r.get('storage_tb_per_billion', '–')}",
            f"{r.get('storage_usd_per_month_per_billion', '–'):,}" if "storage_tb_per_billion" in r else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "GPU rates:"]
    lines += [f"- {s['name']}: {s['ips']} images/s per GPU — {s['source']}" for s in p["gpu_stages"]]
    return "\n".join(lines)


def main() -> int:
    a = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a.add_argument("--measured", action="append", required=True, metavar="R=FILE")
    a.add_argument("--node-gpus", type=int, default=8)
    a.add_argument("--node-cpus", type=int, default=96)
    a.add_argument("--node-price", type=float, default=32.77, help="USD/h (AWS p4d.24xlarge on demand)")
    a.add_argument("--cpu-price", type=float, default=0.0425, help="USD per vCPU-hour (AWS c6i on demand)")
    a.add_argument("--storage-price", type=float, default=0.023, help="USD per GB-month (S3 standard)")
    a.add_argument("--json", action="store_true")
    args = a.parse_args()
    p = plan(
        load(args.measured),
        args.node_gpus,
        args.node_cpus,
        args.node_price,
        args.cpu_price,
        args.storage_price,
    )
    print(json.dumps(p, indent=2) if args.json else markdown(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
