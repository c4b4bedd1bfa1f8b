"""Scores of a model and of its answers: perplexity over the trained tokens, answer statistics, and the agreement
of two sets of answers (two engines, or batched vs one-by-one)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from skytune.core.chat.tokenization import IGNORE, Encoded
from skytune.core.evaluation.generation import Generation
from skytune.core.training.head_loss import trained_positions_loss


@torch.no_grad()
def perplexity(model: Any, records: Sequence[Encoded], *, pad_id: int, batch_size: int) -> tuple[float, int]:
    """exp(mean negative log-likelihood) over every labelled token of `records` (token-weighted, the labels the
    trainer used), and the number of such tokens. (nan, 0) for no labelled tokens. The loss of the trainer
    (`trained_positions_loss`): the output head runs on the labelled positions only, so a batch's logits are one
    chunk of those, never every position's."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    order = sorted(range(len(records)), key=lambda i: len(records[i].input_ids))
    for start in range(0, len(order), batch_size):
        batch = [records[i] for i in order[start:start + batch_size]]
        width = max(len(r.input_ids) for r in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, r in enumerate(batch):
            n = len(r.input_ids)
            ids[row, :n] = torch.tensor(r.input_ids)
            labels[row, :n] = torch.tensor(r.labels)
            mask[row, :n] = 1
        labelled = int((labels[:, 1:] != IGNORE).sum())
        if labelled:
            inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
            total += trained_positions_loss(model, inputs, num_items_in_batch=1).item()  # the sum
            count += labelled
    return (math.exp(total / count) if count else math.nan), count


def contains_answer(text: str, accepted: Sequence[str]) -> bool:
    """Whether `text` holds one of the `accepted` answers as a whole word or number, ignoring case ("Paris" in "The
    capital of France is Paris.", not "4" in "14")."""
    lowered = text.lower()
    return any(re.search(rf"(?<![a-z0-9]){re.escape(answer.lower())}(?![a-z0-9])", lowered) for answer in accepted)


def mean(values: Sequence[float]) -> float:
    return round(sum(values) / len(values), 4) if values else 0.0


def answer_stats(generations: Sequence[Generation]) -> dict[str, float]:
    """Mean answer length in tokens and the fraction of answers that ended with an end-of-turn/EOS token (a model
    that never learned to stop scores 0 and runs to max_new_tokens)."""
    return {
        "ends_with_eot": mean([float(g.stopped) for g in generations]),
        "mean_answer_tokens": mean([float(g.num_tokens) for g in generations]),
    }


def agreement(a: Sequence[Generation], b: Sequence[Generation]) -> dict[str, float]:
    """How alike two answer lists to the same prompts are: the fraction of identical answers, and the fraction of
    answers whose stop/no-stop outcome agrees."""
    if len(a) != len(b):
        raise ValueError(f"cannot compare {len(a)} answers with {len(b)}")
    return {
        "exact_match": mean([float(x.text == y.text) for x, y in zip(a, b, strict=True)]),
        "stop_agreement": mean([float(x.stopped == y.stopped) for x, y in zip(a, b, strict=True)]),
    }
