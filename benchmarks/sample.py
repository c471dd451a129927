"""Sampling speed: ``ComposerPipeline`` with two-set guidance against a plain diffusers CFG loop.

    python benchmarks/sample.py [--preset tiny] [--batch 4] [--steps 50] [--repeats 4]
                                [--device auto|cpu|cuda] [--dtype float32|bfloat16] [--compile]
    python benchmarks/sample.py --gpu-suite     # CUDA: presets small and base, bf16 (+ compile)

Same model, same run, one process. Both sample 64×64 images in ``--steps`` DDIM steps with two
UNet branches per step, batched into one forward of 2·B rows:

  ours   ``ComposerPipeline.__call__`` end to end: one image's conditions (caption, palette,
         semantics image, sketch, depth) repeated for B samples, set guidance (Composer Eq. 2)
         from c1 = {sketch} towards c2 = {sketch, caption, palette, semantics, depth} with ω = 3,
         condition encoding, the DDIM scheduler with x_0 clipping, decoding to uint8.
  theirs diffusers' ``StableDiffusionPipeline`` denoising loop with the *same* UNet module
         (``model.unet``): ``torch.cat([latents] * 2)``, ``scale_model_input``, the UNet with
         precomputed random context and class-label tensors of our encoded shapes and the local
         condition channels filled with a fixed tensor (so the UNet does identical work),
         ``chunk``, ``uncond + g · (cond − uncond)``, ``DDIMScheduler.step`` with our scheduler
         config; then (x / 2 + 0.5) clamped to uint8, as diffusers' pixel-space pipelines.

Goal: ours ≥ 0.9 × theirs in images/s (``ratio``). Each figure is the median of ``--repeats``
runs that alternate ours/theirs (which goes first alternates too), after a 3-step warm-up run of
each (with ``--compile`` that is when the UNet compiles). Everything runs under
``torch.inference_mode``, progress bars off. Models are randomly initialised: the work per step
does not depend on the weights. ``--gpu-suite`` takes minutes per preset (``base`` compiles
twice); ``--suite-presets`` runs one at a time. Prints one JSON object on stdout; progress on
stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import DDIMScheduler  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from benchmarks.machine import cpu_name  # noqa: E402
from models import build_model  # noqa: E402
from pipelines.diffusion.guidance import Guidance  # noqa: E402
from pipelines.diffusion.pipeline import ComposerPipeline  # noqa: E402
from pipelines.diffusion.schedulers import default_scheduler

GUIDANCE_SCALE = 3.0
BASE = frozenset({"sketch"})  # c1
TARGET = frozenset({"sketch", "caption", "palette", "semantics", "depth"})  # c2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def conditions(size: int, seed: int = 0) -> dict:
    """One image's conditions, as the decomposition job stores them (pipelines/diffusion/inputs.py)."""
    rng = np.random.default_rng(seed)
    palette = rng.random(156)
    return {
        "text": "a red circle above a blue square on a grey floor",
        "palette": (palette / palette.sum()).astype(np.float32),
        "semantics.image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "sketch": ((rng.random((size, size)) > 0.8) * 255).astype(np.uint8),
        "depth": rng.integers(0, 256, (size, size), dtype=np.uint8),
    }


