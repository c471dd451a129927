"""Training-step speed and memory of Composer on a pretrained Stable Diffusion UNet
(``ComposerModel.from_base``) against that UNet's own diffusers step.

    python benchmarks/base_step.py [--size sd15|tiny] [--batch 8] [--steps 20] [--warmup 5] [--repeats 3]
                                   [--device auto|cpu|cuda] [--gradient-checkpointing] [--lora-rank 0]
                                   [--variants plain full adapter full_online ...] [--threads N]
    python benchmarks/base_step.py --gpu-suite   # CUDA: SD 1.5 size at 512², bf16, batch 8 and 16

One UNet architecture (``--size sd15``: Stable Diffusion 1.5's, 860 M parameters, 64×64 latents =
512² images, 77×768 text states; ``tiny``: a two-level one for tests), randomly initialised — the
work of a step does not depend on the weights — in up to six variants:

  plain    the base ``UNet2DConditionModel`` step of diffusers' train_text_to_image.py with
           precomputed text states: latents noised with the base's scheduler, epsilon MSE.
  full     ``ComposerModel.from_base`` of the same UNet, every parameter trains: the step of
           ``models.objective.diffusion_loss`` with all eight conditions present in every row
           (random inputs of the model's shapes, maps at image resolution), so every encoder and
           local stem runs.
  adapter  the same, the base frozen: only ``models.backbone.is_new_parameter`` parameters train.
  adapter_lora  (``--lora-rank R`` > 0) the adapter with peft LoRA of rank R on the base's attention.
  full_online, adapter_online  (only when named in ``--variants``) full's or adapter's step that
           first encodes its batch, as training without a decomposition's stored inputs must: the
           images (B, 3, R, R) in [-1, 1] through a frozen ``AutoencoderKL`` of the size's VAE
           (``latent_dist.sample() * scaling_factor``) and random token ids (B, L) through a frozen
           ``CLIPTextModel`` of its text encoder (last hidden states -> caption tokens, pooled
           output -> caption sentence), both under ``torch.no_grad()`` inside the timed step.
           ``full/full_online`` (precomputed over online images/s) is what storing the latents
           and caption states saves (MosaicML measured online encoding costing 1.4×).

Every step is forward, backward, AdamW (lr 1e-4, fused on CUDA) over the trainable parameters,
zero_grad. CUDA: bf16 autocast with fp32 master weights (benchmarks/train_step.py's recipe), the
variants one after another in this process, peak memory ``torch.cuda.max_memory_allocated`` (reset
per variant), FLOPs of one step counted untimed for the MFU. CPU: fp32, each variant in a fresh
process, so the variants do not inherit each other's high-water mark: ``peak_memory_gib`` is its
peak RSS over the training steps (the kernel's mark reset once the model is built, as building
from a base holds the base and the new model at once), ``process_peak_memory_gib`` its
``ru_maxrss`` (build included), ``rss_at_start_gib`` its RSS before the model is built
(interpreter, libraries). Each repeat is ``--warmup`` untimed then ``--steps`` timed steps;
figures are medians over ``--repeats``. Goal: full and adapter ≥ 0.9 × plain in images/s (the
``ratios`` keys ``…/plain``; an online variant is compared with its precomputed one, no goal).
Prints one JSON object on stdout; progress on stderr. Model code only (no Ray, no MLflow): it runs
wherever torch, diffusers, transformers and peft do.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import diffusers
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

from benchmarks.machine import cpu_name  # noqa: E402
from benchmarks.train_step import (  # noqa: E402
    GOAL_RATIO,
    LEARNING_RATE,
    architecture,
    peak_bf16_tflops,
    plain_loss,
    sync,
)
from models import CONDITIONS, ComposerModel  # noqa: E402
from models.backbone import is_new_parameter  # noqa: E402
from models.composer import random_conditions  # noqa: E402
from models.conditioning import Conditions  # noqa: E402
from models.objective import diffusion_loss  # noqa: E402

VARIANTS = ("plain", "full", "adapter", "adapter_lora", "full_online", "adapter_online")
Variant = Literal["plain", "full", "adapter", "adapter_lora", "full_online", "adapter_online"]
DEFAULT_VARIANTS: tuple[Variant, ...] = ("plain", "full", "adapter")  # + adapter_lora with a LoRA rank
ONLINE: dict[str, Variant] = {"full_online": "full", "adapter_online": "adapter"}  # -> precomputed twin

log = logging.getLogger("bench")


@dataclass(frozen=True)
class BaseSize:
    unet: dict[str, Any]  # UNet2DConditionModel arguments of the base
    context: tuple[int, int]  # the base text encoder's states: (length, width)
    sentence_dim: int  # the width of its pooled vector
    local_downsample: int  # the VAE's scale factor: maps are latent side × this
    paths: dict[str, Any] = field(default_factory=dict)  # the condition paths' ComposerModel settings
    vae: dict[str, Any] = field(default_factory=dict)  # AutoencoderKL arguments (online variants)
    text_encoder: dict[str, Any] = field(default_factory=dict)  # CLIPTextConfig arguments (online)


SIZES: dict[str, BaseSize] = {
    # runwayml/stable-diffusion-v1-5's unet/config.json; CLIP ViT-L/14 text states; VAE factor 8.
    "sd15": BaseSize(
        unet=dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            norm_num_groups=32,
        ),
        context=(77, 768),
        sentence_dim=768,
        local_downsample=8,
        # configs/train-sd15-gpu-cluster.yaml's condition paths (preset medium, local overrides);
        # semantics from the ViT-H-14 CLIP the decomposition suggests (1024 wide).
        paths=dict(
            local_channels=64,
            local_hidden=64,
            semantics_encoder="clip",
            semantics_dim=1024,
            semantics_tokens=4,
            palette_tokens=4,
        ),
        # runwayml/stable-diffusion-v1-5's vae/config.json and text_encoder/config.json (CLIP ViT-L/14).
        vae=dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
            scaling_factor=0.18215,
        ),
        text_encoder=dict(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
        ),
    ),
    # Seconds per step on a CPU: the tests' tiny SD (tests/helpers/tiny_sd.py), 64² images.
    "tiny": BaseSize(
        unet=dict(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            norm_num_groups=8,
        ),
        context=(16, 32),
        sentence_dim=32,
        local_downsample=8,
        paths=dict(
            local_channels=8,
            local_hidden=16,
            semantics_encoder="clip",
            semantics_dim=16,
            semantics_tokens=2,
            palette_tokens=2,
        ),
        # Four levels as SD's, so that its scale factor (8) maps 64² images to the 8² latents.
        vae=dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 32, 64, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=64,
            scaling_factor=0.18215,
        ),
        text_encoder=dict(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=998,
            eos_token_id=999,
            pad_token_id=999,
        ),
    ),
}


def base_scheduler() -> DDIMScheduler:
    """Stable Diffusion 1.x's noise schedule (its scheduler/scheduler_config.json), epsilon target."""
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _reset_rss_peak() -> bool:
    """Resets this process's peak-RSS mark (Linux: "5" into /proc/self/clear_refs); False if it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _rss_peak() -> int:
    """Bytes: the peak RSS since ``_reset_rss_peak`` (VmHWM), else since the process started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def timed_steps(
    model: torch.nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    device: torch.device,
    steps: int,
    warmup: int,
    repeats: int,
) -> dict:
    """``repeats`` × (``warmup`` untimed + ``steps`` timed) AdamW steps of the trainable parameters;
    on CUDA the FLOPs of one step first (untimed, before the peak memory is reset)."""
    cuda = device.type == "cuda"

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    flops, build_peak = None, None
    if cuda:
        with FlopCounterMode(display=False) as counter:
            with amp():
                loss = loss_fn()
            loss.backward()
        model.zero_grad(set_to_none=True)
        flops = counter.get_total_flops()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        build_peak = _rss_peak()
        if not _reset_rss_peak():
            log.info("  cannot reset the peak-RSS mark: peak_memory_gib includes building the model")
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=LEARNING_RATE, fused=cuda)

    def step() -> torch.Tensor:
        with amp():
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    times = []
    for r in range(repeats):
        for _ in range(warmup):
            step()
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            loss = step()
        sync(device)
        times.append(time.perf_counter() - t)
        log.info(f"  repeat {r + 1}/{repeats}: {times[-1] / steps:.3f} s per step")
    peak = torch.cuda.max_memory_allocated(device) if cuda else _rss_peak()
    return {
        "trainable_parameters": sum(p.numel() for p in trained),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "flops_per_step": flops,
        "times_s": times,
        "peak_memory_gib": round(peak / 2**30, 2),
        "process_peak_memory_gib": None if cuda else round(max(peak, build_peak) / 2**30, 2),
        "final_loss": loss.item(),
    }


