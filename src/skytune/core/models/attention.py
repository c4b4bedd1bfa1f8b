"""Attention for padding-free and packed batches: one causal attention per sequence, not one over the whole row.

A padding-free batch is its sequences back to back in one row. Without FlashAttention's varlen kernels, transformers
attends over that row with a block-diagonal mask, which costs (sum of lengths)^2: on a CPU, or a GPU without
flash-attn, it gives back much of what dropping the padding saved. `varlen_sdpa` uses the sequence boundaries TRL's
collator passes (`cu_seq_lens_q`) to run PyTorch's SDPA once per sequence, causal and unmasked (sum of lengths^2, and
SDPA's fused kernels); anything else (padded batches, generation, soft-capped layers, a sliding window shorter
than a sequence) goes to transformers' own SDPA path.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

NAME = "skytune_varlen_sdpa"


def varlen_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; query/key/value are (batch, heads, tokens, head_dim)."""
    from transformers.integrations.sdpa_attention import (
        repeat_kv,
        sdpa_attention_forward,
    )

    bounds = kwargs.get("cu_seq_lens_q")
    cuts = bounds.tolist() if bounds is not None else []
    window = kwargs.get("sliding_window")
    # A sliding window shorter than a sequence changes its attention, and SDPA has no soft-capping: leave those
    # to transformers (a window longer than every sequence, Mistral's 4096 say, changes nothing).
    windowed = bool(cuts) and window is not None and max(b - a for a, b in itertools.pairwise(cuts)) > window
    if not cuts or windowed or kwargs.get("softcap") is not None or query.shape[0] != 1 or \
            query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    parts = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout,
                                            is_causal=True, scale=scaling)
             for a, b in itertools.pairwise(cuts) if b > a]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def use_varlen_sdpa(model: Any) -> bool:
    """Switch a model on SDPA attention to `varlen_sdpa`; keep FlashAttention, eager and the rest as they are."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if model.config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(NAME, varlen_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
