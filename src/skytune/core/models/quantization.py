"""4-bit (bitsandbytes) on this machine: whether it runs, and the CPU workaround that keeps its gradients right."""

from __future__ import annotations

import torch


def four_bit_supported() -> tuple[bool, str]:
    """Whether bitsandbytes 4-bit runs on this machine, and why not if it does not."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:  # pragma: no cover - bitsandbytes is pinned in requirements.txt
        return False, f"bitsandbytes is not importable: {exc}"
    if torch.cuda.is_available() or not torch.backends.mps.is_available():
        return True, ""
    return False, "bitsandbytes has no 4-bit kernels for Apple MPS"


def disable_cpu_inference_repack(model: torch.nn.Module) -> int:
    """Work around bitsandbytes 0.50's silent wrong gradients on CPUs with AVX512-BF16.

    `Linear4bit.forward` repacks its weight, for good, into a CPU inference layout the first time it runs in eval
    mode on an input that needs no grad (any `evaluate()` or `generate()`); from then on the backward pass through
    the frozen base weight is dropped with only a warning, so LoRA gets wrong gradients. Turning the repack off
    keeps the trainable layout. Returns how many layers were changed.
    """
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
