"""``recompose train`` / ``python -m jobs.train``: decomposition shards -> a trained pipeline.

    recompose train --data DIR --output RUN_DIR [--preset tiny|small|medium|base] [--max-steps N]
        [--workers N] [--gpus-per-worker N] [--base BASE_DIR [--mode full|adapter]]
        [--stage base|upsampler|prior [--upsample-factor 2|3|4] [--prior-of MODEL]]
        [--config FILE] [--set key=value …]

With ``--base`` the Composer UNet starts as a pretrained Stable Diffusion 1.x/2.x UNet (a diffusers
pipeline directory, or a repo id in the local Hugging Face cache), exactly that model at step 0,
trained on the latents and caption embeddings that ``recompose decompose --base`` stored.

With ``--stage upsampler`` it trains a super-resolution model of Composer's cascade on the same
data: each image's low-resolution input (side / factor) is derived on the fly and noise-augmented.
With ``--stage prior`` it trains the cascade's prior, caption -> semantics embedding, on the data's
(caption, semantics) pairs; ``--prior-of`` names the base model whose semantics embedding it learns
(on data without CLIP semantics).

Runs on the Ray cluster in ``RAY_ADDRESS`` (as under ``ray job submit``) or a local Ray. Running
the same command again resumes RUN_DIR from its latest checkpoint, in the same MLflow run.
"""

from __future__ import annotations

import argparse

from jobs._runner import add_common_arguments, run
from pipelines.config import add_config_arguments, load_config
from pipelines.train.config import TrainConfig
from pipelines.train.run import TrainResult, run_train


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recompose train", description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--data", required=True, help="a `recompose decompose` output directory (config: data)")
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
    add_config_arguments(p, "configs/train-*.yaml", "optim.lr=3e-4")
    add_common_arguments(p, json_help="print the summary as JSON on stdout")
    return p


def train(args: argparse.Namespace) -> TrainResult:
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
    }
    return run_train(load_config(TrainConfig, args.config, values, args.overrides))


def main(argv: list[str] | None = None) -> int:
    return run(parser(), train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
