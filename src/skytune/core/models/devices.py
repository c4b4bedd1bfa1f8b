"""Where a process puts the model and in which dtype: its GPU or the CPU, whole or sharded by FSDP."""

from __future__ import annotations

import os
from typing import Any

import torch


def fsdp_enabled() -> bool:
    """Whether this process was started by `accelerate launch` with an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true")


def device_map() -> dict[str, Any] | None:
    """Where a process puts the whole model: its own GPU (LOCAL_RANK under torchrun/accelerate), or the CPU.
    None under FSDP, which shards the model itself."""
    if fsdp_enabled():
        return None
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def compute_dtype(name: str) -> torch.dtype:
    """`auto`: bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU."""
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