@dataclass(frozen=True)
class StepSettings:
    """What one benchmark run measures (the command-line options of the same names)."""

    size: str = "sd15"
    batch: int = 1
    steps: int = 20
    warmup: int = 5
    repeats: int = 3
    gradient_checkpointing: bool = False
    lora_rank: int = 0

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; known sizes: {', '.join(SIZES)}")
        if min(self.batch, self.steps, self.repeats) < 1 or self.warmup < 0 or self.lora_rank < 0:
            raise ValueError("batch, steps and repeats must be >= 1; warmup and lora_rank >= 0")

    def argv(self) -> list[str]:
        """These settings as ``main``'s options."""
        out = ["--size", self.size, "--batch", str(self.batch), "--steps", str(self.steps)]
        out += ["--warmup", str(self.warmup), "--repeats", str(self.repeats)]
        out += ["--lora-rank", str(self.lora_rank)]
        return out + ["--gradient-checkpointing"] * self.gradient_checkpointing


class OnlineEncoding:
    """What a step without precomputed inputs runs first: the frozen VAE and text encoder of a
    size, on one batch of images and token ids drawn once (the loader's output)."""

    def __init__(self, spec: BaseSize, batch: int, generator: torch.Generator, device: torch.device):
        self.vae = AutoencoderKL(**spec.vae).to(device).eval().requires_grad_(False)
        text = CLIPTextConfig(**spec.text_encoder)
        self.text_encoder = CLIPTextModel(text).to(device).eval().requires_grad_(False)
        side = spec.vae["sample_size"]
        # (B, 3, R, R) in [-1, 1]: the images diffusers' training scripts hand the VAE
        self.images = (torch.rand(batch, 3, side, side, generator=generator) * 2 - 1).to(device)
        # (B, L) int64: a tokenizer's output padded to max_length, start and end tokens in place
        ids = torch.randint(0, text.vocab_size, (batch, text.max_position_embeddings), generator=generator)
        ids[:, 0], ids[:, -1] = text.bos_token_id, text.eos_token_id
        self.ids = ids.to(device)

    def parameters(self) -> dict[str, int]:
        models = {"vae": self.vae, "text_encoder": self.text_encoder}
        return {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}

    def __call__(self, conditions: Conditions) -> tuple[torch.Tensor, Conditions]:
        """x0 (B, 4, R/8, R/8) float32: VAE latents × scaling factor; ``conditions`` with the caption
        tokens (B, L, W) and sentence (B, W) the text encoder makes (last hidden states, pooled)."""
        with torch.no_grad():
            x0 = self.vae.encode(self.images).latent_dist.sample() * self.vae.config.scaling_factor
            text = self.text_encoder(self.ids)
        # float32 as the precomputed inputs are, so that the rest of the step is full's exactly
        tokens, sentence = text.last_hidden_state.float(), text.pooler_output.float()
        return x0.float(), replace(conditions, caption_tokens=tokens, caption_sentence=sentence)


