"""The ``recompose`` console command: one subcommand per stage, each also ``python -m jobs.<stage>``.

    recompose <command> [options]
    recompose --version
    python -m jobs.cli --write-docs docs/cli.md    # regenerate the command reference

A command's module is imported only when it runs, so ``recompose --help`` and ``--version`` start
without Ray or torch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import re
import sys
from pathlib import Path

COMMANDS = {
    "quickstart": ("jobs.quickstart", "the whole system end to end on one machine, with an HTML report"),
    "synth": ("jobs.synth", "write the built-in synthetic shapes dataset"),
    "decompose": ("jobs.decompose", "decompose an image dataset into condition shards (Ray Data)"),
    "train": ("jobs.train", "train the multi-conditional model on condition shards (Ray Train, MLflow)"),
    "generate": ("jobs.generate", "generate or edit images with a trained pipeline from any conditions"),
    "cascade": ("jobs.cascade", "assemble a base model and upsamplers into Composer's cascade"),
    "ensemble": ("jobs.ensemble", "join expert denoisers of noise ranges into one pipeline (eDiffi)"),
    "upscale": ("jobs.upscale", "super-resolve an image with an upsampler or a cascade's upsamplers"),
    "evaluate": ("jobs.evaluate", "measure a trained pipeline: condition fidelity, benchmark, FID (Ray)"),
    "serve": ("jobs.serve", "serve a trained pipeline over HTTP: JSON API and web page (Ray Serve)"),
    "reference": ("jobs.reference", "pack a training run as the shipped reference model, evaluated"),
}

DOCS_PATH = "docs/cli.md"
WRITE_DOCS_COMMAND = f"python -m jobs.cli --write-docs {DOCS_PATH}"
# argparse wraps help to the terminal's width ($COLUMNS); a fixed width keeps the reference stable.
# (Its layout also differs between Python versions: regenerate with the interpreter CI uses.)
HELP_COLUMNS = 100


def version() -> str:
    """The installed package's version, else (a bare checkout on PYTHONPATH) pyproject.toml's."""
    try:
        return importlib.metadata.version("recompose")
    except importlib.metadata.PackageNotFoundError:
        text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
        # A regex, not tomllib: Python 3.10 (requires-python) has no tomllib. [project] comes first.
        return re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE).group(1)


def usage() -> str:
    lines = ["usage: recompose <command> [options]", "       recompose --version", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `recompose <command> --help` for a command's options."]
    return "\n".join(lines)


def command_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of ``recompose <name>`` (imports the command's module)."""
    module = importlib.import_module(COMMANDS[name][0])
    if not hasattr(module, "parser"):
        raise AttributeError(f"{module.__name__} has no parser() function; every command needs one")
    return module.parser()


def _help_text(parser: argparse.ArgumentParser) -> str:
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(HELP_COLUMNS)
    if hasattr(parser, "color"):
        parser.color = False  # Python 3.14+ colours help on a terminal
    try:
        return parser.format_help()
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def reference_markdown() -> str:
    """docs/cli.md: every command's ``--help``, rendered from its own parser at a fixed width."""
    parts = [
        "# Command reference",
        "",
        "Generated from the commands' own argument parsers by",
        f"`{WRITE_DOCS_COMMAND}`; do not edit it by hand (`tests/jobs/test_cli.py`",
        "checks that it is current). Every command is also `python -m jobs.<command>` with the same",
        "options. What the commands do, with examples: the [README](../README.md) and",
        "[the other docs](README.md).",
        "",
        "## `recompose`",
        "",
        "```text",
        usage(),
        "```",
        "",
        "`recompose --version` prints:",
        "",
        "```text",
        f"recompose {version()}",
        "```",
    ]
    for name, (_, help_) in COMMANDS.items():
        help_text = _help_text(command_parser(name)).rstrip("\n")
        parts += ["", f"## `recompose {name}`", "", f"{help_[0].upper()}{help_[1:]}.", ""]
        parts += ["```text", help_text, "```"]
    return "\n".join(parts) + "\n"


def write_docs(path: str) -> None:
    from pipelines.files import write_bytes

    write_bytes(reference_markdown().encode(), path)
    print(f"recompose: wrote {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(f"recompose {version()}")
        return 0
    if argv[0] == "--write-docs":
        if len(argv) != 2:
            print(f"recompose: usage: {WRITE_DOCS_COMMAND}", file=sys.stderr)
            return 2
        write_docs(argv[1])
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
