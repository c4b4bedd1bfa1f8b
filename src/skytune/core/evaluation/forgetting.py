"""Base vs tuned, per task and metric: the delta, and whether the tuned model forgot (a regression past the
threshold of `evaluate.max_regression` or `evaluate.max_perplexity_increase`)."""

from __future__ import annotations

import math
from typing import Any

from skytune.core.errors import SkytuneError
from skytune.core.evaluation.harness import Scores

DIGITS = 4


def regressed(base: float, tuned: float, *, higher_is_better: bool, max_regression: float,
              max_increase: float) -> bool:
    """A score where higher is better (in [0, 1]) regressed when it fell by more than `max_regression` (absolute);
    one where lower is better (a perplexity) when it rose by more than `max_increase` of the base's (relative)."""
    if higher_is_better:
        return round(base - tuned, 9) > max_regression
    return base > 0 and round(tuned / base - 1, 9) > max_increase


def compare(base: Scores, tuned: Scores, *, max_regression: float, max_increase: float) -> dict[str, Any]:
    """{task: {metric: {"base", "tuned", "delta", "delta_stderr"?, "forgot"}}} over the base's tasks and metrics
    (`delta_stderr`, the standard error of the delta, where lm-eval gives both scores' own: a delta within about
    two of it may be noise)."""
    out: dict[str, Any] = {}
    for task, metrics in base.tasks.items():
        for metric, before in metrics.items():
            after = tuned.tasks.get(task, {}).get(metric)
            if after is None:
                raise SkytuneError(f"evaluate: the tuned model has no {task} {metric} score, the base has: the base's "
                                   "scores are stale (dvc repro evaluate_base)")
            higher = base.higher_is_better[task][metric]
            errors = [s.get(task, {}).get(metric) for s in (base.stderr, tuned.stderr)]
            out.setdefault(task, {})[metric] = entry(before, after, higher_is_better=higher,
                                                     max_regression=max_regression, max_increase=max_increase)
            if None not in errors:
                out[task][metric]["delta_stderr"] = round(math.hypot(*errors), DIGITS)
    return out


def entry(base: float, tuned: float, *, higher_is_better: bool, max_regression: float,
          max_increase: float) -> dict[str, Any]:
    return {"base": round(base, DIGITS), "tuned": round(tuned, DIGITS), "delta": round(tuned - base, DIGITS),
            "forgot": regressed(base, tuned, higher_is_better=higher_is_better, max_regression=max_regression,
                                max_increase=max_increase)}


def forgotten(tasks: dict[str, Any]) -> list[str]:
    """`task.metric` of every flagged entry of a `compare` result (or any {name: {metric: entry}})."""
    return [f"{task}.{metric}" for task, metrics in tasks.items() for metric, e in metrics.items() if e["forgot"]]
