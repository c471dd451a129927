"""``recompose generate`` / ``python -m jobs.generate``: a trained pipeline + conditions -> images.

    recompose generate [--model DIR] --output DIR [--text …] [--palette '#ff0000,#00ff00']
        [--semantics-from IMG] [--sketch-from IMG] [--depth-from IMG] [--instances-from IMG]
        [--intensity-from IMG] [--mask IMG --source IMG] [--outpaint left=L,… --source IMG]
        [--guidance …] [--steps N] [--seed S] [--num-images N] [--resolution R]
        [--upsampler-steps N] [--upsampler-guidance G] [--prior]
        [--paint 'PHRASE=IMG' … [--paint-weight W]] [--config FILE] [--set key=value …]
        [--json]

A condition "from IMG" is decomposed with the extractors and settings of the training shards
(the pipeline's model_index.json ``decompose``); see docs/generation.md. Given a cascade directory
(``recompose cascade``) it runs the base and then each upsampler, up to ``--resolution``.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any

from jobs._runner import add_common_arguments, run
from pipelines.config import add_config_arguments
from pipelines.generate.config import GenerateConfig, load_generate_config
from pipelines.generate.run import GenerateResult, run_generate

IMAGES = {k for k in GenerateConfig.model_fields if k.endswith(("_from", "_map"))} | {"mask", "source"}
SAMPLING = ("guidance", "invert_guidance", "steps", "seed", "num_images", "scheduler", "threshold", "device")
SAMPLING += (
    "resolution",
    "upsampler_steps",
    "upsampler_guidance",
    "low_res_level",
    "prior_guidance",
    "prior_steps",
    "paint_weight",
)


def parser() -> argparse.ArgumentParser:
    """One flag per ``GenerateConfig`` field, helped by its description; unset flags leave the
    config's value (defaults < --config < flags < --set)."""
    p = argparse.ArgumentParser(prog="recompose generate", description=__doc__.split("\n\n")[0])
    conditions, sampling = p.add_argument_group("conditions (any subset)"), p.add_argument_group("sampling")
    for key, field in GenerateConfig.model_fields.items():
        kind = field.annotation
        if type(None) in typing.get_args(kind):  # X | None: a flag of X
            kind = typing.get_args(kind)[0]
        if kind is bool:
            kw: dict[str, Any] = {"action": "store_true", "default": None}
        elif typing.get_origin(kind) is list:  # repeatable
            kw = {"action": "append", "default": None, "metavar": "PHRASE=IMG"}
        elif typing.get_origin(kind) is typing.Literal:
            kw = {"choices": typing.get_args(kind)}
        else:
            kw = {
                "type": int if kind is int else float if kind is float else str,
                "metavar": "IMG" if key in IMAGES else None,
            }
        group = sampling if key in SAMPLING else p if key in ("model", "output", "overwrite") else conditions
        group.add_argument("--" + key.replace("_", "-"), **kw, help=f"{field.description} (config: {key})")
    add_config_arguments(p, "pipelines/generate/config.py for the keys", "steps=20")
    add_common_arguments(p, json_help="print the record (generate.json) as JSON on stdout")
    return p


def generate(args: argparse.Namespace) -> GenerateResult:
    flags = {k: v for k, v in vars(args).items() if k in GenerateConfig.model_fields}
    return run_generate(load_generate_config(args.config, flags, args.overrides))


def main(argv: list[str] | None = None) -> int:
    return run(parser(), generate, argv)


if __name__ == "__main__":
    raise SystemExit(main())
