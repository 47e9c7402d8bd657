"""The table's statistics on constructed cases whose answers are known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorapar.stats import mean_std, paired_bootstrap, verdict


def test_mean_std_uses_the_sample_deviation():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([0.4]) == (0.4, 0.0)
    with pytest.raises(ValueError):
        mean_std([])


def test_bootstrap_interval_matches_the_normal_interval_of_a_known_difference():
    # One seed, 2000 items: arm a is right on the first 60%, arm b on the first 40% (nested), so the
    # per-item difference is 1 on 20% of items and 0 elsewhere: d = 0.2, sd = sqrt(0.2 * 0.8) = 0.4,
    # and the 95% interval is 0.2 +- 1.96 * 0.4 / sqrt(2000) = 0.2 +- 0.0175.
    n = 2000
    a = (np.arange(n) < 0.6 * n).astype(float)
    b = (np.arange(n) < 0.4 * n).astype(float)
    result = paired_bootstrap(a, b, n_boot=4000, seed=1)
    half = 1.96 * 0.4 / math.sqrt(n)
    assert result["diff"] == pytest.approx(0.2)
    assert result["low"] == pytest.approx(0.2 - half, abs=0.004)
    assert result["high"] == pytest.approx(0.2 + half, abs=0.004)
    assert verdict(result) == "higher" and verdict(paired_bootstrap(b, a, n_boot=500)) == "lower"


def test_pairing_removes_the_shared_item_difficulty():
    # Both arms share a hard/easy split over items; a is b shifted by one correct item in 50. Unpaired,
    # each accuracy would wobble by ~1.1 points; paired, the only variation is in which items differ.
    rng = np.random.default_rng(0)
    b = (rng.random((3, 1000)) < 0.5).astype(float)
    a = b.copy()
    a[:, ::50] = 1.0
    b[:, ::50] = 0.0
    result = paired_bootstrap(a, b, n_boot=2000)
    assert result["diff"] == pytest.approx(0.02)
    assert result["high"] - result["low"] < 0.02  # an unpaired interval is ~0.08 wide here
    assert result["low"] > 0


def test_seed_resampling_widens_the_interval_when_seeds_disagree():
    # Identical per-item outcomes within a seed, but seed 0 gains 10 points and seed 1 loses 10:
    # the item level alone says "exactly +0", the seed level spreads the replicates to +-0.1.
    n = 500
    b = np.zeros((2, n))
    a = np.zeros((2, n))
    a[0, : n // 10] = 1.0
    b[1, : n // 10] = 1.0
    result = paired_bootstrap(a, b, n_boot=2000)
    assert result["diff"] == pytest.approx(0.0)
    assert result["low"] == pytest.approx(-0.1, abs=0.02) and result["high"] == pytest.approx(0.1, abs=0.02)
    assert verdict(result) == "unresolved"


def test_a_constant_difference_has_a_point_interval_and_bad_shapes_are_refused():
    result = paired_bootstrap(np.ones((3, 10)), np.zeros((3, 10)), n_boot=100)
    assert (result["diff"], result["low"], result["high"]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="same"):
        paired_bootstrap(np.ones((3, 10)), np.ones((2, 10)))


def test_only_the_all_items_comparison_is_a_verdict_on_a_claim():
    """A per-system difference explains an overall one; reading it as the paper's claim would let a run
    'support' and 'contradict' one claim at once (as a first version of the report did). A comparison
    made on System 2 alone (GRPO vs SFT) is read there."""
    from lorapar.results import claim_reading

    every = ("overall", "system1", "system2")
    assert claim_reading("higher", "overall", every, "higher") == "supports"
    assert claim_reading("higher", "overall", every, "lower") == "contradicts"
    assert claim_reading("higher", "overall", every, "unresolved") == "not resolved"
    assert claim_reading("higher", "system1", every, "higher") == "no claim"
    assert claim_reading("higher", "system2", every, "lower") == "no claim"
    assert claim_reading("higher", "system2", ("system2",), "higher") == "supports"
    assert claim_reading(None, "overall", every, "higher") == "no claim"
