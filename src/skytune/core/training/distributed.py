"""torch.distributed helpers that also run in a single process (no process group: a no-op or the local value)."""

from __future__ import annotations

import os
from typing import Any, TypeVar

import torch

T = TypeVar("T")


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


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return torch.distributed.get_rank() if distributed() else 0


def local_main() -> bool:
    """Whether this process is its node's first (LOCAL_RANK 0): the one that reads and lists the node's files."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def all_gather(obj: T) -> list[T]:
    """Every process's `obj`, in rank order (picklable objects; `[obj]` in a single process)."""
    if not distributed():
        return [obj]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def broadcast(obj: T) -> T:
    """Rank 0's `obj`, on every process."""
    if not distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
