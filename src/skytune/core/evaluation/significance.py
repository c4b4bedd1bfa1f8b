"""Whether a tuned model's change on a benchmark is more than noise: paired tests over the same items.

Both models answered the same items, so the comparison is paired: what differs item by item, not two independent
means. Each item is a pair (numerator, count): (score, 1) for a per-item score, (sum, n) for an item that holds n
scores (IFEval's instruction-level accuracy), (summed negative log-likelihood, tokens) for a text's perplexity.
- An accuracy-like metric (every item 0 or 1 for both models) gets the exact McNemar test: under no change, an item
  that one model gets right and the other wrong is as likely to go either way (a two-sided binomial test on the
  discordant items).
- Any other metric gets a paired bootstrap: items resampled with replacement, both models' statistic recomputed on
  the same resample; the p-value is the share of resampled deltas, centred on the observed one, at least as far from
  it as the observed delta is from zero (Efron & Tibshirani, ch. 16).
Every comparison also carries the bootstrap's percentile interval of the delta. Seeded: the same inputs give the same
numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
_CHUNK = 500  # resamples drawn at once: bounds the index matrix (chunk x items) of a large benchmark

Items = Sequence[Sequence[float]]  # per item (numerator, count), in the same item order for both models
# (reference sums, tuned sums) -> delta: each an array of shape (..., 2) of (sum of numerators, sum of counts)
Delta = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Comparison:
    """The tuned model against a reference on the same items: the delta (tuned - reference, in the statistic's own
    units), its two-sided p-value under no change, the test that gave it, and the delta's confidence interval."""

    delta: float
    p_value: float
    test: str
    ci_low: float
    ci_high: float


def mcnemar_exact(reference: Sequence[float], tuned: Sequence[float]) -> float:
    """The exact McNemar p-value (two-sided) of two 0/1 score vectors over the same items."""
    worse = int(sum(r > t for r, t in zip(reference, tuned, strict=True)))
    better = int(sum(t > r for r, t in zip(reference, tuned, strict=True)))
    discordant = worse + better
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(worse, better) + 1))
    return min(1.0, 2 * tail / 2**discordant)


def mean_delta(reference: np.ndarray, tuned: np.ndarray) -> np.ndarray:
    """A mean score's change: sum / count of each."""
    return tuned[..., 0] / tuned[..., 1] - reference[..., 0] / reference[..., 1]


def perplexity_delta(reference: np.ndarray, tuned: np.ndarray) -> np.ndarray:
    """A perplexity's change: exp(summed NLL / tokens) of each."""
    return np.exp(tuned[..., 0] / tuned[..., 1]) - np.exp(reference[..., 0] / reference[..., 1])


def is_binary(items: Items) -> bool:
    return all(count == 1 and value in (0, 1) for value, count in items)


def compare(reference: Items, tuned: Items, delta: Delta, *, alpha: float, seed: int,
            resamples: int = RESAMPLES) -> Comparison:
    """The paired comparison of `tuned` with `reference` (the same items, in the same order) for the statistic whose
    change `delta` computes: McNemar's exact p-value for 0/1 scores, else the paired bootstrap's; the bootstrap's
    (1 - alpha) percentile interval of the delta either way."""
    ref, new = np.asarray(reference, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    if ref.shape != new.shape or ref.ndim != 2 or ref.shape[1] != 2 or not len(ref):
        raise ValueError(f"paired items must be (numerator, count) pairs, as many for both: {ref.shape} vs "
                         f"{new.shape}")
    scored = (ref[:, 1] > 0) & (new[:, 1] > 0)  # an item with nothing scored (a text with no token) tells nothing
    ref, new = ref[scored], new[scored]
    observed = float(delta(ref.sum(axis=0), new.sum(axis=0)))
    deltas = _bootstrap(ref, new, delta, seed, resamples)
    far = int(np.count_nonzero(np.abs(deltas - observed) >= abs(observed) - 1e-12))
    if is_binary(ref.tolist()) and is_binary(new.tolist()):
        p_value, test = mcnemar_exact(ref[:, 0], new[:, 0]), "mcnemar_exact"
    else:
        p_value, test = (far + 1) / (resamples + 1), "paired_bootstrap"
    low, high = np.quantile(deltas, [alpha / 2, 1 - alpha / 2])
    return Comparison(observed, float(p_value), test, float(low), float(high))


def _bootstrap(ref: np.ndarray, new: np.ndarray, delta: Delta, seed: int, resamples: int) -> np.ndarray:
    """`resamples` deltas, each on the same resample (with replacement) of the items for both models."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, resamples, _CHUNK):
        picks = rng.integers(0, len(ref), size=(min(_CHUNK, resamples - start), len(ref)))
        out.append(delta(*(np.stack([side[:, 0][picks].sum(axis=1), side[:, 1][picks].sum(axis=1)], axis=-1)
                           for side in (ref, new))))
    return np.concatenate(out)
