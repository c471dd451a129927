"""One way to log: the standard ``logging`` module, one handler, the same lines from Ray workers.

Library code logs with ``logging.getLogger(__name__)``; the command line calls ``configure`` once
(``--quiet`` / ``--verbose``), and a Ray worker that logs calls ``configure_worker``. Every line
reads ``[stage] message``, the stage being the ``pipelines`` subpackage that logged it, so a
line says where it came from whichever process printed it. Progress bars (tqdm) stay as they are.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

ROOTS = ("pipelines", "jobs")  # the loggers this project owns

# Ray Train V2 wraps a worker's sys.stdout/sys.stderr so that every print reaches the driver twice;
# the process's own stderr reaches it once.
WORKER_LOG = sys.__stderr__


class _StageFormatter(logging.Formatter):
    """``[train] message``: the stage is the second part of the logger name (``pipelines.train.run``)."""

    def format(self, record: logging.LogRecord) -> str:
        parts = record.name.split(".")
        stage = parts[1] if len(parts) > 1 and parts[0] in ROOTS else parts[0]
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return f"[{stage}] {text}"


def configure(verbosity: int = 0, stream: TextIO | None = None) -> None:
    """One stream handler on the project's loggers; ``verbosity`` -1 quiet (warnings), 0 info, 1 debug.

    Calling it again replaces the handler (tests call it with their own stream)."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_StageFormatter())
    for name in ROOTS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if getattr(h, "_recompose", False):
                logger.removeHandler(h)
        handler._recompose = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False


def configure_worker(verbosity: int = 0) -> None:
    """``configure`` for a Ray worker process: to the process's own stderr (see ``WORKER_LOG``)."""
    configure(verbosity, WORKER_LOG)
