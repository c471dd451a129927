"""Latents speed: the ``latents`` extractor against a plain ``vae.encode(x).latent_dist.mean`` loop.

    python benchmarks/latents.py [--base DIR] [--device auto|cpu|cuda] [--batch-size 8] [--batches 8]
                                 [--resolution R] [--repeats 3] [--threads N]

One process, one VAE, the same uint8 batches (random pixels: the work does not depend on them),
the same device and dtype (bfloat16 on CUDA, float32 on the CPU, as the extractor chooses):

  ours    ``LatentsExtractor`` called on each batch, as a decomposition actor calls it: (B, R, R, 3)
          uint8 numpy in, (B, C, R/f, R/f) float16 numpy out, with its device transfers and its
          output check
  theirs  the loop diffusers' training scripts write, with its own copy of the VAE: the batch to
          a float tensor in [-1, 1], moved to the device, ``vae.encode(x).latent_dist.mean``
          under ``torch.no_grad()``, the result back on the CPU as float16 numpy (what a
          decomposition must store)

Each repeat runs one untimed batch of each, then times every one of the ``--batches`` batches with
ours and then theirs, one batch after the other (interleaved, so a busy machine slows both
alike); figures are the medians over ``--repeats`` of each side's total. Goal: ours ≥ 0.9 × theirs in images/s (``ratio``).
``--base`` defaults to the tiny random-init SD of ``tests/helpers/tiny_sd.py`` built in a
temporary directory (32 px); a Stable Diffusion 1.5 directory measures the real VAE (512 px).
Prints one JSON object on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.machine import cpu_name  # noqa: E402
from pipelines.conditions.backbone import load_base, resolve_base, vae_identity  # noqa: E402
from pipelines.conditions.latents import LatentsConfig, LatentsExtractor  # noqa: E402

log = logging.getLogger("bench")
GOAL = 0.9


def plain_encode(vae, images: np.ndarray, device: torch.device, dtype: torch.dtype) -> np.ndarray:
    """The baseline: one batch through ``vae.encode(x).latent_dist.mean``, back as float16 numpy."""
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0).to(device, dtype)
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    return mean.float().cpu().numpy().astype(np.float16)


def _interleaved(ours, theirs, batches: list[np.ndarray]) -> tuple[float, float]:
    """Seconds for ``ours`` and ``theirs`` over ``batches``, alternating batch by batch."""
    ours(batches[0])  # untimed: first-call allocations and kernel choices
    theirs(batches[0])
    totals = [0.0, 0.0]
    for b in batches:
        for i, fn in enumerate((ours, theirs)):
            t0 = time.perf_counter()
            fn(b)
            totals[i] += time.perf_counter() - t0
    return totals[0], totals[1]


def run_latents_benchmark(
    base: str,
    device: Literal["auto", "cpu", "cuda"],
    batch_size: int,
    batches: int,
    resolution: int | None = None,
    repeats: int = 3,
) -> dict:
    """Ours and theirs on the same batches; see the module docstring."""
    if batch_size < 1 or batches < 1 or repeats < 1:
        raise ValueError("batch_size, batches and repeats must be at least 1")
    vae_cfg = json.loads((resolve_base(base) / "vae" / "config.json").read_text())
    resolution = resolution or int(vae_cfg.get("sample_size", 512))
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    dev, dtype = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    ext = LatentsExtractor(LatentsConfig(base=base, device=dev.type), resolution)
    ext.prepare()  # loads its VAE: bfloat16 on CUDA, float32 on the CPU
    vae = load_base(base, ("vae",), dtype, dev.type).vae
    rng = np.random.default_rng(0)
    data = [rng.integers(0, 256, (batch_size, resolution, resolution, 3), np.uint8) for _ in range(batches)]
    ours_s, theirs_s = [], []
    for i in range(repeats):
        a, b = _interleaved(lambda x: ext({"image": x}), lambda x: plain_encode(vae, x, dev, dtype), data)
        ours_s.append(a)
        theirs_s.append(b)
        log.info(f"repeat {i + 1}/{repeats}: ours {ours_s[-1]:.3f}s, theirs {theirs_s[-1]:.3f}s")
    n = batch_size * batches
    ours, theirs = n / statistics.median(ours_s), n / statistics.median(theirs_s)
    same = ext({"image": data[0]})["latents"].astype(np.float32)
    ref = plain_encode(vae, data[0], dev, dtype).astype(np.float32)
    return {
        "base": base,
        "vae": vae_identity(base),
        "device": str(dev),
        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "dtype": str(dtype).removeprefix("torch."),
        "resolution": resolution,
        "latent_shape": list(ext.columns()[0].shape),
        "batch_size": batch_size,
        "batches": batches,
        "repeats": repeats,
        "ours": {
            "images_per_s": round(ours, 2),
            "s_per_batch": round(statistics.median(ours_s) / batches, 5),
        },
        "theirs": {
            "images_per_s": round(theirs, 2),
            "s_per_batch": round(statistics.median(theirs_s) / batches, 5),
        },
        "ratio": round(ours / theirs, 3),
        "goal": GOAL,
        "goal_met": ours / theirs >= GOAL,
        "max_abs_diff": float(np.abs(same - ref).max()),  # ours = theirs (the same computation)
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None, help="SD pipeline directory; default: a tiny random SD (temp dir)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch")
    p.add_argument("--batches", type=int, default=8, help="timed batches per repeat")
    p.add_argument("--resolution", type=int, default=None, help="default: the VAE's sample_size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads; default all cores")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    out: dict = {
        "benchmark": "latents",
        "machine": {
            "cpu": cpu_name(),
            "torch_threads": threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "weights": "given base" if args.base else "tiny random-init SD (tests/helpers/tiny_sd.py)",
    }
    if args.device == "cuda" and not torch.cuda.is_available():
        out["error"] = "no CUDA device (torch.cuda.is_available() is False)"
        print(json.dumps(out, indent=2))
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        base = args.base
        if base is None:
            from tests.helpers.tiny_sd import make_tiny_sd

            base = make_tiny_sd(Path(tmp) / "tiny-sd")
        out.update(
            run_latents_benchmark(
                base, args.device, args.batch_size, args.batches, args.resolution, args.repeats
            )
        )
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