def run_variant(variant: Variant, settings: StepSettings, device: torch.device) -> dict:
    """One variant's step figures (``timed_steps``) on a freshly built, seeded model and batch."""
    spec, batch = SIZES[settings.size], settings.batch
    torch.manual_seed(0)
    base = UNet2DConditionModel(**spec.unet)
    g = torch.Generator().manual_seed(0)
    s, c = spec.unet["sample_size"], spec.unet["in_channels"]
    x0 = torch.randn(batch, c, s, s, generator=g).to(device)  # VAE latents × scaling factor: ~N(0, 1)
    scheduler = base_scheduler()
    if variant == "plain":
        model, unet = base, base
        context = torch.randn(batch, *spec.context, generator=g).to(device)

        def loss_fn() -> torch.Tensor:
            return plain_loss(unet, scheduler, x0, context, g)
    else:
        null_caption = torch.randn(spec.context, generator=g)
        model = ComposerModel.from_base(
            base,
            null_caption,
            sentence_dim=spec.sentence_dim,
            local_downsample=spec.local_downsample,
            lora_rank=settings.lora_rank if variant == "adapter_lora" else 0,
            **spec.paths,
        )
        del base
        if ONLINE.get(variant, variant) != "full":
            for name, p in model.named_parameters():
                p.requires_grad_(is_new_parameter(name))
        unet = model.unet
        conditions = random_conditions(model, batch, g).to(device)
        presence = torch.ones(batch, len(CONDITIONS), dtype=torch.bool, device=device)
        online = OnlineEncoding(spec, batch, g, device) if variant in ONLINE else None

        def loss_fn() -> torch.Tensor:
            if online is None:
                return diffusion_loss(model, scheduler, x0, conditions, presence, g)
            return diffusion_loss(model, scheduler, *online(conditions), presence, g)

    model.to(device).train()
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    log.info(f"{variant}: {settings} on {device}")
    out = timed_steps(model, loss_fn, device, settings.steps, settings.warmup, settings.repeats)
    out["unet"] = architecture(unet)
    if variant in ONLINE:
        out["online_encoder_parameters"] = online.parameters()  # frozen, not in total_parameters
    return out


