"""``recompose upscale`` / ``python -m jobs.upscale``: super-resolution of an image with an
upsampler (SR3), or the upsamplers of a cascade, optionally guided by a caption.

    recompose upscale --model DIR --input IMG --output DIR [--factor N] [--text …] [--steps N]
        [--guidance G] [--level L] [--seed S] [--num-images N] [--device auto|cpu|cuda]
        [--overwrite] [--json]

The image is brought to the first upsampler's input side (shorter side, centre crop); the output
side is that × --factor. Writes the samples, input.png, bicubic.png (the baseline), grid.png and
upscale.json; see docs/generation.md, "Upscaling an image".
"""

from __future__ import annotations

import argparse
import typing
from typing import Any

from jobs._runner import add_common_arguments, run
from pipelines.generate.upscale import UpscaleConfig, UpscaleResult, run_upscale


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recompose upscale", description=__doc__.split("\n\n")[0])
    for key, field in UpscaleConfig.model_fields.items():
        kind = field.annotation
        if type(None) in typing.get_args(kind):
            kind = typing.get_args(kind)[0]
        if kind is bool:
            kw: dict[str, Any] = {"action": "store_true"}
        elif typing.get_origin(kind) is typing.Literal:
            kw = {"choices": typing.get_args(kind), "default": field.default}
        else:
            kw = {"type": int if kind is int else str, "default": field.default}
        if field.is_required():
            kw = {**kw, "required": True}
            kw.pop("default")
        default = (
            ""
            if field.is_required() or field.default is None or kind is bool
            else f" (default {field.default})"
        )
        p.add_argument("--" + key.replace("_", "-"), **kw, help=f"{field.description}{default}")
    add_common_arguments(p, json_help="print the record (upscale.json) as JSON on stdout")
    return p


def upscale(args: argparse.Namespace) -> UpscaleResult:
    from pipelines.config import from_dict

    values = {k: v for k, v in vars(args).items() if k in UpscaleConfig.model_fields and v is not None}
    return run_upscale(from_dict(UpscaleConfig, values))


def main(argv: list[str] | None = None) -> int:
    return run(parser(), upscale, argv)


if __name__ == "__main__":
    raise SystemExit(main())
