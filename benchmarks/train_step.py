"""Training-step speed: ``ComposerModel`` against a plain diffusers ``UNet2DConditionModel``.

    python benchmarks/train_step.py [--preset base] [--batch 64] [--steps 20] [--warmup 5] [--repeats 3]
                                    [--device auto|cpu|cuda] [--dtype float32|bfloat16] [--compile]
    python benchmarks/train_step.py --gpu-suite   # CUDA: base, bf16, eager and compiled, batch 64 or less

One process, one model on the device at a time, model-only (the batch is already on the device):

  ours   a full training step of ``ComposerModel``: ``models.objective.diffusion_loss`` (noise and
         timesteps drawn on the CPU, ``add_noise`` with the pipeline's scheduler, the forward that
         encodes the conditions and runs the UNet, MSE), backward, AdamW step, zero_grad. All eight
         conditions are present in every row (random inputs of the model's shapes; no dropout):
         every encoder and local stem runs, the most work a step can do.
  theirs the same step for a plain ``UNet2DConditionModel`` built from ``model.unet.config`` with
         in/out channels = the image channels (no local-condition channels) and no class
         embedding, fed random ``encoder_hidden_states`` of the shape our encoder makes (caption
         tokens + semantics and palette tokens), as diffusers' train_text_to_image.py with
         precomputed text states.

bfloat16 is the usual mixed-precision recipe: fp32 master weights, forward and loss under
``torch.autocast(dtype=torch.bfloat16)``, backward outside it, no grad scaler. Same optimizer for
both: AdamW, lr 1e-4, fused on CUDA. FLOPs per step are counted once (forward + backward of one
step, not timed) with ``torch.utils.flop_counter.FlopCounterMode``; MFU is achieved / the device's
dense bf16 peak (bf16 runs on a device in ``PEAK_BF16_TFLOPS`` only, else null). Each repeat is
``--warmup`` untimed then ``--steps`` timed steps; figures are medians over ``--repeats``. Goal:
ours ≥ 0.9 × theirs in images/s (``ratio``). Models are randomly initialised: the work per step does
not depend on the weights. Prints one JSON object on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Literal

import diffusers
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from benchmarks.machine import cpu_name  # noqa: E402
from models import build_model, random_inputs  # noqa: E402
from models.objective import diffusion_loss  # noqa: E402
from pipelines.diffusion.schedulers import default_scheduler  # noqa: E402

GOAL_RATIO = 0.9
LEARNING_RATE = 1e-4
DTYPES = ("float32", "bfloat16")
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s. Matched in order
# against torch.cuda.get_device_name(): the first entry whose words all occur in the name wins.
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIe"), 756.0),
    (("H100", "NVL"), 835.5),
    (("H100",), 989.4),  # SXM ("NVIDIA H100 80GB HBM3")
    (("H200", "NVL"), 835.5),
    (("H200",), 989.4),
    (("A100",), 312.0),
)


log = logging.getLogger("bench")


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a CUDA device by its name; None for CPUs and devices not listed."""
    for words, peak in PEAK_BF16_TFLOPS:
        if all(w.lower() in device_name.lower() for w in words):
            return peak
    return None


def plain_unet(unet_config: dict, image_channels: int) -> UNet2DConditionModel:
    """Our UNet's architecture (``model.unet.config``) without the local-condition input channels
    and the class embedding that takes our global conditions."""
    return UNet2DConditionModel.from_config(
        unet_config, in_channels=image_channels, out_channels=image_channels, class_embed_type=None
    )


