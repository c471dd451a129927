"""The ``recompose`` console command: one subcommand per stage, each also ``python -m jobs.<stage>``."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "quickstart": ("jobs.quickstart", "the whole system end to end on one machine, with an HTML report"),
    "synth": ("jobs.synth", "write the built-in synthetic shapes dataset"),
    "decompose": ("jobs.decompose", "decompose an image dataset into condition shards (Ray Data)"),
    "train": ("jobs.train", "train the multi-conditional model on condition shards (Ray Train, MLflow)"),
    "generate": ("jobs.generate", "generate or edit images with a trained pipeline from any conditions"),
    "evaluate": ("jobs.evaluate", "measure a trained pipeline: condition fidelity, benchmark, FID (Ray)"),
    "serve": ("jobs.serve", "serve a trained pipeline over HTTP: JSON API and web page (Ray Serve)"),
}


def usage() -> str:
    lines = ["usage: recompose <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `recompose <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(
            f"recompose: unknown command {name!r}; known: {', '.join(COMMANDS)}\n\n{usage()}", file=sys.stderr
        )
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
