"""Write the built-in synthetic dataset: ``python -m jobs.synth --output DIR --count N``.

Thin entry point over ``pipelines.data.synth.write_synth``; see that module for the format.
"""

from __future__ import annotations

import argparse

from pipelines.data.synth import write_synth


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _resolution(text: str) -> int:
    value = int(text)
    if not 16 <= value <= 4096:
        raise argparse.ArgumentTypeError(f"expected an integer in [16, 4096], got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.synth",
        description="Write the synthetic shapes dataset (images, captions, instance and depth ground truth).",
    )
    parser.add_argument("--output", required=True, help="output directory (new, empty or a previous run's)")
    parser.add_argument("--count", required=True, type=_positive, help="number of samples")
    parser.add_argument(
        "--resolution", type=_resolution, default=64, help="image side in pixels (default 64)"
    )
    parser.add_argument("--seed", type=_non_negative, default=0, help="dataset seed (default 0)")
    parser.add_argument("--split", choices=("train", "heldout"), default="train", help="default train")
    args = parser.parse_args(argv)
    try:
        summary = write_synth(args.output, args.count, args.resolution, args.seed, args.split)
    except (FileExistsError, ValueError) as e:
        parser.error(str(e))
    print(
        f"synth: {summary['count']} samples in {summary['files']} files "
        f"({summary['written']} written, {summary['skipped']} skipped) in {summary['seconds']:.1f}s; "
        f"preview: {summary['preview']}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