class Baseline:
    """diffusers' StableDiffusionPipeline denoising loop with standard CFG over ``unet``."""

    def __init__(self, pipe: ComposerPipeline, shapes: dict[str, tuple[int, ...]], batch: int, seed: int = 0):
        model = pipe.unet
        self.unet, self.device, self.dtype = model.unet, model.device, model.dtype
        self.latent_shape = (
            batch,
            model.config.image_channels,
            model.config.sample_size,
            model.config.sample_size,
        )
        # The pipeline's scheduler for pixel space ("clip" thresholding), so both do the same step.
        self.scheduler = DDIMScheduler.from_config(
            pipe.scheduler.config, clip_sample=True, thresholding=False
        )
        g = torch.Generator("cpu").manual_seed(seed)
        # Random stand-ins for the text encoder's output, shaped like our encoded conditions.
        self.context = torch.randn(shapes["context"], generator=g).to(self.device, self.dtype)
        self.class_labels = torch.randn(shapes["embedding"], generator=g).to(self.device, self.dtype)
        self.local = torch.randn(shapes["local"], generator=g).to(self.device, self.dtype)

    def __call__(self, num_inference_steps: int, seed: int = 0) -> np.ndarray:
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = randn_tensor(self.latent_shape, generator=generator, device=torch.device("cpu"))
        latents = latents.to(self.device, self.dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        for t in self.scheduler.timesteps:
            latent_model_input = torch.cat([latents] * 2)
            latent_model_input = self.scheduler.scale_model_input(latent_model_input, t)
            latent_model_input = torch.cat([latent_model_input, self.local], dim=1)
            noise_pred = self.unet(
                latent_model_input,
                t,
                encoder_hidden_states=self.context,
                class_labels=self.class_labels,
                return_dict=False,
            )[0]
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + GUIDANCE_SCALE * (noise_pred_text - noise_pred_uncond)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        image = (latents / 2 + 0.5).clamp(0, 1)
        return (image.float() * 255).round().permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()


def build(preset: str, device: torch.device, dtype: torch.dtype, compile_unet: bool) -> ComposerPipeline:
    torch.manual_seed(0)
    model = build_model(preset).to(device, dtype).eval()
    if compile_unet:
        model.unet.compile()  # in place: ours and theirs call the same compiled module
    pipe = ComposerPipeline(unet=model, scheduler=default_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def compare(
    preset: str,
    batch: int,
    steps: int,
    repeats: int,
    device: torch.device,
    dtype: torch.dtype,
    compile_unet: bool,
) -> dict:
    """Warm-up, then ``repeats`` alternating runs of ours and theirs; medians."""
    pipe = build(preset, device, dtype, compile_unet)
    conds = conditions(pipe.image_size)
    guide = Guidance(BASE, ((TARGET, GUIDANCE_SCALE),))
    encoded = pipe.encode_conditions(conds, guide, batch)
    shapes = {k: tuple(getattr(encoded, k).shape) for k in ("context", "embedding", "local")}
    baseline = Baseline(pipe, shapes, batch)

    def ours(n: int = steps) -> np.ndarray:
        return pipe(conds, guidance=guide, num_inference_steps=n, num_images=batch, seed=0).images

    def theirs(n: int = steps) -> np.ndarray:
        return baseline(n, seed=0)

    # Warm-up: lazy initialisation, oneDNN primitives / cuBLAS handles, torch.compile traces. A
    # few steps run every code path, and the work of a step does not depend on its index.
    log(f"{preset} batch {batch} {str(dtype)[6:]} compile={compile_unet} on {device}: warm-up")
    warm = min(steps, 3)
    t_warm = {"ours": timed(lambda: ours(warm), device), "theirs": timed(lambda: theirs(warm), device)}
    if ours(1).shape != theirs(1).shape:
        raise RuntimeError(f"ours makes {ours(1).shape} images, theirs {theirs(1).shape}")
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    for r in range(repeats):
        # Alternate which goes first, so drift (other load, clocks) hits both alike.
        order = (("ours", ours), ("theirs", theirs)) if r % 2 == 0 else (("theirs", theirs), ("ours", ours))
        for name, fn in order:
            times[name].append(timed(fn, device))
        log(f"  repeat {r + 1}/{repeats}: ours {times['ours'][-1]:.3f} s, theirs {times['theirs'][-1]:.3f} s")
    med = {k: statistics.median(v) for k, v in times.items()}
    # Our one-off work, measured alone: condition encoding (every branch) and guidance combine.
    t_encode = statistics.median(
        timed(lambda: pipe.encode_conditions(conds, guide, batch), device) for _ in range(5)
    )
    eps = torch.randn(2 * batch, *baseline.latent_shape[1:], device=device, dtype=dtype)
    t_combine = statistics.median(timed(lambda: guide.combine(eps), device) for _ in range(20))
    return {
        "preset": preset,
        "batch": batch,
        "unet_rows_per_step": 2 * batch,
        "dtype": str(dtype).removeprefix("torch."),
        "compile": compile_unet,
        "parameters": sum(p.numel() for p in pipe.unet.parameters()),
        "ours_ips": round(batch / med["ours"], 3),
        "theirs_ips": round(batch / med["theirs"], 3),
        "ratio": round(med["theirs"] / med["ours"], 3),
        # Each repeat's pair run back to back: less sensitive to load that changes between repeats.
        "ratio_pairs_median": round(
            statistics.median(b / a for a, b in zip(times["ours"], times["theirs"], strict=True)), 3
        ),
        "ours_latency_s": round(med["ours"], 4),
        "theirs_latency_s": round(med["theirs"], 4),
        "ours_runs_s": [round(t, 4) for t in times["ours"]],
        "theirs_runs_s": [round(t, 4) for t in times["theirs"]],
        "warmup_s": {k: round(v, 3) for k, v in t_warm.items()},
        "overhead": {
            "encode_conditions_ms": round(t_encode * 1e3, 3),
            "encode_share_of_ours": round(t_encode / med["ours"], 4),
            "guidance_combine_ms_per_step": round(t_combine * 1e3, 4),
            "combine_share_of_ours": round(t_combine * steps / med["ours"], 4),
        },
    }


def gpu_suite(steps: int, repeats: int, presets: list[str]) -> dict:
    """bf16 and bf16 + torch.compile, batch 1 and 64, for each preset (CUDA only)."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device: the GPU suite needs one (torch.cuda.is_available() is False)"}
    device, results = torch.device("cuda"), []
    for preset in presets:
        for compile_unet in (False, True):
            for batch in (1, 64):
                torch._dynamo.reset()  # a fresh compile per batch size: no dynamic-shape kernels
                results.append(compare(preset, batch, steps, repeats, device, torch.bfloat16, compile_unet))
                torch.cuda.empty_cache()
    return {"gpu": torch.cuda.get_device_name(device), "runs": results}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="model preset; default tiny on CPU, small on CUDA")
    p.add_argument("--batch", type=int, default=None, help="images per call; default 4 on CPU, 64 on CUDA")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=4, help="timed runs of each, alternating")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (used by both)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads; default all cores")
    p.add_argument("--gpu-suite", action="store_true", help="CUDA: bf16 (+compile), batch 1 and 64")
    p.add_argument("--suite-presets", default="small,base", help="presets of --gpu-suite, comma-separated")
    args = p.parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    diffusers_logging.set_verbosity_error()  # its dtype-cast notice is not a result
    out: dict = {
        "benchmark": "sample",
        "machine": {
            "cpu": cpu_name(),
            "torch_threads": threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "weights": "random init: sampling work does not depend on the weights",
        "resolution": 64,
        "steps": args.steps,
        "guidance": {"c1": sorted(BASE), "c2": sorted(TARGET), "weight": GUIDANCE_SCALE, "branches": 2},
        "baseline": "diffusers StableDiffusionPipeline-style CFG loop, same UNet module, same scheduler config",
        "goal_ratio": 0.9,
        "loadavg_1min_before": round(os.getloadavg()[0], 2),
    }
    with torch.inference_mode():
        if args.gpu_suite:
            out["gpu_suite"] = gpu_suite(args.steps, args.repeats, args.suite_presets.split(","))
        else:
            cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
            if cuda and not torch.cuda.is_available():
                raise SystemExit("--device cuda: no CUDA device is available")
            device = torch.device("cuda" if cuda else "cpu")
            preset = args.preset or ("small" if cuda else "tiny")
            batch = args.batch or (64 if cuda else 4)
            run = compare(preset, batch, args.steps, args.repeats, device, DTYPES[args.dtype], args.compile)
            out["device"] = torch.cuda.get_device_name(device) if cuda else "cpu"
            out.update(run)
            out["goal_met"] = run["ratio"] >= 0.9
    # Other processes share the CPU on a development VM: a high load average explains noisy runs.
    out["loadavg_1min_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
