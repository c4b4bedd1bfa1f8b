"""skytune_knowledge: its held-out half (the task the metrics report) or its dev half (skytune_knowledge_dev, what a
recipe may be tuned on), split by skytune.core.evaluation.holdout; an answer is right when it holds an accepted
answer as a whole word or number."""

from __future__ import annotations

from typing import Any

from skytune.core.evaluation import holdout
from skytune.core.evaluation.scoring import contains_answer


def heldout(dataset: Any) -> Any:
    return dataset.filter(lambda doc: holdout.half(doc["question"]) == holdout.HELDOUT)


def dev(dataset: Any) -> Any:
    return dataset.filter(lambda doc: holdout.half(doc["question"]) == holdout.DEV)


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"answer_match": float(contains_answer(results[0], doc["accept"]))}
