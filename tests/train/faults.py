"""Worker failures for the training tests, through the seam ``pipelines.train.run.step_hook``."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class FailOnce:
    """Rank 0 raises on reaching ``step``, once: ``marker`` records that it did, so the worker
    group Ray restarts from the latest checkpoint trains on. Picklable: Ray ships it to the workers.
    """

    step: int
    marker: str

    def __call__(self, rank: int, step: int) -> None:
        marker = Path(self.marker)
        if rank == 0 and step == self.step and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
            raise RuntimeError(f"failing once at step {step} on purpose (test)")


@dataclasses.dataclass(frozen=True)
class KillAt:
    """Rank 0's process dies (``os._exit``, no cleanup, as a kill) at the end-of-run ``point``,
    through the seam ``pipelines.train.run.finish_hook``."""

    point: str

    def __call__(self, point: str) -> None:
        import os

        if point == self.point:
            os._exit(1)
