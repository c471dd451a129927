"""Training metrics: the loss per condition subset, throughput and data wait, per metric window.

A window sums on the device from one metric point to the next (no host sync per step) and is
reduced over all workers in one all-reduce when logged.
"""

from __future__ import annotations

import dataclasses

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
