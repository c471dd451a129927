"""Control for issue 16: does a stock diffusers ``UNet2DModel`` with a textbook DDPM loop learn the
synthetic shapes faster than recompose's trainer, and after how many images does it draw shapes?
Unconditional, 32 px, on a ``recompose synth`` folder or on scenes rendered in memory
(``--render N``: the same pixels as ``recompose synth --count N --seed 0``). Every ``--every``
minutes (and at the end) it samples ``--samples`` images (DDIM, 25 steps, fixed noise) from the
EMA and from the raw weights, prints one JSON line and saves the pictures:

  ``*_fit``      the scene parser's mean template fit of what they drew (``ParsedObject.fit``: is
                 each object some shape at all; the renders score ~0.96);
  ``*_nearest``  the mean distance (RMS, in [-1, 1] units) from each sample to its nearest
                 training image, next to ``fresh_nearest``, the same for renders the model never
                 saw: a sample much nearer than a fresh render is a copy of a training image.

No Ray, no MLflow: the plain loop is the point, and it runs as it is on a GPU
(``--device cuda --dtype bfloat16``: bf16 autocast, fp32 weights), where ``--max-images`` rather
than minutes bounds the run.

    python benchmarks/plain_unet_control.py runs/reference/synth --minutes 30 --out runs/control
    python benchmarks/plain_unet_control.py --render 4000 --device cuda --dtype bfloat16 \\
        --batch 256 --lr 1e-3 --minutes 8 --every 1 --samples 64 --out runs/control-gpu
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.caption_probe import template_fit  # noqa: E402
from pipelines.data.scene import render_sample  # noqa: E402
from pipelines.diffusion.inputs import image_to_tensor, tensor_to_image  # noqa: E402
from pipelines.diffusion.loading import ModelError, resolve_device  # noqa: E402
from pipelines.evaluate.scene_parser import parse_scene  # noqa: E402

SIDE = 32
RENDER_SIDE = 64  # `recompose synth`'s default resolution, area-resized to SIDE like its shards


def _small(rgb: np.ndarray) -> np.ndarray:
    return cv2.resize(rgb, (SIDE, SIDE), interpolation=cv2.INTER_AREA)


def load_images(synth: Path) -> torch.Tensor:
    """Every image of the synth folder, area-resized to 32 px, in [-1, 1] (N, 3, 32, 32)."""
    images = []
    for part in sorted(synth.glob("part-*.parquet")):
        for data in pq.read_table(part, columns=["image"]).column("image").to_pylist():
            images.append(_small(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))))
    if not images:
        raise SystemExit(f"no part-*.parquet images in {synth}")
    return image_to_tensor(np.stack(images))


def render_images(start: int, stop: int, seed: int = 0) -> torch.Tensor:
    """Training scenes ``start..stop`` of dataset ``seed``, rendered as ``recompose synth`` does
    and area-resized to 32 px, in [-1, 1]."""
    return image_to_tensor(
        np.stack([_small(render_sample(seed, "train", i, RENDER_SIDE).image) for i in range(start, stop)])
    )


def nearest(samples: torch.Tensor, data: torch.Tensor, chunk: int = 4096) -> float:
    """Mean over ``samples`` of the RMS distance to the nearest image of ``data`` (both [-1, 1])."""
    flat = samples.flatten(1).float()
    best = torch.full((len(flat),), float("inf"), device=flat.device)
    for i in range(0, len(data), chunk):
        ref = data[i : i + chunk].flatten(1).float().to(flat.device)
        best = torch.minimum(best, torch.cdist(flat, ref).min(1).values)
    return round(float((best / flat.shape[1] ** 0.5).mean()), 4)


def sample(
    net: torch.nn.Module, scheduler: DDPMScheduler, n: int, device: torch.device, bf16: bool
) -> tuple[torch.Tensor, np.ndarray, float | None, int]:
    """``n`` samples in [-1, 1] (on ``device``) and as uint8 images, their mean template fit and
    object count."""
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(25)
    x = torch.randn(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        for t in ddim.timesteps:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = net(x, t.to(device)).sample
            x = ddim.step(out.float(), t, x).prev_sample
    x = x.clamp(-1, 1)
    images = tensor_to_image(x.cpu())
    fits = [o.fit for image in images for o in parse_scene(image).objects]
    return x, images, template_fit(fits), len(fits)


def build_model(channels: tuple[int, ...]) -> UNet2DModel:
    """The control's UNet: attention below the first level, as diffusers' DDPM examples."""
    n = len(channels)
    return UNet2DModel(
        sample_size=SIDE,
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (n - 1),
        up_block_types=("AttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        attention_head_dim=32,
        norm_num_groups=8,
    )


def _channels(text: str) -> tuple[int, ...]:
    try:
        channels = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if len(channels) < 2 or any(c <= 0 or c % 8 for c in channels):
        raise argparse.ArgumentTypeError(f"expected 2+ positive multiples of 8, got {text!r}")
    return channels


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("synth", type=Path, nargs="?", help="a `recompose synth` output folder")
    ap.add_argument("--render", type=int, metavar="N", help="instead: render training scenes 0..N-1")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--max-images", type=int, help="also stop after this many training images")
    ap.add_argument("--every", type=float, default=5.0, help="minutes between samplings")
    ap.add_argument("--samples", type=int, default=16, help="images per sampling")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--channels", type=_channels, default=(32, 64, 128), help="block_out_channels")
    ap.add_argument("--prediction", choices=("epsilon", "v_prediction"), default="epsilon")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("runs/control"))
    args = ap.parse_args(argv)
    if (args.synth is None) == (args.render is None):
        ap.error("give a synth folder or --render N, not both")
    if args.render is not None and args.render < 1:
        ap.error("--render needs at least one scene")
    if args.every <= 0 or args.samples < 1 or args.batch < 1:
        ap.error("--every, --samples and --batch must be positive")
    try:
        device = torch.device(resolve_device(args.device))
    except ModelError as e:
        ap.error(str(e))
    bf16 = args.dtype == "bfloat16"
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_images(args.synth) if args.synth else render_images(0, args.render)
    # Scenes the model never trains on, for the copy check (the synth folder holds 0..N-1).
    fresh = render_images(len(data), len(data) + args.samples)
    fresh_nearest = nearest(fresh, data)
    data = data.to(device)
    torch.manual_seed(0)
    model = build_model(args.channels).to(device)
    params = sum(p.numel() for p in model.parameters())
    head = {"images": len(data), "parameters": params, "device": str(device), "dtype": args.dtype}
    print(json.dumps(head | {"channels": list(args.channels), "fresh_nearest": fresh_nearest}), flush=True)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=args.prediction
    )
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator(device).manual_seed(0)
    start, step, next_sample = time.time(), 0, args.every
    while True:
        x0 = data[torch.randint(0, len(data), (args.batch,), generator=g, device=device)]
        noise = torch.randn(x0.shape, generator=g, device=device)
        t = torch.randint(0, 1000, (args.batch,), generator=g, device=device)
        target = noise if args.prediction == "epsilon" else scheduler.get_velocity(x0, noise, t)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 100)  # 100 warm-up steps
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(scheduler.add_noise(x0, noise, t), t).sample
        loss = torch.nn.functional.mse_loss(out.float(), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update_parameters(model)
        step += 1
        minutes = (time.time() - start) / 60
        done = minutes >= args.minutes or (
            args.max_images is not None and step * args.batch >= args.max_images
        )
        if minutes < next_sample and not done:
            continue
        line = {
            "step": step,
            "images": step * args.batch,
            "minutes": round(minutes, 2),
            "images_per_s": round(step * args.batch / (time.time() - start), 1),
            "loss": round(loss.item(), 4),
        }
        for name, net in (("ema", ema.module), ("raw", model)):
            x, images, fit, count = sample(net, scheduler, args.samples, device, bf16)
            line |= {f"{name}_fit": fit, f"{name}_objects": count, f"{name}_nearest": nearest(x, data)}
            Image.fromarray(np.concatenate(images, 1)).resize((args.samples * 96, 96), Image.NEAREST).save(
                args.out / f"{name}-{step}.png"
            )
        line["fresh_nearest"] = fresh_nearest
        print(json.dumps(line), flush=True)
        while next_sample <= minutes:
            next_sample += args.every
        if done:
            break


if __name__ == "__main__":
    main()
