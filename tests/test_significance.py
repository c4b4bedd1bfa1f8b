"""The paired tests behind the forgetting flag, on score vectors built here with known answers: the p-values against
SciPy's own binomial and t tests, and the flag's rule (a drop past the threshold and significant) through
`forgetting.compare` on lm-eval-shaped scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from skytune.core.evaluation import forgetting, significance
from skytune.core.evaluation.harness import Scores

LIMITS = forgetting.Limits(max_regression=0.05, max_increase=0.25, alpha=0.05, seed=0)


def paired_01(n: int, both: int, base_only: int, tuned_only: int) -> tuple[list[float], list[float]]:
    """0/1 scores of two models on `n` items: `both` right for both, `base_only` / `tuned_only` right for one."""
    base = [1.0] * both + [1.0] * base_only + [0.0] * tuned_only
    tuned = [1.0] * both + [0.0] * base_only + [1.0] * tuned_only
    rest = n - len(base)
    return base + [0.0] * rest, tuned + [0.0] * rest


def scores(values: list[float], task: str = "bench") -> Scores:
    return Scores(tasks={task: {"acc": sum(values) / len(values)}}, stderr={}, higher_is_better={task: {"acc": True}},
                  examples={task: len(values)}, engine="transformers", lm_eval="test",
                  items={task: {"ids": [f"{task}/{i}" for i in range(len(values))],
                                "metrics": {"acc": [[v, 1.0] for v in values]}}})


@pytest.mark.parametrize(("worse", "better"), [(5, 2), (150, 30), (0, 7), (4, 4), (1, 0), (20, 35)])
def test_mcnemars_exact_p_value_is_the_binomial_test_of_the_discordant_items(worse: int, better: int) -> None:
    base, tuned = paired_01(200, 60, worse, better)
    expected = stats.binomtest(worse, worse + better, 0.5).pvalue
    assert significance.mcnemar_exact(base, tuned) == pytest.approx(expected, rel=1e-12)


def test_a_large_benchmarks_real_small_drop_is_flagged() -> None:
    """2000 items, 0.80 -> 0.74 (150 items lost, 30 gained): past the 0.05 threshold and far from noise."""
    base, tuned = paired_01(2000, 1450, 150, 30)
    entry = forgetting.compare(scores(base), scores(base), scores(tuned), LIMITS)["bench"]["acc"]
    assert (entry["base"], entry["tuned"]) == (0.8, 0.74)
    assert entry["test"] == "mcnemar_exact" and entry["p_value"] < 1e-10 and entry["forgot"] is True
    assert entry["ci_low"] < -0.06 < entry["ci_high"] < -0.03


def test_a_fifty_item_noise_drop_is_not_flagged() -> None:
    """50 items, 0.74 -> 0.68 (5 lost, 2 gained): past the threshold, but McNemar's p is 0.45."""
    base, tuned = paired_01(50, 32, 5, 2)
    entry = forgetting.compare(scores(base), scores(base), scores(tuned), LIMITS)["bench"]["acc"]
    assert (entry["base"], entry["tuned"], entry["delta"]) == (0.74, 0.68, -0.06)
    assert entry["p_value"] == round(stats.binomtest(2, 7, 0.5).pvalue, 4) and entry["forgot"] is False
    assert entry["ci_low"] < 0 < entry["ci_high"]
    assert forgetting.regressed(0.74, 0.68, higher_is_better=True, max_regression=0.05, max_increase=0.25)


def test_a_significant_drop_below_the_threshold_is_not_flagged() -> None:
    base, tuned = paired_01(4000, 3000, 120, 0)  # 0.78 -> 0.75: certain, but within max_regression
    entry = forgetting.compare(scores(base), scores(base), scores(tuned), LIMITS)["bench"]["acc"]
    assert entry["p_value"] < 1e-10 and entry["delta"] == -0.03 and entry["forgot"] is False


@pytest.mark.parametrize("shift", [-0.1, -0.02, 0.0])
def test_the_paired_bootstrap_agrees_with_the_paired_t_test_on_a_continuous_score(shift: float) -> None:
    """400 items of a continuous score: the bootstrap's p-value and interval match the paired t-test's (the
    central limit holds at this size)."""
    rng = np.random.default_rng(7)
    base = rng.uniform(0.2, 0.8, 400)
    tuned = base + shift + rng.normal(0, 0.3, 400)
    compared = significance.compare([[b, 1] for b in base], [[t, 1] for t in tuned], significance.mean_delta,
                                    alpha=0.05, seed=1)
    t = stats.ttest_rel(tuned, base)
    interval = t.confidence_interval(0.95)
    assert compared.test == "paired_bootstrap"
    assert compared.delta == pytest.approx(float(np.mean(tuned - base)), abs=1e-12)
    assert compared.p_value == pytest.approx(t.pvalue, abs=0.02 if t.pvalue > 0.01 else 0.002)
    assert compared.ci_low == pytest.approx(interval.low, abs=0.005)
    assert compared.ci_high == pytest.approx(interval.high, abs=0.005)


