"""skytune_choice: its held-out half (the task the metrics report) or its dev half (skytune_choice_dev, what a
recipe may be tuned on), split by skytune.core.evaluation.holdout."""

from __future__ import annotations

from typing import Any

from skytune.core.evaluation import holdout


def heldout(dataset: Any) -> Any:
    return dataset.filter(lambda doc: holdout.half(doc["question"]) == holdout.HELDOUT)


def dev(dataset: Any) -> Any:
    return dataset.filter(lambda doc: holdout.half(doc["question"]) == holdout.DEV)
