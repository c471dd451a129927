"""The one shape of every ``jobs/*.py`` entry point: argparse → one library call → exit code.

``run`` configures logging from ``--quiet`` / ``--verbose``, calls the library, prints its result
as JSON on stdout with ``--json``, and turns a ``UserError`` into its message and exit code 2
(no traceback: the message says what to fix). Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from typing import Any

from pipelines.errors import UserError
from pipelines.log import configure


def add_common_arguments(p: argparse.ArgumentParser, json_help: str | None = None) -> None:
    """``--json`` (when the verb has a summary), ``--quiet`` and ``--verbose``."""
    if json_help is not None:
        p.add_argument("--json", action="store_true", help=json_help)
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    g.add_argument("-v", "--verbose", action="store_true", help="debug messages on stderr")


def to_json(result: Any) -> str:
    """A result's own ``to_dict()`` where it has one (the record it writes leaves out keys that
    do not apply), else the dataclass's fields."""
    if hasattr(result, "to_dict"):
        result = result.to_dict()
    elif dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = dataclasses.asdict(result)
    return json.dumps(result, indent=2, default=str)


def run(
    parser: argparse.ArgumentParser, call: Callable[[argparse.Namespace], Any], argv: list[str] | None
) -> int:
    """Parse ``argv``, run ``call(args)``; 0 on success, 2 on a ``UserError``."""
    args = parser.parse_args(argv)
    configure(-1 if getattr(args, "quiet", False) else 1 if getattr(args, "verbose", False) else 0)
    try:
        result = call(args)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "json", False) and result is not None:
        print(to_json(result))
    return 0
