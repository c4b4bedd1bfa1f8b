"""LoRA dropout that keeps a one-byte mask for backward instead of the dropped copy of every adapter's input.

PEFT computes `lora_B(lora_A(dropout(x)))`. For backward, autograd then keeps, per adapted layer, the dropped input
(what `lora_A` multiplied: 4 bytes per element in fp32) and the dropout's noise (4 bytes on the CPU, where PyTorch's
dropout keeps a float mask; 1 byte on CUDA), although `x` itself is alive anyway: q, k and v read the same `x`, and
so do gate and up. Every adapted layer's input is paid for once or twice more; with `all-linear` targets that is a
large share of the activations (`bench/train_throughput.py --live-memory`, SmolLM2-135M on 2 CPU cores: a live peak of
6.25 GB with PEFT's dropout, 4.79 GB with this one, at the same batches).

`install` moves the dropout into `lora_A`: the dropout module becomes a pass-through, and `lora_A` draws the same
Bernoulli mask PyTorch's dropout draws (the same generator calls, so the same masks and, on the CPU, the same forward
bits as PEFT's), multiplies, and keeps `x` (shared with its neighbours) and the mask as booleans. Backward rebuilds the
dropped input from the two. The gradients are PEFT's (the same products, in another order).

Applied to plain LoRA layers with dropout (`Linear` or bitsandbytes' 4-bit and 8-bit ones) when training computes in
fp32 (the CPU default), where it was measured. In bf16/fp16 (GPUs) autocast keeps a half-precision copy of the input
per layer either way, so the gain is unmeasured there, and on CUDA PyTorch's dropout draws its masks another way:
those keep PEFT's forward, as do DoRA and other variants, FSDP (whose flat parameters are the wrapper's to handle) and a
dropout of 0.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F


class _DroppedLinear(torch.autograd.Function):
    """`F.linear(dropout(x), weight)` with the mask kept as booleans and `x` kept as it is (no dropped copy)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        noise = torch.empty_like(x).bernoulli_(1 - p)  # as torch.nn.functional.dropout draws it
        keep = noise.bool()
        out = F.linear(x * noise.div_(1 - p), weight)
        # Only what backward needs, as autograd's own linear: x for the weight's gradient, the weight for x's.
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, keep,
                              weight if ctx.needs_input_grad[0] else None)
        ctx.p, ctx.weight_dtype, ctx.x_dtype = p, weight.dtype, x.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, keep, weight = ctx.saved_tensors
        dtype = grad.dtype  # under autocast (bf16) the forward's product was in it
        scale = keep.to(ctx.x_dtype).div_(1 - ctx.p)  # as the forward scaled: in x's dtype, then autocast's cast
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(dtype)).to(ctx.x_dtype) * scale
        if ctx.needs_input_grad[1]:
            dropped = (x * scale).to(dtype).reshape(-1, x.shape[-1])
            grad_weight = (grad.reshape(-1, grad.shape[-1]).t() @ dropped).to(ctx.weight_dtype)
        return grad_x, grad_weight, None


class DeferredDropout(torch.nn.Module):
    """Where PEFT's dropout was: passes `x` through; `lora_A` applies the dropout (`p`) itself."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f"p={self.p}, applied in lora_A"


def _lora_a_forward(linear: torch.nn.Linear, dropout: DeferredDropout, x: torch.Tensor) -> torch.Tensor:
    if not dropout.training:  # evaluation: no dropout, as PEFT's
        return F.linear(x, linear.weight)
    return _DroppedLinear.apply(x, linear.weight, dropout.p)


def install(model: Any) -> int:
    """Move every eligible LoRA layer's dropout into its `lora_A` (see the module's doc); the number of layers."""
    from peft.tuners.lora import LoraLayer

    moved = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, dropout in list(module.lora_dropout.items()):
            linear = module.lora_A[name] if name in module.lora_A else None  # noqa: SIM401 (ModuleDict has no get)
            if (type(dropout) is not torch.nn.Dropout or not 0 < dropout.p < 1 or name in module.lora_variant
                    or type(linear) is not torch.nn.Linear or linear.bias is not None):
                continue
            deferred = DeferredDropout(dropout.p)
            deferred.train(dropout.training)
            module.lora_dropout[name] = deferred
            linear.forward = partial(_lora_a_forward, linear, deferred)
            moved += 1
    return moved
