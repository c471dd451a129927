"""Upsampler quality: a trained upsampler against bicubic upsampling, and the cascade's layout.

    python benchmarks/upsampler_quality.py --upsampler DIR [--base MODEL] [--count 64] [--steps 20]
        [--levels 0,100] [--base-steps 25] [--seed 1] [--spacing saved|leading|trailing] [--figure PNG]

1. Super-resolution. ``--count`` held-out synthetic images (``render_sample(seed, "heldout", i)``:
   scenes the training set (seed 0) never had) at the upsampler's side R, downsampled by its
   factor exactly as in training (antialiased bicubic), then upsampled back (a) bicubically, as
   the model itself sees its input, and (b) by the upsampler at each ``--levels`` noise-
   augmentation level, unconditioned and with the scene's caption. PSNR (RGB, data range 255)
   and SSIM (RGB, Wang et al.'s Gaussian window; skimage) against the original, means over the
   images, and the share of images where the upsampler beats bicubic.
2. Layout. ``--base`` (default the reference model) samples ``--count`` images from the same
   captions at R/f; the upsampler takes them to R; its output, downsampled back to R/f, must
   keep the base sample's layout: the canny sketch F1 (1 px tolerance, as evaluate's sketch
   fidelity) of down(upsampled) against the base sample, next to the F1 of unrelated base
   samples (pairs i, i+1: the score of no shared layout).

Prints one JSON object on stdout; ``--figure`` writes a picture (original | input | bicubic |
upsampled rows, then base | upsampled pairs).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.data.decomposer import ImageDecomposer  # noqa: E402
from pipelines.data.scene import render_sample  # noqa: E402
from pipelines.diffusion.inputs import downsample_image, upsample_bicubic  # noqa: E402
from pipelines.diffusion.loading import load_pipeline  # noqa: E402
from pipelines.evaluate.fidelity import edge_f1  # noqa: E402

log = logging.getLogger("upsampler_quality")


def rgb_psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, R, R, 3) uint8 pairs -> (N,) PSNR in dB over all channels."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(255.0**2 / mse)


def rgb_ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from skimage.metrics import structural_similarity

    return np.array(
        [
            structural_similarity(
                x,
                y,
                data_range=255,
                channel_axis=2,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
            )
            for x, y in zip(a, b, strict=True)
        ]
    )


def scores(truth: np.ndarray, got: np.ndarray, baseline: np.ndarray | None = None) -> dict[str, float]:
    p, s = rgb_psnr(truth, got), rgb_ssim(truth, got)
    out = {"psnr_db": round(float(p.mean()), 3), "ssim": round(float(s.mean()), 4)}
    if baseline is not None:
        bp, bs = rgb_psnr(truth, baseline), rgb_ssim(truth, baseline)
        out["beats_bicubic_psnr"] = round(float((p > bp).mean()), 3)
        out["beats_bicubic_ssim"] = round(float((s > bs).mean()), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--upsampler", required=True, help="an upsampler export (recompose train --stage upsampler)"
    )
    p.add_argument("--base", default="recompose:reference", help="the base model for the layout check")
    p.add_argument("--count", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="upsampler denoising steps")
    p.add_argument("--base-steps", type=int, default=25)
    p.add_argument("--levels", default="0,100", help="noise-augmentation levels to sample at")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance with the caption")
    p.add_argument("--seed", type=int, default=1, help="the held-out scenes' seed")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--figure", help="write the picture here")
    p.add_argument(
        "--spacing",
        choices=("saved", "leading", "trailing"),
        default="saved",
        help="sample the upsampler with this timestep spacing instead of the one its export saved: "
        "the same as training it with model.timestep_spacing set so (the spacing changes no training step)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[upsampler_quality] %(message)s", stream=sys.stderr)
    torch.manual_seed(0)

    up = load_pipeline(args.upsampler, "cpu")
    up.set_progress_bar_config(disable=True)
    if args.spacing != "saved":
        from diffusers import DDIMScheduler

        up.scheduler = DDIMScheduler.from_config(up.scheduler.config, timestep_spacing=args.spacing)
    f, side = up.unet.config.upsample_factor, up.image_size
    scenes = [render_sample(args.seed, "heldout", i, side) for i in range(args.count)]
    truth = np.stack([s.image for s in scenes])
    captions = [s.caption for s in scenes]
    low = downsample_image(truth, f)
    bicubic = upsample_bicubic(low, side)
    result: dict = {
        "upsampler": args.upsampler,
        "factor": f,
        "sides": [side // f, side],
        "count": args.count,
        "steps": args.steps,
        "timestep_spacing": up.scheduler.config.timestep_spacing,
        "bicubic": scores(truth, bicubic),
        "upsampler_runs": {},
    }

    def run(images: np.ndarray, texts: list[str] | None, level: int) -> tuple[np.ndarray, float]:
        out, t = [], time.perf_counter()
        for i, im in enumerate(images):
            cond = {"low_res": im, "low_res.level": level}
            if texts is not None:
                cond["text"] = texts[i]
            out.append(
                up(
                    cond, guidance=args.guidance if texts else 1.0, num_inference_steps=args.steps, seed=i
                ).images[0]
            )
        return np.stack(out), time.perf_counter() - t

    shown = None
    for level in [int(x) for x in args.levels.split(",")]:
        for label, texts in (("unconditional", None), ("caption", captions)):
            log.info("upsampling %d images, level %d, %s", len(low), level, label)
            got, seconds = run(low, texts, level)
            key = f"level {level}, {label}"
            result["upsampler_runs"][key] = {**scores(truth, got, bicubic), "seconds": round(seconds, 1)}
            if shown is None:
                shown = got

    # Layout: base samples from the captions, through the upsampler, back down
    base = load_pipeline(args.base, "cpu")
    base.set_progress_bar_config(disable=True)
    if base.image_size != side // f:
        raise SystemExit(f"--base makes {base.image_size} px; the upsampler takes {side // f} px")
    log.info("sampling %d base images at %d px", args.count, base.image_size)
    base_images = np.stack(
        [
            base({"text": c}, guidance=3.0, num_inference_steps=args.base_steps, seed=i).images[0]
            for i, c in enumerate(captions)
        ]
    )
    log.info("upsampling them")
    up_images, _ = run(base_images, captions, 0)
    down = downsample_image(up_images, f)
    dec = ImageDecomposer(base.config.decompose, base.image_size)

    def sketches(images: np.ndarray) -> np.ndarray:
        return np.stack([dec.decompose(im, ["sketch"])["sketch"] for im in images])

    s_base, s_down = sketches(base_images), sketches(down)
    result["layout"] = {
        "base": args.base,
        "sketch_f1_kept": round(float(np.mean(edge_f1(s_base, s_down)["f1"])), 4),
        "sketch_f1_unrelated": round(float(np.mean(edge_f1(s_base, np.roll(s_base, 1, axis=0))["f1"])), 4),
    }
    if args.figure:
        from pipelines.diffusion.pictures import layout
        from pipelines.files import encode_png, write_bytes

        rows = [
            [("original", truth[i]), ("input", low[i]), ("bicubic", bicubic[i]), ("upsampler", shown[i])]
            for i in range(min(4, args.count))
        ]
        rows += [
            [
                ("base", base_images[i]),
                ("upsampled", up_images[i]),
                ("base", base_images[i + 1]),
                ("upsampled", up_images[i + 1]),
            ]
            for i in range(0, min(4, args.count - 1), 2)
        ]
        write_bytes(encode_png(layout(rows, 128)), args.figure)
        result["figure"] = args.figure
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
