"""Batched greedy generation behind one function."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Generation:
    text: str
    num_tokens: int
    stopped: bool  # ended with an end-of-turn/EOS token rather than running out of max_new_tokens


@torch.no_grad()
def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    *,
    stop_tokens: list[str],
    max_new_tokens: int,
    batch_size: int,
) -> list[Generation]:
    """Greedy completions of already-rendered prompts, in batches, left-padded.

    Prompts are rendered by the chat template (which writes the BOS), so the tokenizer adds no special tokens.
    """
    stop_ids = sorted({tokenizer.convert_tokens_to_ids(t) for t in stop_tokens})
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    results: list[Generation] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        out = model.generate(
            **enc,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            ends = [i for i, tok in enumerate(row) if tok in stop_ids]
            stopped = bool(ends)
            tokens = row[: ends[0]] if stopped else row
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            results.append(Generation(text=text.strip(), num_tokens=len(tokens), stopped=stopped))
    return results
