"""``recompose upscale``: super-resolution of a user's image alone (SR3) with an upsampler or the
upsamplers of a cascade, optionally guided by a caption.

    --model: an upsampler export (``recompose train --stage upsampler``) or a cascade directory
             (its upsamplers in order; ``--factor`` says how many of them run)

The image is decoded as ``generate`` decodes a source (shorter side to the chain's input side,
centre crop), then each upsampler takes the previous one's output as its ``low_res``. Outputs,
each written to a temporary name and renamed:

    input.png            the image as the first upsampler got it (side r)
    bicubic.png          the same image upsampled bicubically to the output side (the baseline)
    sample-0000.png …    the upscaled images (side r × factor)
    grid.png             input, bicubic and the samples side by side
    upscale.json         arguments, factor, sides, per-stage settings and time, every file with its
                         sha256; written last, it marks a finished run
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from pipelines.config import Config, to_dict
from pipelines.errors import UserError
from pipelines.files import claim_output, encode_png, write_bytes, write_json

log = logging.getLogger(__name__)

FORMAT = "recompose.upscale/1"
RECORD = "upscale.json"
_OUTPUTS = re.compile(r"sample-\d{4}\.png|grid\.png|input\.png|bicubic\.png|\..+\.tmp")


class UpscaleError(UserError):
    """A bad flag, input image, model or output directory; the message names it."""


class UpscaleConfig(Config):
    model: str = Field(..., description="an upsampler export or a cascade directory (or a models:/ URI)")
    input: str = Field(..., description="the image to upscale")
    output: str = Field(
        ..., description="output directory (samples, input.png, bicubic.png, grid.png, upscale.json)"
    )
    factor: int | None = Field(
        None, ge=2, description="how much larger: the product of the upsamplers that run (unset: all of them)"
    )
    text: str | None = Field(None, description="a caption to guide the upsamplers")
    steps: int = Field(20, ge=1, description="denoising steps of each upsampler")
    guidance: str = Field("3", description="guidance scale (with --text)")
    level: int = Field(0, ge=0, le=999, description="noise-augmentation level of each upsampler's input")
    seed: int = Field(0, ge=0, description="same seed, same images")
    num_images: int = Field(1, ge=1, description="samples to draw")
    overwrite: bool = Field(False, description="replace an upscale in --output")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to sample")

    @model_validator(mode="after")
    def _check(self) -> UpscaleConfig:
        from pipelines.diffusion.guidance import Guidance

        try:
            Guidance.parse(self.guidance, frozenset({"caption"} if self.text is not None else ()))
        except ValueError as e:
            raise UpscaleError(f"--guidance: {e}") from None
        return self


@dataclass(frozen=True)
class UpscaleResult:
    """One finished upscale: ``upscale.json``, field for field."""

    format: str
    model: str
    arguments: dict[str, Any]
    factor: int
    input_side: int
    output_side: int
    stages: list[dict[str, Any]]  # per upsampler: name, side, factor, steps, guidance, sample_s
    images: list[dict[str, str]]
    files: dict[str, str]
    wall_time_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_upsamplers(model: str, device: str, factor: int | None) -> tuple[list[Any], list[str]]:
    """The upsamplers ``model`` holds (an upsampler export, or a cascade's upsamplers), cut to
    the ones whose factors multiply to ``factor``."""
    from pipelines.diffusion.cascade import Cascade, is_cascade, upscale_factors
    from pipelines.diffusion.loading import ModelError, load_pipeline, model_path

    root = model_path(model)
    if is_cascade(root):
        cascade = Cascade.load(root, device)
        pipes, names = cascade.stages[1:], cascade.names[1:]
        if not pipes:
            raise ModelError(f"--model {model}: this cascade has no upsampler")
    else:
        pipe = load_pipeline(model, device)
        if pipe.unet.config.upsample_factor == 1:
            raise ModelError(
                f"--model {model}: is a base model, not an upsampler; give an upsampler export "
                "(recompose train --stage upsampler) or a cascade directory"
            )
        pipes, names = [pipe], ["upsampler"]
    products = upscale_factors(pipes)
    if factor is None:
        return pipes, names
    if factor not in products:
        raise UpscaleError(
            f"--factor {factor}: this model upsamples by {', '.join(f'×{p}' for p in products)}"
        )
    k = products.index(factor) + 1
    return pipes[:k], names[:k]


def run_upscale(cfg: UpscaleConfig) -> UpscaleResult:
    """The whole command: check, load, decode, upsample, write; returns the ``upscale.json`` record."""
    from pipelines.data.decomposer import ImageDecomposer
    from pipelines.diffusion.cascade import StageInputs, upsample
    from pipelines.diffusion.inputs import upsample_bicubic
    from pipelines.diffusion.loading import resolve_device

    t0 = time.perf_counter()
    out = Path(cfg.output)
    previous = claim_output(out, RECORD, "upscale", ours=lambda p: bool(_OUTPUTS.fullmatch(p.name)))
    if previous is not None and not cfg.overwrite:
        raise UpscaleError(
            f"--output {out} already holds an upscale ({RECORD}); pass --overwrite or choose another"
        )
    if not Path(cfg.input).is_file():
        raise UpscaleError(f"no such file: --input {cfg.input}")
    device = resolve_device(cfg.device)
    log.info("loading the upsampler(s) from %s on %s", cfg.model, device)
    pipes, names = load_upsamplers(cfg.model, device, cfg.factor)
    side = pipes[0].image_size // pipes[0].unet.config.upsample_factor
    try:
        image = ImageDecomposer(pipes[0].config.decompose, side).load_image(cfg.input)
        inputs = []
        for pipe in pipes:
            dec = ImageDecomposer.for_pipeline(pipe, device)
            conditions = dec.caption(cfg.text) if cfg.text is not None else {}
            inputs.append(StageInputs(conditions, cfg.guidance, cfg.steps, level=cfg.level))
    except ValueError as e:  # a bad image
        raise UpscaleError(f"--input {cfg.input}: {e}") from e

    def on_stage(i: int, to: int) -> None:
        log.info(
            "stage %d/%d (%s): %d→%d px, %d steps",
            i + 1,
            len(pipes),
            names[i],
            to // pipes[i].unet.config.upsample_factor,
            to,
            cfg.steps,
        )

    images = np.repeat(image[None], cfg.num_images, axis=0)
    try:
        stages = upsample(pipes, inputs, images, cfg.seed, on_stage=on_stage)
    except ValueError as e:
        raise UpscaleError(str(e)) from e
    final = stages[-1].images
    out_side = stages[-1].resolution
    bicubic = upsample_bicubic(image[None], out_side)[0]

    files: dict[str, str] = {}

    def put(name: str, data: bytes) -> None:
        write_bytes(data, out / name)
        files[name] = hashlib.sha256(data).hexdigest()

    samples = [f"sample-{i:04d}.png" for i in range(len(final))]
    for name, im in zip(samples, final, strict=True):
        put(name, encode_png(im))
    put("input.png", encode_png(image))
    put("bicubic.png", encode_png(bicubic))
    put("grid.png", encode_png(upscale_grid(image, bicubic, final)))
    record = UpscaleResult(
        format=FORMAT,
        model=cfg.model,
        arguments=to_dict(cfg),
        factor=out_side // side,
        input_side=side,
        output_side=out_side,
        stages=[
            {
                "stage": n,
                "resolution": s.resolution,
                "factor": p.unet.config.upsample_factor,
                "steps": cfg.steps,
                "guidance": {"text": cfg.guidance, **s.guidance},
                "sample_s": round(s.seconds, 3),
            }
            for n, s, p in zip(names, stages, pipes, strict=True)
        ],
        images=[{"file": n, "sha256": files[n]} for n in samples],
        files=files,
        wall_time_s=round(time.perf_counter() - t0, 3),
    )
    write_json(record.to_dict(), out / RECORD)
    for name in (previous or {}).get("files", {}):  # an --overwrite's leftovers
        if name not in files and (out / name).is_file():
            (out / name).unlink()
    log.info(
        "wrote %d image(s) %d→%d px to %s in %.1f s", len(final), side, out_side, out, record.wall_time_s
    )
    return record


def upscale_grid(image: np.ndarray, bicubic: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """One row: the input (nearest, at the output side), bicubic, then each sample."""
    from pipelines.diffusion.pictures import MIN_TILE, layout

    side = max(bicubic.shape[0], MIN_TILE)
    row = [("input", image), ("bicubic", bicubic)] + [(f"sample {i}", s) for i, s in enumerate(samples)]
    return layout([row], side)
