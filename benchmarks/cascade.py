"""Cascade speed: time per stage of a cascade sample, and an upsampler's training step.

    python benchmarks/cascade.py [--base-preset tiny] [--upsampler-preset upsampler-tiny]
        [--base-side 32] [--factor 2] [--batch 4] [--base-steps 50] [--upsampler-steps 20]
        [--train-batch 16] [--train-steps 5] [--repeats 3] [--device auto|cpu|cuda]
    python benchmarks/cascade.py --gpu-suite   # CUDA: base 64 px (small) -> upsampler-small 64→256

One process, randomly initialised models (the work per step does not depend on the weights):

  stages  ``Cascade`` sampling ``--batch`` images from a caption and a sketch: the base at
          ``--base-side`` (``--base-steps``, two-branch guidance), then the upsampler ×``--factor``
          (``--upsampler-steps``); seconds per stage (median of ``--repeats``) and the upsampler's
          share of the total.
  train   an upsampler's training step (``diffusion_loss`` with its low-resolution input, all
          conditions present, backward, AdamW) in images/s, against the same step of the *base*
          preset's architecture at the same side with the same input (``theirs``): what the
          Efficient-U-Net-style preset (attention only at the lowest level) buys. ``ratio`` =
          ours / theirs.

Prints one JSON object on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import build_model, random_inputs  # noqa: E402
from models.objective import diffusion_loss  # noqa: E402
from pipelines.diffusion.cascade import Cascade, StageInputs  # noqa: E402
from pipelines.diffusion.pipeline import ComposerPipeline  # noqa: E402
from pipelines.diffusion.schedulers import default_scheduler  # noqa: E402

log = logging.getLogger("bench")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def stage_times(args: argparse.Namespace, device: str) -> dict:
    base = ComposerPipeline(
        build_model(args.base_preset, sample_size=args.base_side).eval(), default_scheduler()
    )
    side = args.base_side * args.factor
    up_model = build_model(args.upsampler_preset, sample_size=side, upsample_factor=args.factor).eval()
    up = ComposerPipeline(up_model, default_scheduler())
    cascade = Cascade([base.to(device), up.to(device)])
    for p in cascade.stages:
        p.set_progress_bar_config(disable=True)

    def inputs(steps: tuple[int, int]) -> list[StageInputs]:
        out = []
        for s, n in zip((args.base_side, side), steps, strict=True):
            sketch = (np.eye(s) * 255).astype(np.uint8)
            out.append(StageInputs({"text": "a red circle", "sketch": sketch}, 3.0, n))
        return out

    with torch.inference_mode():
        cascade(inputs((2, 2)), args.batch)  # warm-up
        runs = []
        for _ in range(args.repeats):
            sync(device)
            outs = cascade(inputs((args.base_steps, args.upsampler_steps)), args.batch)
            runs.append([o.seconds for o in outs])
    per_stage = [statistics.median(r[i] for r in runs) for i in range(2)]
    return {
        "batch": args.batch,
        "stages": [
            {
                "preset": args.base_preset,
                "side": args.base_side,
                "steps": args.base_steps,
                "seconds": round(per_stage[0], 3),
            },
            {
                "preset": args.upsampler_preset,
                "side": side,
                "steps": args.upsampler_steps,
                "seconds": round(per_stage[1], 3),
            },
        ],
        "upsampler_share": round(per_stage[1] / sum(per_stage), 3),
    }


def train_rate(preset: str, side: int, factor: int, args: argparse.Namespace, device: str) -> float:
    model = build_model(preset, sample_size=side, upsample_factor=factor).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    sched = default_scheduler()
    g = torch.Generator().manual_seed(0)
    x0, cond, presence = random_inputs(model, args.train_batch, g)
    x0, presence = x0.to(device), presence.to(device)
    cond = cond.to(device)

    def step() -> None:
        loss = diffusion_loss(model, sched, x0, cond, presence, g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rates = []
    for _ in range(args.repeats):
        step()  # warm-up
        sync(device)
        t = time.perf_counter()
        for _ in range(args.train_steps):
            step()
        sync(device)
        rates.append(args.train_batch * args.train_steps / (time.perf_counter() - t))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-preset", default="tiny")
    p.add_argument("--upsampler-preset", default="upsampler-tiny")
    p.add_argument("--base-side", type=int, default=32)
    p.add_argument("--factor", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--base-steps", type=int, default=50)
    p.add_argument("--upsampler-steps", type=int, default=20)
    p.add_argument("--train-batch", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--gpu-suite", action="store_true", help="small 64 px base -> upsampler-small 64→256 on CUDA"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    if args.gpu_suite:
        args.base_preset, args.upsampler_preset, args.base_side, args.factor = (
            "small",
            "upsampler-small",
            64,
            4,
        )
        args.batch, args.train_batch, args.train_steps, args.device = 8, 32, 10, "cuda"
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    torch.manual_seed(0)
    log.info(
        "stage times: %s %dpx -> %s x%d", args.base_preset, args.base_side, args.upsampler_preset, args.factor
    )
    result = {
        "benchmark": "cascade",
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        **stage_times(args, device),
    }
    side = args.base_side * args.factor
    log.info("training step at %dpx: %s against %s", side, args.upsampler_preset, args.base_preset)
    ours = train_rate(args.upsampler_preset, side, args.factor, args, device)
    theirs = train_rate(args.base_preset, side, args.factor, args, device)
    result["train"] = {
        "side": side,
        "batch": args.train_batch,
        "ours": {"preset": args.upsampler_preset, "images_per_s": round(ours, 2)},
        "theirs": {"preset": args.base_preset, "images_per_s": round(theirs, 2)},
        "ratio": round(ours / theirs, 3),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