def plain_loss(
    unet: UNet2DConditionModel,
    scheduler: diffusers.SchedulerMixin,
    x0: torch.Tensor,
    context: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """``diffusion_loss`` line for line, for a UNet that takes only x_t, t and the context."""
    b = x0.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    t = t.to(x0.device)
    x_t = scheduler.add_noise(x0, noise, t)
    eps = unet(x_t, t, encoder_hidden_states=context, return_dict=False)[0]
    return torch.nn.functional.mse_loss(eps.float(), noise.float())


def architecture(unet: UNet2DConditionModel) -> dict:
    keys = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels")
    keys += ("layers_per_block", "cross_attention_dim", "class_embed_type")
    return {k: (list(v) if isinstance(v, tuple) else v) for k in keys for v in [unet.config[k]]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(
    trained: torch.nn.Module,
    unet: torch.nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    device: torch.device,
    dtype: str,
    compile_unet: bool,
    steps: int,
    warmup: int,
    repeats: int,
) -> dict:
    """FLOPs of one step, then ``repeats`` × (``warmup`` untimed + ``steps`` timed) AdamW steps."""

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    # CPU attention kernels are not in FlopCounterMode's registry; the math backend's matmuls are
    # (on CUDA the flash/efficient kernels are counted, and math would hold every attention matrix).
    with sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else nullcontext():
        with FlopCounterMode(display=False) as counter:
            with amp():
                loss = loss_fn()
            loss.backward()
    trained.zero_grad(set_to_none=True)
    if compile_unet:
        unet.compile()  # in place: the forward the step calls
    optimizer = torch.optim.AdamW(trained.parameters(), lr=LEARNING_RATE, fused=device.type == "cuda")

    def step() -> torch.Tensor:
        with amp():
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, first_step_s = [], None
    for r in range(repeats):
        for i in range(warmup):
            sync(device)
            t = time.perf_counter()
            step()
            sync(device)
            if r == 0 and i == 0:
                first_step_s = time.perf_counter() - t  # optimizer state, cuDNN search, compile
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            loss = step()
        sync(device)
        times.append(time.perf_counter() - t)
        log.info(f"  repeat {r + 1}/{repeats}: {times[-1] / steps * 1e3:.1f} ms per step")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "parameters": sum(p.numel() for p in trained.parameters()),
        "flops_per_step": counter.get_total_flops(),
        "times_s": times,
        "first_step_s": None if first_step_s is None else round(first_step_s, 3),
        "peak_memory_gib": None if peak is None else round(peak, 2),
        "final_loss": loss.item(),
    }


def _ours(preset, batch, device, dtype, compile_unet, steps, warmup, repeats) -> tuple[dict, tuple]:
    """Our step's figures, and what theirs needs: our UNet config, image channels, context shape."""
    torch.manual_seed(0)
    model = build_model(preset).to(device).train()
    g = torch.Generator().manual_seed(0)
    x0, conditions, presence = random_inputs(model, batch, g)
    x0, conditions, presence = x0.to(device), conditions.to(device), presence.to(device)
    with torch.no_grad():
        context_shape = tuple(model.encode(conditions, presence).context.shape)
    scheduler = default_scheduler()
    log.info(f"ours: {preset} batch {batch} {dtype} compile={compile_unet} on {device}")
    out = train_steps(
        model,
        model.unet,
        lambda: diffusion_loss(model, scheduler, x0, conditions, presence, g),
        device,
        dtype,
        compile_unet,
        steps,
        warmup,
        repeats,
    )
    out["unet_parameters"] = sum(p.numel() for p in model.unet.parameters())
    out["unet"] = architecture(model.unet)
    return out, (model.unet.config, model.config.image_channels, context_shape)


def _theirs(ours, batch, device, dtype, compile_unet, steps, warmup, repeats) -> dict:
    unet_config, channels, context_shape = ours
    torch.manual_seed(0)
    unet = plain_unet(unet_config, channels).to(device).train()
    g = torch.Generator().manual_seed(0)
    s = unet.config.sample_size
    x0 = (torch.rand(batch, channels, s, s, generator=g) * 2 - 1).to(device)
    context = torch.randn(context_shape, generator=g).to(device)
    scheduler = default_scheduler()
    log.info(f"theirs: plain UNet2DConditionModel, context {list(context_shape)}")
    out = train_steps(
        unet,
        unet,
        lambda: plain_loss(unet, scheduler, x0, context, g),
        device,
        dtype,
        compile_unet,
        steps,
        warmup,
        repeats,
    )
    out["unet"] = architecture(unet)
    return out


def _figures(run: dict, batch: int, steps: int, peak: float | None) -> dict:
    times = run.pop("times_s")
    step_s = statistics.median(times) / steps
    achieved = run["flops_per_step"] / step_s / 1e12
    return {
        **run,
        "images_per_s": round(batch / step_s, 3),
        "runs_images_per_s": [round(batch * steps / t, 3) for t in times],
        "step_ms": round(step_s * 1e3, 2),
        "achieved_tflops": round(achieved, 3),
        "mfu": None if peak is None else round(achieved / peak, 4),
    }


def run_step_benchmark(
    preset: str,
    batch: int,
    steps: int,
    warmup: int,
    device: Literal["auto", "cpu", "cuda"],
    dtype: Literal["float32", "bfloat16"],
    compile: bool,
    repeats: int,
) -> dict:
    """Ours then theirs (one model on the device at a time); images/s, FLOPs, MFU, ratio."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if min(batch, steps, repeats) < 1 or warmup < 0:
        raise ValueError("batch, steps and repeats must be >= 1 and warmup >= 0")
    cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda': no CUDA device is available")
    dev = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name(dev) if cuda else cpu_name()
    peak = peak_bf16_tflops(name) if cuda and dtype == "bfloat16" else None
    torch._dynamo.reset()  # a fresh compile per run: no kernels for another batch size
    args = (batch, dev, dtype, compile, steps, warmup, repeats)
    ours, shapes = _ours(preset, *args)
    gc.collect()  # ours' model and optimizer state go before theirs are made
    if cuda:
        torch.cuda.empty_cache()
    theirs = _theirs(shapes, *args)
    context_shape = shapes[2]
    ours, theirs = _figures(ours, batch, steps, peak), _figures(theirs, batch, steps, peak)
    ratio = ours["images_per_s"] / theirs["images_per_s"]
    return {
        "preset": preset,
        "batch": batch,
        "device": name if cuda else "cpu",
        "dtype": dtype,
        "precision": "bf16 autocast, fp32 master weights" if dtype == "bfloat16" else "fp32",
        "compile": compile,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "context_shape": list(context_shape),
        "peak_bf16_tflops": peak,
        "ours": ours,
        "theirs": theirs,
        "ratio": round(ratio, 3),
        "flops_ratio": round(ours["flops_per_step"] / theirs["flops_per_step"], 4),
        "goal_ratio": GOAL_RATIO,
        "goal_met": ratio >= GOAL_RATIO,
    }


def gpu_suite(preset: str, steps: int, warmup: int, repeats: int) -> dict:
    """bf16 eager then compiled, batch 64 halved on out-of-memory (CUDA only)."""
    runs, batch, tried = [], 64, []
    for compile_unet in (False, True):
        while True:
            tried.append({"batch": batch, "compile": compile_unet})
            try:
                runs.append(
                    run_step_benchmark(
                        preset, batch, steps, warmup, "cuda", "bfloat16", compile_unet, repeats
                    )
                )
                oom = False
            except torch.OutOfMemoryError:
                oom = True
            gc.collect()  # the exception's frames held both models; free them before the next try
            torch.cuda.empty_cache()
            if not oom:
                break
            log.info(f"out of memory at batch {batch}")
            if batch == 1:
                raise RuntimeError(f"{preset} does not train at batch 1 on this device")
            batch //= 2
    return {"gpu": torch.cuda.get_device_name(), "tried": tried, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="model preset; default base on CUDA, tiny on CPU")
    p.add_argument("--batch", type=int, default=None, help="images per step; default 64 on CUDA, 4 on CPU")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before each repeat's timed ones")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet forward (both)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads; default all cores")
    p.add_argument("--gpu-suite", action="store_true", help="CUDA: bf16 eager and compiled, batch ≤ 64")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    diffusers_logging.set_verbosity_error()
    out: dict = {
        "benchmark": "train_step",
        "machine": {
            "cpu": cpu_name(),
            "torch_threads": threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        },
        "weights": "random init: the work of a step does not depend on the weights",
        "presence": "all 8 conditions present in every row (no dropout)",
        "optimizer": f"AdamW lr {LEARNING_RATE} (fused on CUDA), zero_grad(set_to_none=True)",
        "baseline": "plain UNet2DConditionModel of model.unet's config: image in/out channels, no class embedding",
    }
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if (args.gpu_suite or cuda) and not torch.cuda.is_available():
        out["error"] = "no CUDA device (torch.cuda.is_available() is False)"
        print(json.dumps(out, indent=2))
        return 2
    if args.gpu_suite:
        out["gpu_suite"] = gpu_suite(args.preset or "base", args.steps, args.warmup, args.repeats)
    else:
        preset = args.preset or ("base" if cuda else "tiny")
        batch = args.batch or (64 if cuda else 4)
        dtype = args.dtype or ("bfloat16" if cuda else "float32")
        out.update(
            run_step_benchmark(
                preset, batch, args.steps, args.warmup, args.device, dtype, args.compile, args.repeats
            )
        )
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