def test_items_holding_several_scores_are_compared_as_the_ratio_of_sums() -> None:
    """IFEval's instruction-level accuracy: an item holds its instructions' scores, the metric is all instructions'
    mean (not the mean of item means)."""
    base = [[3, 3], [1, 2], [0, 1], [2, 4]] * 30
    tuned = [[1, 3], [0, 2], [0, 1], [1, 4]] * 30
    compared = significance.compare(base, tuned, significance.mean_delta, alpha=0.05, seed=0)
    assert compared.test == "paired_bootstrap"
    assert compared.delta == pytest.approx(2 / 10 - 6 / 10)
    assert compared.p_value < 0.001 and compared.ci_high < 0


def test_perplexity_rising_on_every_text_is_significant_and_one_texts_blowup_is_not() -> None:
    """Text by text (summed NLL, tokens): a rise of ~30% on each of 16 texts is flagged; the same mean rise from one
    text alone is not significant (a resample without it has no rise at all)."""
    tokens = [40 + 5 * i for i in range(16)]
    base = [[2.0 * n, n] for n in tokens]
    everywhere = [[(2.0 + math.log(1.3)) * n, n] for n in tokens]
    compared = significance.compare(base, everywhere, significance.perplexity_delta, alpha=0.05, seed=0)
    base_ppl, tuned_ppl = math.exp(2.0), math.exp(2.0 + math.log(1.3))
    assert compared.delta == pytest.approx(tuned_ppl - base_ppl) and compared.p_value < 0.001
    entry = forgetting.entry(base_ppl, base_ppl, tuned_ppl, False, LIMITS, compared)
    assert entry["forgot"] is True and entry["test"] == "paired_bootstrap"

    one = [list(pair) for pair in base]
    one[3][0] += sum(tokens) * math.log(1.3)  # the whole rise on text 3
    alone = significance.compare(base, one, significance.perplexity_delta, alpha=0.05, seed=0)
    assert alone.delta == pytest.approx(tuned_ppl - base_ppl) and alone.p_value > 0.2
    assert forgetting.entry(base_ppl, base_ppl, tuned_ppl, False, LIMITS, alone)["forgot"] is False


def test_no_change_is_p_one_and_the_numbers_are_seeded() -> None:
    base, _ = paired_01(60, 30, 0, 0)
    same = significance.compare([[v, 1] for v in base], [[v, 1] for v in base], significance.mean_delta,
                                alpha=0.05, seed=0)
    assert (same.delta, same.p_value, same.ci_low, same.ci_high) == (0.0, 1.0, 0.0, 0.0)
    items = [[float(i % 3), 1.0] for i in range(50)], [[float(i % 4), 1.0] for i in range(50)]
    runs = [significance.compare(*items, significance.mean_delta, alpha=0.05, seed=s) for s in (3, 3, 4)]
    assert runs[0] == runs[1] != runs[2]


def test_other_items_than_the_bases_are_refused_as_stale() -> None:
    base, tuned = scores([1.0, 0.0, 1.0]), scores([1.0, 1.0, 1.0])
    tuned.items["bench"]["ids"][0] = "bench/9"
    with pytest.raises(Exception, match="other items than the tuned model.*dvc repro evaluate_base"):
        forgetting.compare(base, base, tuned, LIMITS)


def test_a_metric_without_per_item_scores_is_flagged_on_the_threshold_alone() -> None:
    base, tuned = scores([1.0] * 10), scores([0.0] * 10)
    base.items.clear()
    entry = forgetting.compare(base, base, tuned, LIMITS)["bench"]["acc"]
    assert entry["test"] == forgetting.NO_TEST and "p_value" not in entry and entry["forgot"] is True


def test_a_drop_from_quantization_is_told_apart_from_training_and_not_flagged() -> None:
    """The control (the 4-bit base, dequantized) lost 0.10 of the base's 0.80; training then changed nothing: the
    whole delta is quantization's, significant, and no flag, since the flag is training's. The same drop made by
    training instead is flagged."""
    base, control = paired_01(2000, 1400, 200, 0)
    entry = forgetting.compare(scores(base), scores(control), scores(control), LIMITS)["bench"]["acc"]
    assert (entry["base"], entry["control"], entry["tuned"]) == (0.8, 0.7, 0.7)
    assert (entry["delta"], entry["quantization"], entry["training"]) == (-0.1, -0.1, 0.0)
    assert entry["quantization_p_value"] < 1e-10 and entry["p_value"] == 1.0 and entry["forgot"] is False
    by_training = forgetting.compare(scores(base), scores(base), scores(control), LIMITS)["bench"]["acc"]
    assert (by_training["quantization"], by_training["training"]) == (0.0, -0.1)
    assert by_training["quantization_p_value"] == 1.0 and by_training["forgot"] is True


def test_an_item_with_nothing_scored_is_left_out() -> None:
    """A text with no token scored (0, 0) carries no evidence: the comparison is the one without it, not NaN."""
    base = [[2.0 * n, n] for n in (30, 40, 50, 60)]
    tuned = [[2.5 * n, n] for n in (30, 40, 50, 60)]
    alone = significance.compare(base, tuned, significance.perplexity_delta, alpha=0.05, seed=0)
    padded = significance.compare([*base, [0, 0]], [*tuned, [0, 0]], significance.perplexity_delta, alpha=0.05,
                                  seed=0)
    assert math.isfinite(padded.ci_low) and math.isfinite(padded.p_value)
    assert padded.delta == pytest.approx(alone.delta)
