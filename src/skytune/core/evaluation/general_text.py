"""Forgetting without a benchmark (as peft#2925 measures it): the base model answers generic prompts once, greedily,
and each model's perplexity on those answers is compared. Text the base wrote itself is text it finds likely and
that no training set holds; a tuned model that finds it much less likely has lost some of the base's general
language."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from skytune.core.atomic import read_jsonl
from skytune.core.chat import chat_template, tokenization
from skytune.core.errors import SkytuneError
from skytune.core.evaluation import generation, scoring

FILE = "general_text.jsonl"  # the base's answers, in paths.base_scores_dir


def read_prompts(path: Path | str, count: int) -> list[str]:
    """The first `count` prompts of `path` (`{"prompt": text}` per line)."""
    if count == 0:
        return []
    prompts = []
    for line, row in enumerate(read_jsonl(path), 1):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise SkytuneError(f"{path}:{line}: give 'prompt' (text)")
        prompts.append(row["prompt"])
    if len(prompts) < count:
        raise SkytuneError(f"{path} has {len(prompts)} prompts; evaluate.general_text.prompts asks for {count}: "
                           "lower it or add prompts")
    return prompts[:count]


def write(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int,
          batch_size: int) -> list[dict[str, Any]]:
    """The model's greedy answers to `prompts`: `{"prompt", "text", "stopped"}` each."""
    rendered = [chat_template.render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    answers = generation.generate_greedy(model, tokenizer, rendered, stop_tokens=chat_template.stop_tokens(tokenizer),
                                         max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [{"prompt": p, "text": a.text, "stopped": a.stopped} for p, a in zip(prompts, answers, strict=True)]


def losses(model: Any, tokenizer: Any, texts: list[dict[str, Any]]) -> list[tuple[float, int]]:
    """The model's summed negative log-likelihood of each answer of `texts` given its prompt (rendered by
    `tokenizer`'s chat template; the answer's tokens scored, and its end-of-turn token where the base stopped by
    itself: an answer cut at max_new_tokens has none), and the tokens scored: per text, so that two models' can be
    compared text by text (`scoring.perplexity_of` gives the perplexity)."""
    records = [{"id": f"general-{i}", "messages": [{"role": "user", "content": t["prompt"]},
                                                   {"role": "assistant", "content": t["text"]}]}
               for i, t in enumerate(texts, 1)]
    encoded = tokenization.Encoder(tokenizer, "assistant_only").encode(records)
    for record, text in zip(encoded, texts, strict=True):
        if not text["stopped"]:
            last = max(i for i, label in enumerate(record.labels) if label != tokenization.IGNORE)
            record.labels[last] = tokenization.IGNORE  # the end-of-turn token the template closes the turn with
    return scoring.record_nll(model, encoded, pad_id=tokenizer.pad_token_id)
