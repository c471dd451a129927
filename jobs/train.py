"""``recompose train`` / ``python -m jobs.train``: decomposition shards -> a trained pipeline.

    recompose train --data DIR --output RUN_DIR [--preset tiny|small|medium|base] [--max-steps N]
        [--workers N] [--gpus-per-worker N] [--base BASE_DIR [--mode full|adapter]]
        [--stage base|upsampler|prior [--upsample-factor 2|3|4] [--prior-of MODEL]]
        [--expert-of RUN_DIR --noise-range LO:HI]
        [--config FILE] [--set key=value …]

With ``--base`` the Composer UNet starts as a pretrained Stable Diffusion 1.x/2.x UNet (a diffusers
pipeline directory, or a repo id in the local Hugging Face cache), exactly that model at step 0,
trained on the latents and caption embeddings that ``recompose decompose --base`` stored.

With ``--stage upsampler`` it trains a super-resolution model of Composer's cascade on the same
data: each image's low-resolution input (side / factor) is derived on the fly and noise-augmented.
With ``--stage prior`` it trains the cascade's prior, caption -> semantics embedding, on the data's
(caption, semantics) pairs; ``--prior-of`` names the base model whose semantics embedding it learns
(on data without CLIP semantics).

With ``--expert-of RUN_DIR --noise-range LO:HI`` it fine-tunes an expert denoiser (eDiffi) of the
timesteps [LO, HI) from that run's export, with that run's config (and data, unless ``--data`` is
given) under any ``--config`` / ``--set``; ``recompose ensemble`` joins experts into one pipeline.

Runs on the Ray cluster in ``RAY_ADDRESS`` (as under ``ray job submit``) or a local Ray. Running
the same command again resumes RUN_DIR from its latest checkpoint, in the same MLflow run.
"""

from __future__ import annotations

import argparse

from jobs._runner import add_common_arguments, run
from pipelines.config import add_config_arguments, load_config
from pipelines.train.config import TrainConfig
from pipelines.train.run import TrainResult, expert_defaults, run_train


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recompose train", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add(
        "--data",
        default=None,
        help="a `recompose decompose` output directory (config: data); with --expert-of RUN_DIR, "
        "default: that run's",
    )
    add("--output", required=True, help="RUN_DIR: checkpoints, samples/, export/ (config: output)")
    add("--preset", default=None, help="model size: tiny (CPU) … base (config: model.preset)")
    add("--max-steps", type=int, default=None, help="steps in all; a rerun trains on (config: max_steps)")
    add("--workers", type=int, default=None, help="Ray Train workers (config: workers)")
    add("--gpus-per-worker", type=float, default=None, help="0: CPU workers (config: gpus_per_worker)")
    add(
        "--base",
        default=None,
        help="a Stable Diffusion 1.x/2.x pipeline directory or cached repo id to start from (config: base)",
    )
    add(
        "--mode",
        choices=["full", "adapter"],
        default=None,
        help="with --base: train the whole UNet, or only the new condition paths (config: mode)",
    )
    add(
        "--stage",
        choices=["base", "upsampler", "prior"],
        default=None,
        help="the cascade's base model, an upsampler from side / factor, or the caption -> semantics "
        "prior (config: stage)",
    )
    add(
        "--prior-of",
        default=None,
        help="with --stage prior: the base model whose semantics embedding it learns (config: prior_of)",
    )
    add(
        "--upsample-factor",
        type=int,
        choices=[2, 3, 4],
        default=None,
        help="with --stage upsampler: the factor it upsamples by (config: upsample_factor)",
    )
    add(
        "--expert-of",
        default=None,
        help="fine-tune an expert denoiser from this training run (its export and config) or saved "
        "pipeline (config: expert_of)",
    )
    add(
        "--noise-range",
        default=None,
        metavar="LO:HI",
        help="train on the timesteps [LO, HI) of the noise schedule only, e.g. 0:500 (config: noise_range)",
    )
    add_config_arguments(p, "configs/train-*.yaml", "optim.lr=3e-4")
    add_common_arguments(p, json_help="print the summary as JSON on stdout")
    return p


def train(args: argparse.Namespace) -> TrainResult:
    from pipelines.diffusion.ensemble import parse_range

    noise_range = None if args.noise_range is None else list(parse_range(args.noise_range))
    values = {
        "data": args.data,
        "output": args.output,
        "model.preset": args.preset,
        "max_steps": args.max_steps,
        "workers": args.workers,
        "gpus_per_worker": args.gpus_per_worker,
        "base": args.base,
        "mode": args.mode,
        "stage": args.stage,
        "upsample_factor": args.upsample_factor,
        "prior_of": args.prior_of,
        "expert_of": args.expert_of,
        "noise_range": noise_range,
    }
    cfg = load_config(
        TrainConfig, args.config, values, args.overrides, defaults=expert_defaults(args.expert_of)
    )
    return run_train(cfg)


def main(argv: list[str] | None = None) -> int:
    return run(parser(), train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
