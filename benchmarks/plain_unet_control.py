"""Control for issue 16: does a stock diffusers ``UNet2DModel`` with a textbook DDPM loop learn the
synthetic shapes faster than recompose's trainer? Unconditional, 32 px, on a ``recompose synth``
folder; every ``--every`` minutes it samples 16 images (DDIM, 25 steps, fixed noise) from the EMA
and from the raw weights, prints one JSON line with the scene parser's mean template fit of what
they drew (``ParsedObject.fit``: is each object some shape at all; the renders score ~0.96) and
saves the pictures. No Ray, no MLflow: the plain loop is the point.

    python benchmarks/plain_unet_control.py runs/reference/synth --minutes 30 --out runs/control
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
from pipelines.diffusion.inputs import image_to_tensor, tensor_to_image  # noqa: E402
from pipelines.evaluate.scene_parser import parse_scene  # noqa: E402

SIDE = 32


def load_images(synth: Path) -> torch.Tensor:
    """Every image of the synth folder, area-resized to 32 px, in [-1, 1] (N, 3, 32, 32)."""
    images = []
    for part in sorted(synth.glob("part-*.parquet")):
        for data in pq.read_table(part, columns=["image"]).column("image").to_pylist():
            rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            images.append(cv2.resize(rgb, (SIDE, SIDE), interpolation=cv2.INTER_AREA))
    if not images:
        raise SystemExit(f"no part-*.parquet images in {synth}")
    return image_to_tensor(np.stack(images))


def sample(
    net: torch.nn.Module, scheduler: DDPMScheduler, n: int = 16
) -> tuple[np.ndarray, float | None, int]:
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(25)
    x = torch.randn(n, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for t in ddim.timesteps:
            x = ddim.step(net(x, t).sample, t, x).prev_sample
    images = tensor_to_image(x)
    fits = [o.fit for image in images for o in parse_scene(image).objects]
    return images, template_fit(fits), len(fits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("synth", type=Path, help="a `recompose synth` output folder")
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--every", type=float, default=5.0, help="minutes between samplings")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prediction", choices=("epsilon", "v_prediction"), default="epsilon")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", type=Path, default=Path("runs/control"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_images(args.synth)
    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=SIDE,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32,
        norm_num_groups=8,
    )
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"images": len(data), "parameters": params}), flush=True)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=args.prediction
    )
    ema = torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    start, step, next_sample = time.time(), 0, args.every
    while True:
        x0 = data[torch.randint(0, len(data), (args.batch,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        target = noise if args.prediction == "epsilon" else scheduler.get_velocity(x0, noise, t)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 100)  # 100 warm-up steps
        loss = torch.nn.functional.mse_loss(model(scheduler.add_noise(x0, noise, t), t).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update_parameters(model)
        step += 1
        minutes = (time.time() - start) / 60
        if minutes < next_sample and minutes < args.minutes:
            continue
        line = {
            "step": step,
            "images": step * args.batch,
            "minutes": round(minutes, 1),
            "loss": round(loss.item(), 4),
        }
        for name, net in (("ema", ema.module), ("raw", model)):
            images, fit, count = sample(net, scheduler)
            line |= {f"{name}_fit": fit, f"{name}_objects": count}
            Image.fromarray(np.concatenate(images, 1)).resize((16 * 96, 96), Image.NEAREST).save(
                args.out / f"{name}-{step}.png"
            )
        print(json.dumps(line), flush=True)
        next_sample += args.every
        if minutes >= args.minutes:
            break


if __name__ == "__main__":
    main()
