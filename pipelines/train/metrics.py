"""Training metrics: the loss per condition subset, throughput and data wait, per metric window.

A window sums on the device from one metric point to the next (no host sync per step) and is
reduced over all workers in one all-reduce when logged. ``LossWatch`` reads each window's loss:
a loss that is not a number stops the run, one that blows up is flagged.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics

import torch

from models import CONDITIONS


def loss_group_names() -> list[str]:
    """MLflow names: ``loss`` over every row; ``loss/none`` rows with every condition dropped
    (the unconditional model), ``loss/all`` rows with every available one kept, and
    ``loss/with_<name>`` rows where that condition was kept."""
    return ["loss", "loss/none", "loss/all"] + [f"loss/with_{c}" for c in CONDITIONS]


def subset_losses(per_row: torch.Tensor, presence: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """(sum, count) pairs per loss group (``loss_group_names``), flattened: (2 × groups,).

    ``per_row`` (B,) losses; ``presence`` and ``available`` (B, 8) bool, in ``CONDITIONS`` order."""
    every = torch.ones_like(presence[:, 0])
    groups = [every, ~presence.any(1), (presence == available).all(1) & available.any(1)]
    groups += [presence[:, i] for i in range(presence.shape[1])]
    out = []
    for g in groups:
        g = g.to(per_row.device)
        out += [(per_row * g).sum(), g.sum().to(per_row.dtype)]
    return torch.stack(out)


@dataclasses.dataclass
class Window:
    """Sums since the last metric point, kept on ``device``."""

    device: torch.device
    steps: int = 0
    time: float = 0.0  # seconds in optimizer steps, data wait included
    wait: float = 0.0  # seconds waiting for the next batch

    def __post_init__(self) -> None:
        self.sums = torch.zeros(2 * len(loss_group_names()), dtype=torch.float64, device=self.device)
        self.grad_norm = torch.zeros((), dtype=torch.float64, device=self.device)

    def add(self, per_row: torch.Tensor, presence: torch.Tensor, available: torch.Tensor) -> None:
        self.sums += subset_losses(per_row.double(), presence, available)

    def reduce(self, world: int, global_batch: int) -> dict[str, float]:
        """The window's metrics over all ``world`` workers (collective: call on every rank)."""
        times = torch.tensor([self.time, self.wait], dtype=torch.float64, device=self.device)
        vec = torch.cat([self.sums, times, self.grad_norm[None]])
        if world > 1:
            import torch.distributed as dist

            t = vec if dist.get_backend() == "nccl" else vec.cpu()  # gloo reduces CPU tensors
            dist.all_reduce(t)
            vec = t
        vec = vec.cpu()
        sums, (time_sum, wait_sum, norm_sum) = vec[:-3], vec[-3:].tolist()
        out: dict[str, float] = {}
        for i, name in enumerate(loss_group_names()):
            s, n = float(sums[2 * i]), float(sums[2 * i + 1])
            if n > 0:
                out[name] = s / n
        step_time = time_sum / world  # mean over workers of the window's wall time
        out["images_per_s"] = global_batch * self.steps / max(step_time, 1e-9)
        out["data_wait_fraction"] = wait_sum / max(time_sum, 1e-9)
        out["step_time_s"] = step_time / max(self.steps, 1)
        if self.steps and norm_sum:
            out["grad_norm"] = norm_sum / world / self.steps
        return out


def progress_line(step: int, total: int, m: dict[str, float]) -> str:
    return (
        f"step {step}/{total}  loss {m.get('loss', float('nan')):.4f}  "
        f"{m['images_per_s']:.1f} img/s  data wait {100 * m['data_wait_fraction']:.1f}%"
    )


class LossNotFinite(RuntimeError):
    """The training loss became nan or inf: every step after it would train on garbage."""


@dataclasses.dataclass
class LossWatch:
    """Reads the training loss of each metric window (the same figure on every worker, after the
    window's all-reduce, so every worker decides alike).

    - A loss that is nan or inf raises ``LossNotFinite``: the run stops, its checkpoints so far kept.
    - A loss above ``factor`` × the median of the last ``history`` windows for ``patience`` windows
      in a row is a blow-up (a learning rate too high: the loss climbs several-fold and stays
      there); ``check`` returns the warning once, and again only after the loss has come back.
    """

    factor: float = 3.0
    patience: int = 5
    history: int = 50
    min_history: int = 10  # windows seen before a blow-up can be called

    def __post_init__(self) -> None:
        self.losses: collections.deque[float] = collections.deque(maxlen=self.history)
        self.strikes = 0
        self.flagged = False

    def check(self, step: int, loss: float | None) -> str | None:
        """The warning to log for the window ending at ``step``, or None."""
        if loss is None:
            return None
        if not math.isfinite(loss):
            raise LossNotFinite(
                f"the training loss is {loss} at step {step}: the run stops here, its checkpoints so far "
                "are kept. A learning rate too high is the usual cause: lower optim.lr (or raise "
                "optim.warmup_steps) in a new run, or fine-tune the last good export with init_from"
            )
        if len(self.losses) >= self.min_history:
            median = statistics.median(self.losses)
            if loss > self.factor * median:
                self.strikes += 1
                if self.strikes >= self.patience and not self.flagged:
                    self.flagged = True
                    return (
                        f"the training loss has blown up: {loss:.4g} at step {step}, over {self.factor:g}x "
                        f"its median {median:.4g} for {self.strikes} metric windows in a row; a learning "
                        "rate too high diverges like this. Lower optim.lr, or stop the run and fine-tune "
                        "its last good checkpoint"
                    )
                return None  # a blown-up window does not become the baseline
            self.strikes, self.flagged = 0, False
        self.losses.append(loss)
        return None
