"""The output head and the cross-entropy fused, chunk by chunk: the logits of a whole batch never exist at once.

A 49k-150k vocabulary makes the logits the largest activation of a small model: (trained tokens x vocabulary) floats,
kept for backward along with their softmax. `head_cross_entropy` computes, one chunk of positions at a time, the
logits, the summed cross-entropy and its gradients with respect to the hidden states (and to the head's weight when
it is trained), then drops the chunk's logits: the backward pass only scales the gradients it kept. Same arithmetic
as the head followed by `cross_entropy(reduction="sum")`, no recomputation; peak memory one chunk of logits. (Liger
Kernel's fused linear cross-entropy does the same on Triton devices, and TRL's chunked head there.)

`hidden_states` runs a model with its output head replaced by the identity, for the positions `logits_to_keep`
names; `head_is_last` tells whether the model's logits are its head's output as they are (no soft-capping or scaling
after the head, as Gemma 2 and Cohere apply), which the fused loss needs. `trained_positions_loss` puts them
together: the trainer's loss off CUDA (TRL's own fused head on CUDA), and every perplexity the evaluations report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from skytune.core.chat.tokenization import IGNORE
from skytune.core.models.devices import fsdp_enabled

CHUNK_BYTES = 64 * 2**20  # the float32 logits of one chunk: ~341 positions of a 49k vocabulary
HEAD_IS_LAST = "_skytune_head_is_last"  # set on an output head once `head_is_last` has measured it
Head = tuple[torch.nn.Module, str, torch.nn.Linear]  # (parent module, attribute name, the head)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
        rows = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
        w = weight.float()
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and ctx.needs_input_grad[2] \
            else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows].float(), targets[start:start + rows]
            valid = t != IGNORE
            logits = h @ w.T
            if bias is not None:
                logits += bias.float()
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
            total += torch.where(valid, lse - picked, 0.0).sum()
            # d(sum of losses)/d(logits) = softmax - one-hot, on the trained positions only.
            grad = logits.sub_(lse.unsqueeze(1)).exp_()
            grad[valid, t[valid]] -= 1.0
            grad[~valid] = 0.0
            grad_hidden[start:start + rows] = (grad @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad.T @ h
            if grad_bias is not None:
                grad_bias += grad.sum(dim=0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = weight.dtype, bias.dtype if bias is not None else None
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (grad_hidden * grad_output.to(grad_hidden.dtype),
                (grad_weight * grad_output).to(weight_dtype) if grad_weight is not None else None,
                (grad_bias * grad_output).to(bias_dtype) if grad_bias is not None else None,
                None)


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       targets: torch.Tensor) -> torch.Tensor:
    """sum over positions of cross_entropy(hidden @ weight.T + bias, targets), positions whose target is IGNORE
    left out; `hidden` is (positions, hidden size), `targets` (positions,). Without gradients to compute (an
    evaluation), only the loss, chunk by chunk, with the head in the model's dtype as its own forward computes it."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if needs_grad:
        return _HeadCrossEntropy.apply(hidden, weight, bias, targets)
    rows = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        logits = torch.nn.functional.linear(hidden[start:start + rows].to(weight.dtype), weight, bias).float()
        total += torch.nn.functional.cross_entropy(logits, targets[start:start + rows], ignore_index=IGNORE,
                                                   reduction="sum")
    return total


def output_head(model: torch.nn.Module) -> Head | None:
    """(parent module, attribute name, head) of the model's output head when it is a plain Linear, else None."""
    inner = model.module if hasattr(model, "module") and not hasattr(model, "get_output_embeddings") else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return None
    for name, module in inner.named_modules():
        if module is head and name:
            parent, _, attribute = name.rpartition(".")
            return inner.get_submodule(parent), attribute, head
    return None


@contextlib.contextmanager
def _identity_head(found: Head) -> Iterator[None]:
    parent, attribute, head = found
    setattr(parent, attribute, torch.nn.Identity())
    try:
        yield
    finally:
        setattr(parent, attribute, head)


def hidden_states(model: torch.nn.Module, found: Head, inputs: dict[str, Any], keep: torch.Tensor) -> torch.Tensor:
    """The final hidden states at the positions `keep`: the model's forward with its head as the identity."""
    with _identity_head(found):
        return model(**inputs, logits_to_keep=keep, use_cache=False).logits


def head_is_last(model: torch.nn.Module, found: Head, input_ids: torch.Tensor) -> bool:
    """Whether the model's logits are its head applied to `hidden_states`, nothing after (measured on a few tokens,
    in evaluation mode, so no dropout differs and no random number is drawn)."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ids = input_ids[:, :8]
            logits = model(input_ids=ids, use_cache=False).logits
            with _identity_head(found):
                hidden = model(input_ids=ids, use_cache=False).logits
            head = found[2]
            again = torch.nn.functional.linear(hidden.to(head.weight.dtype), head.weight, head.bias)
    finally:
        model.train(training)
    return logits.shape == again.shape and torch.allclose(logits.float(), again.float(), rtol=1e-4, atol=1e-4)


def fusable_head(model: torch.nn.Module, input_ids: torch.Tensor) -> Head | None:
    """`output_head` when the loss can be fused with it: a plain Linear whose output is the model's logits
    (`head_is_last`, measured on the first call for a head and remembered on it); else None."""
    found = output_head(model)
    if found is None:
        return None
    if not hasattr(found[2], HEAD_IS_LAST):
        setattr(found[2], HEAD_IS_LAST, head_is_last(model, found, input_ids))
    return found if getattr(found[2], HEAD_IS_LAST) else None


def trained_positions_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
    """The next-token cross-entropy over the trained tokens, with the output head applied only where the next label
    is trained (`logits_to_keep`): the head of a 49k-150k vocabulary is a large share of a small model's compute, and
    assistant tokens are often a quarter of a sequence. The head and the loss are fused chunk by chunk, so the
    logits of the batch are never held at once, unless the model changes its logits after the head (soft-capping,
    scaling). Summed, then divided by `num_items_in_batch` (the trained tokens of the whole
    optimizer step, as transformers counts them) or this batch's trained tokens. `inputs` holds the model's inputs
    (a padded batch's attention_mask, or padding-free position_ids) and `labels`."""
    targets = inputs["labels"][:, 1:]
    keep = (targets != IGNORE).any(dim=0).nonzero().flatten()  # positions whose next token is trained, in any row
    kept = targets[:, keep]
    features = {k: v for k, v in inputs.items() if k != "labels"}
    # (Under FSDP the head's weight is a shard outside the model's forward: the plain loss.)
    found = None if fsdp_enabled() else fusable_head(model, inputs["input_ids"])
    if found is not None:
        hidden = hidden_states(model, found, features, keep)
        head = found[2]
        loss = head_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, kept.reshape(-1))
    else:
        logits = model(**features, logits_to_keep=keep, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), kept.reshape(-1),
                                                 ignore_index=IGNORE, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (kept != IGNORE).sum().clamp(min=1)
    return loss / count