def _isolated(variant: Variant, settings: StepSettings, threads: int) -> dict:
    """``run_variant`` on the CPU in a fresh Python process (``--only``): its peak RSS is its own."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *settings.argv(), "--device", "cpu"]
    cmd += ["--threads", str(threads), "--only", variant]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)  # stderr: progress
    if proc.returncode != 0:  # e.g. -9: killed by the kernel's out-of-memory killer
        return {"error": f"the {variant} process exited with {proc.returncode}"}
    return json.loads(proc.stdout)


def _figures(run: dict, batch: int, steps: int, peak_tflops: float | None) -> dict:
    if "error" in run:
        return run
    times = run.pop("times_s")
    step_s = statistics.median(times) / steps
    flops = run["flops_per_step"]
    achieved = None if flops is None else flops / step_s / 1e12
    return {
        **run,
        "images_per_s": round(batch / step_s, 4),
        "runs_images_per_s": [round(batch * steps / t, 4) for t in times],
        "step_s": round(step_s, 4),
        "achieved_tflops": None if achieved is None else round(achieved, 2),
        "mfu": None if achieved is None or peak_tflops is None else round(achieved / peak_tflops, 4),
    }


def run_benchmark(
    settings: StepSettings, device: Literal["cpu", "cuda"], variants: tuple[Variant, ...], threads: int
) -> dict:
    """Every variant's figures, the images/s ratios of full, adapter (and adapter_lora) to plain,
    and of full (adapter) to full_online (adapter_online): precomputed inputs over online encoding."""
    if "adapter_lora" in variants and not settings.lora_rank:
        raise ValueError("variant adapter_lora needs --lora-rank > 0")
    cuda = device == "cuda"
    name = torch.cuda.get_device_name() if cuda else cpu_name()
    peak = peak_bf16_tflops(name) if cuda else None
    runs = {}
    for v in variants:
        if cuda:  # in this process: the peak is reset per variant
            run = run_variant(v, settings, torch.device(device))
            gc.collect()  # this variant's model and optimizer state go before the next is made
            torch.cuda.empty_cache()
        else:
            run = _isolated(v, settings, threads)
        runs[v] = _figures(run, settings.batch, settings.steps, peak)

    def ratio(v: str, reference: str) -> float | None:  # None if either did not run or failed
        num, ref = (runs.get(k, {}).get("images_per_s") for k in (v, reference))
        return round(num / ref, 3) if num and ref else None

    ratios = {f"{v}/plain": ratio(v, "plain") for v in variants if v != "plain" and v not in ONLINE}
    goal_met = {k: r is not None and r >= GOAL_RATIO for k, r in ratios.items()}
    # precomputed over online: the twin is the numerator, so a ratio > 1 is what storing saves
    online = {f"{ONLINE[v]}/{v}": ratio(ONLINE[v], v) for v in variants if v in ONLINE}
    spec = SIZES[settings.size]
    s = spec.unet["sample_size"]
    return {
        **asdict(settings),
        "resolution": s * spec.local_downsample,
        "latents": [spec.unet["in_channels"], s, s],
        "context_shape": [settings.batch, *spec.context],
        "condition_paths": spec.paths,
        "device": name,
        "precision": "bf16 autocast, fp32 master weights" if cuda else "fp32",
        "peak_memory": "torch.cuda.max_memory_allocated per variant"
        if cuda
        else "peak RSS over the training steps of a fresh process per variant",
        "peak_bf16_tflops": peak,
        "variants": runs,
        "ratios": {**ratios, **online},
        "goal_ratio": GOAL_RATIO,
        "goal_met": goal_met,
    }


def gpu_suite(settings: StepSettings, threads: int) -> dict:
    """SD 1.5 size, bf16: batch 8 eager, then batch 16 with gradient checkpointing (the sd15
    cluster config's setting), each halved on out-of-memory so that it fits an 80 GB GPU."""
    variants = DEFAULT_VARIANTS + ("adapter_lora",) * bool(settings.lora_rank)
    runs, tried = [], []
    for checkpointing, batch in ((False, 8), (True, 16)):
        while True:
            run = replace(settings, size="sd15", batch=batch, gradient_checkpointing=checkpointing)
            tried.append({"batch": batch, "gradient_checkpointing": checkpointing})
            try:
                runs.append(run_benchmark(run, "cuda", variants, threads))
                oom = False
            except torch.OutOfMemoryError:
                oom = True
            gc.collect()  # the exception's frames hold the model; free it before the next try
            torch.cuda.empty_cache()
            if not oom:
                break
            log.info(f"out of memory at batch {batch}")
            if batch == 1:
                raise RuntimeError("the SD 1.5-sized UNet does not train at batch 1 on this device")
            batch //= 2
    return {"gpu": torch.cuda.get_device_name(), "tried": tried, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=tuple(SIZES), default="sd15")
    p.add_argument("--batch", type=int, default=None, help="images per step; default 8 on CUDA, 1 on CPU")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before each repeat's timed ones")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet activations")
    p.add_argument("--lora-rank", type=int, default=0, help="> 0: also the adapter with LoRA of this rank")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=None,
        help="default: plain full adapter (+ adapter_lora with --lora-rank)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads; default all cores")
    p.add_argument("--gpu-suite", action="store_true", help="CUDA: SD 1.5 size, bf16, batch 8 and 16")
    p.add_argument("--only", choices=VARIANTS, default=None, help=argparse.SUPPRESS)  # _isolated's child
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench] %(message)s", stream=sys.stderr)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    diffusers_logging.set_verbosity_error()
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    settings = StepSettings(
        args.size,
        args.batch or (8 if cuda else 1),
        args.steps,
        args.warmup,
        args.repeats,
        args.gradient_checkpointing,
        args.lora_rank,
    )
    if args.only:
        start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
        run = run_variant(args.only, settings, torch.device("cpu"))
        print(json.dumps({**run, "rss_at_start_gib": round(start, 2)}))
        return 0
    out: dict = {
        "benchmark": "base_step",
        "machine": {
            "cpu": cpu_name(),
            "torch_threads": threads,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
        },
        "weights": "random init: the work of a step does not depend on the weights",
        "presence": "all 8 conditions present in every row (no dropout)",
        "optimizer": f"AdamW lr {LEARNING_RATE} over the trainable parameters (fused on CUDA)",
        "scheduler": "DDIM scaled_linear betas 0.00085-0.012, epsilon (Stable Diffusion 1.x)",
    }
    if (args.gpu_suite or cuda) and not torch.cuda.is_available():
        out["error"] = "no CUDA device (torch.cuda.is_available() is False)"
        print(json.dumps(out, indent=2))
        return 2
    if args.gpu_suite:
        out["gpu_suite"] = gpu_suite(settings, threads)
    else:
        default = DEFAULT_VARIANTS + ("adapter_lora",) * bool(args.lora_rank)
        variants = tuple(args.variants or default)
        out.update(run_benchmark(settings, "cuda" if cuda else "cpu", variants, threads))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
