"""DDP or FSDP behind one small interface for the training loop.

- ``ddp``: Ray Train's ``prepare_model`` (DistributedDataParallel; gloo on CPU, NCCL on GPU).
- ``fsdp``: PyTorch's FSDP2 ``fully_shard`` on every UNet down/up block and the mid block, then
  the whole model, so parameters, gradients and AdamW state are split over the workers. Ray's
  ``prepare_model(parallel_strategy="fsdp")`` wraps with FSDP1, which refuses CPU-only workers
  ("FSDP needs a non-CPU accelerator"); FSDP2 runs on gloo too, so the same code is tested here.

Checkpoints and exports always hold *full* (unsharded) weights and optimizer state keyed by
parameter name, gathered with ``torch.distributed.checkpoint.state_dict`` (``full_state_dict``)
under both strategies, so a run can resume with another strategy or worker count. Every function that gathers must be called on
every rank; the gathered state is returned on rank 0 only (None elsewhere).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist

from models import ComposerModel


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def wrap(
    model: ComposerModel, strategy: str, device: torch.device, some_unused: bool = False
) -> torch.nn.Module:
    """``model`` ready for data-parallel training (on ``device``). ``some_unused``: some
    parameters never get a gradient (the paths of conditions the data lacks), which DDP must be
    told to expect (``find_unused_parameters``)."""
    import ray.train.torch

    if strategy == "ddp":
        kwargs = {"find_unused_parameters": True} if some_unused else {}
        return ray.train.torch.prepare_model(model, parallel_strategy="ddp", parallel_strategy_kwargs=kwargs)
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    unet = model.unet
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        if block is not None:
            fully_shard(block)
    fully_shard(model)
    return model


def no_sync(wrapped: torch.nn.Module, strategy: str):
    """Skip the gradient all-reduce for a micro-step of gradient accumulation."""
    if not _distributed():
        return contextlib.nullcontext()
    if strategy == "ddp":
        return wrapped.no_sync()

    @contextlib.contextmanager
    def fsdp_no_sync():
        wrapped.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)

    return fsdp_no_sync()


def clip_grad_norm(wrapped: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clips in place; returns the total norm before clipping (a 0-d tensor on the device)."""
    norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return norm.detach()


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_weights(model: ComposerModel) -> dict[str, torch.Tensor] | None:
    """The full model state dict on CPU (rank 0; None elsewhere). Collective: call on every rank."""
    if _distributed():
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_options())
        return state if _rank() == 0 else None
    if _rank() != 0:
        return None
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def full_ema_weights(model: ComposerModel, ema: Any) -> dict[str, torch.Tensor] | None:
    """The EMA weights as a full state dict (rank 0); the model's own weights without an EMA."""
    if ema is None:
        return full_weights(model)
    params = [p for p in model.parameters() if p.requires_grad]  # the EMA's (loop.trainable)
    ema.store(params)
    ema.copy_to(params)
    try:
        return full_weights(model)
    finally:
        ema.restore(params)


def load_weights(model: ComposerModel, state: dict[str, torch.Tensor]) -> None:
    """Full weights (the same on every rank) into a wrapped model."""
    if _distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state)


def optimizer_state(model: ComposerModel, optimizer: torch.optim.Optimizer) -> dict | None:
    """The full optimizer state keyed by parameter name (rank 0). Collective."""
    if _distributed():
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(model, optimizer, options=_options())
        return state if _rank() == 0 else None
    return optimizer.state_dict() if _rank() == 0 else None


def load_optimizer_state(model: ComposerModel, optimizer: torch.optim.Optimizer, state: dict) -> None:
    if _distributed():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # strict=False: a parameter that never had a gradient (its condition absent from the
        # data) has no AdamW state to restore, which strict loading would call a mismatch
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_optimizer_state_dict(model, optimizer, state, options=options)
    else:
        optimizer.load_state_dict(state)
