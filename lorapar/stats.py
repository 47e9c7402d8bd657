"""Statistics of the pipeline's table: mean and spread over seeds, paired bootstrap intervals.

Every method is run with the same seeds and evaluated on the same test items, so two methods (or one
method before and after GRPO) give paired outcomes: correct[s, i] for seed s and item i. The
difference of their accuracies is

    d = mean over (s, i) of (a[s, i] - b[s, i])

and its 95% interval comes from a two-level percentile bootstrap: each replicate draws S seeds with
replacement and, independently, N items with replacement (the same items for every drawn seed, since
an item's difficulty is shared across seeds), and recomputes d on that sample. The 2.5th and 97.5th
percentiles of the replicates bound the interval. Resampling items captures the test set's sampling
error; resampling seeds captures the run-to-run variation of training (adapter init, data order,
GRPO samples). With few seeds the seed level is coarse, so the interval is a floor on the true
uncertainty rather than an exact coverage guarantee.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    if len(values) == 0:
        raise ValueError("mean_std of no values")
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def paired_bootstrap(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of a - b over seeds and items with its percentile bootstrap interval.

    a, b: (seeds, items) arrays of per-item outcomes (1/0 for correct) of two arms on the same test
    items and seeds. Returns {"diff", "low", "high", "seeds", "items", "n_boot"}.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim == 1:
        a, b = a[None], b[None]
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"paired_bootstrap: both arms need the same (seeds, items) shape; got {a.shape} and {b.shape}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"paired_bootstrap: level must be in (0, 1), got {level}")
    d = a - b
    n_seeds, n_items = d.shape
    rng = np.random.default_rng(seed)
    replicates = np.empty(n_boot)
    for k in range(n_boot):
        seeds = rng.integers(0, n_seeds, n_seeds)
        items = rng.integers(0, n_items, n_items)
        # mean over the drawn (seed, item) grid = mean over drawn seeds of each seed's per-item sums
        per_item = np.bincount(items, minlength=n_items)
        replicates[k] = (d[seeds] @ per_item).sum() / (n_seeds * n_items)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return {
        "diff": float(d.mean()),
        "low": float(low),
        "high": float(high),
        "seeds": n_seeds,
        "items": n_items,
        "n_boot": n_boot,
    }


def verdict(interval: dict) -> str:
    """'higher' / 'lower' when the interval excludes zero, else 'unresolved'."""
    if interval["low"] > 0:
        return "higher"
    if interval["high"] < 0:
        return "lower"
    return "unresolved"
