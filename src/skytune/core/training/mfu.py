"""Model FLOPs utilization of a training run on GPUs."""

from __future__ import annotations

import torch

# Dense bf16 peak of one GPU, for MFU (FIELD_NOTES performance anchors; vendor datasheets).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 125e12,
                   "A10": 125e12}


def mfu(tokens_per_second: float, params: int, trainable: int, world_size: int) -> float | None:
    """Model FLOPs utilization: useful FLOPs/s over the GPUs' dense bf16 peak. Forward 2N, backward 2N for the
    activation gradients plus 2 x trainable for the weight gradients; None off GPU or on an unknown GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    if peak is None:
        return None
    return tokens_per_second * (4 * params + 2 * trainable) / (peak * world_size)
