"""Scoring of skytune_knowledge: the answer holds an accepted answer as a whole word or number."""

from __future__ import annotations

from typing import Any

from skytune.core.evaluation.scoring import contains_answer


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"answer_match": float(contains_answer(results[0], doc["accept"]))}
