"""One way to fail: a ``UserError`` is bad input a person can fix; its message says what and how.

Every ``jobs/*.py`` entry point turns a ``UserError`` into its message on stderr and exit code 2,
without a traceback (``jobs/_runner.py``). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input (a flag, a config value, a file, a directory); the message names it and what was
    expected. A ``ValueError`` so library callers that caught ``ValueError`` keep working."""
