"""Scores of a model and of its answers: perplexity over the trained tokens, answer statistics, and the agreement
of two sets of answers (two engines, or batched vs one-by-one)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from skytune.core.chat.tokenization import IGNORE, Encoded
from skytune.core.evaluation.generation import Generation
from skytune.core.training.head_loss import trained_positions_loss

# Padded tokens per forward at most (8 rows of 512): bounds the logits a soft-capping model holds at once.
PERPLEXITY_TOKENS = 4096


@torch.no_grad()
def perplexity(model: Any, records: Sequence[Encoded], *, pad_id: int, batch_size: int) -> tuple[float, int]:
    """exp(mean negative log-likelihood) over every labelled token of `records` (token-weighted, the labels the
    trainer used), and the number of such tokens. (nan, 0) for no labelled tokens. The output head runs on the
    labelled positions only (`trained_positions_loss`), one chunk of them at a time where the head is the model's
    last step. A model that soft-caps its logits gets them whole for the labelled positions of a batch, so a batch
    holds at most PERPLEXITY_TOKENS (rows x longest): what the logits of a batch can cost stays bounded."""
    total, count = 0.0, 0
    lengths = [len(r.input_ids) for r in records]
    for chunk in _batches(sorted(range(len(records)), key=lengths.__getitem__), lengths, batch_size):
        nll, labelled = _summed_nll(model, [records[i] for i in chunk], pad_id)
        total, count = total + nll, count + labelled
    return (math.exp(total / count) if count else math.nan), count


@torch.no_grad()
def record_nll(model: Any, records: Sequence[Encoded], *, pad_id: int) -> list[tuple[float, int]]:
    """Each record's summed negative log-likelihood over its labelled tokens, and their number: one forward per
    record, for a paired comparison of two models over the same records."""
    return [_summed_nll(model, [record], pad_id) for record in records]


def perplexity_of(losses: Sequence[Sequence[float]]) -> tuple[float, int]:
    """The perplexity of `record_nll`'s (summed NLL, tokens) pairs taken together, and the tokens."""
    total, count = sum(loss for loss, _ in losses), int(sum(tokens for _, tokens in losses))
    return (math.exp(total / count) if count else math.nan), count


def _summed_nll(model: Any, batch: Sequence[Encoded], pad_id: int) -> tuple[float, int]:
    """The summed cross-entropy of a right-padded batch over its labelled next tokens, and their number."""
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
    if not labelled:
        return 0.0, 0
    device = next(model.parameters()).device
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
    return trained_positions_loss(model, inputs, num_items_in_batch=1).item(), labelled


def _batches(order: list[int], lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """`order` (ascending lengths) in batches of at most `batch_size` rows and PERPLEXITY_TOKENS padded tokens (a
    longer record alone)."""
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) == batch_size or (len(batch) + 1) * lengths[i] > PERPLEXITY_TOKENS):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


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
