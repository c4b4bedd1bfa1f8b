"""Base, control and tuned, per task and metric. The control is the base as the tuned model was merged onto it, with
no adapter (after QLoRA: quantized to 4 bits and dequantized), so the change from the base splits in two:
`quantization` (control - base) and `training` (tuned - control). Each gets a paired test on the same items
(`significance`), and the tuned model forgot where training's drop is both past the threshold
(`evaluate.max_regression`, or `evaluate.max_perplexity_increase` for a perplexity) and significant at
`evaluate.alpha`. A small benchmark's drop can be noise, and a large one's real drop can be small: the threshold
says how much matters, the test whether it is there at all."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from skytune.core.errors import SkytuneError
from skytune.core.evaluation import significance
from skytune.core.evaluation.harness import Scores

DIGITS = 4
NO_TEST = "none"  # a metric lm-eval does not aggregate as a mean of per-item scores: flagged on the threshold alone


@dataclass(frozen=True)
class Limits:
    """`evaluate`'s flagging rule: how large a drop matters, and the significance level a drop must reach."""

    max_regression: float
    max_increase: float
    alpha: float
    seed: int


def regressed(base: float, tuned: float, *, higher_is_better: bool, max_regression: float,
              max_increase: float) -> bool:
    """A score where higher is better (in [0, 1]) regressed when it fell by more than `max_regression` (absolute);
    one where lower is better (a perplexity) when it rose by more than `max_increase` of the base's (relative)."""
    if higher_is_better:
        return round(base - tuned, 9) > max_regression
    return base > 0 and round(tuned / base - 1, 9) > max_increase


def compare(base: Scores, control: Scores, tuned: Scores, limits: Limits) -> dict[str, Any]:
    """{task: {metric: entry}} over the base's tasks and metrics (`entry`; `delta_stderr`, the standard error of the
    delta from the base from lm-eval's own, where it gives both scores')."""
    out: dict[str, Any] = {}
    for task, metrics in base.tasks.items():
        training, quantization = _paired_items(control, tuned, task), _paired_items(base, control, task)
        for metric, before in metrics.items():
            after, reference = (s.tasks.get(task, {}).get(metric) for s in (tuned, control))
            if after is None or reference is None:
                raise SkytuneError(f"evaluate: the tuned model or the control has no {task} {metric} score, the base "
                                   "has: the base's scores are stale (dvc repro evaluate_base)")
            tests = [significance.compare(*pairs[metric], significance.mean_delta, alpha=limits.alpha,
                                          seed=limits.seed) if metric in pairs else None
                     for pairs in (training, quantization)]
            out.setdefault(task, {})[metric] = entry(before, reference, after, base.higher_is_better[task][metric],
                                                     limits, *tests)
            errors = [s.get(task, {}).get(metric) for s in (base.stderr, tuned.stderr)]
            if None not in errors:
                out[task][metric]["delta_stderr"] = round(math.hypot(*errors), DIGITS)
    return out


def _paired_items(reference: Scores, tuned: Scores, task: str) -> dict[str, tuple[list[Any], list[Any]]]:
    """{metric: (reference items, tuned items)} for the metrics both models have per-item scores of, on the same
    items."""
    mine, theirs = reference.items.get(task), tuned.items.get(task)
    if not mine or not theirs:
        return {}
    if mine["ids"] != theirs["ids"]:
        raise SkytuneError(f"evaluate: {task}: the base was scored on other items than the tuned model (evaluate.limit "
                           "or the task's data changed since): the base's scores are stale (dvc repro evaluate_base)")
    return {metric: (items, theirs["metrics"][metric]) for metric, items in mine["metrics"].items()
            if metric in theirs["metrics"]}


def entry(base: float, control: float, tuned: float, higher_is_better: bool, limits: Limits,
          training: significance.Comparison | None,
          quantization: significance.Comparison | None = None) -> dict[str, Any]:
    """Base, control, tuned; `delta` (tuned - base) split into `quantization` (control - base) and `training` (tuned -
    control); training's paired test: `p_value`, the interval `ci_low`..`ci_high` and which `test` (`none` without
    per-item scores), and quantization's `quantization_p_value`; `forgot`: training's drop past the threshold and,
    where tested, significant."""
    past = regressed(control, tuned, higher_is_better=higher_is_better, max_regression=limits.max_regression,
                     max_increase=limits.max_increase)
    tested: dict[str, Any] = {"test": NO_TEST}
    if training is not None:
        tested = {"p_value": round(training.p_value, DIGITS), "ci_low": round(training.ci_low, DIGITS),
                  "ci_high": round(training.ci_high, DIGITS), "test": training.test}
    if quantization is not None:
        tested["quantization_p_value"] = round(quantization.p_value, DIGITS)
    significant = training is None or training.p_value < limits.alpha
    return {"base": round(base, DIGITS), "control": round(control, DIGITS), "tuned": round(tuned, DIGITS),
            "delta": round(tuned - base, DIGITS), "quantization": round(control - base, DIGITS),
            "training": round(tuned - control, DIGITS), **tested, "forgot": bool(past and significant)}


def forgotten(tasks: dict[str, Any]) -> list[str]:
    """`task.metric` of every flagged entry of a `compare` result (or any {name: {metric: entry}})."""
    return [f"{task}.{metric}" for task, metrics in tasks.items() for metric, e in metrics.items() if e["forgot"]]
