"""torch.distributed helpers that also run in a single process (no process group: a no-op or the local value)."""

from __future__ import annotations

import torch


def distributed() -> bool:
    """Whether a process group is up (torchrun, accelerate)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    """Wait for every process; nothing to wait for in a single process."""
    if distributed():
        torch.distributed.barrier()


def any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process."""
    if not distributed():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    value = torch.tensor([1 if flag else 0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())
