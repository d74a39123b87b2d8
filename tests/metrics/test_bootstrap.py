"""Stratified bootstrap statistics from first principles."""

from __future__ import annotations

import numpy as np
import pytest

from medsegdiff.metrics.bootstrap import metric_stats, paired_difference, stratified_bootstrap


def test_bootstrap_resamples_within_each_seed():
    # seed A: all 0, seed B: all 1, equal sizes -> every stratified resample has mean exactly 0.5
    st = stratified_bootstrap([np.zeros(6), np.ones(6)], resamples=500)
    assert st["mean"] == 0.5 and st["ci95"] == [0.5, 0.5] and st["n"] == 12
    # an unstratified bootstrap of the same 12 values would spread (binomial): the CI is not a point
    pooled = stratified_bootstrap([np.r_[np.zeros(6), np.ones(6)]], resamples=500)
    assert pooled["ci95"][0] < 0.4 and pooled["ci95"][1] > 0.6


def test_bootstrap_ci_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = stratified_bootstrap([rng.normal(0.5, 0.1, 8)], resamples=2000)
    large = stratified_bootstrap([rng.normal(0.5, 0.1, 200)], resamples=2000)
    for st in (small, large):
        assert st["ci95"][0] < st["mean"] < st["ci95"][1]
    width = lambda s: s["ci95"][1] - s["ci95"][0]  # noqa: E731
    assert width(large) < width(small) / 3  # ~ 1 / sqrt(n)
    # the normal-theory half width 1.96 sd / sqrt(n) is what the percentile bootstrap approximates
    assert width(large) / 2 == pytest.approx(1.96 * large["sd"] / np.sqrt(200), rel=0.2)
    assert stratified_bootstrap([np.array([np.nan])])["mean"] is None


def test_paired_difference_matches_cases_by_seed_and_id():
    a = {0: [{"case_id": "c1", "dice": 0.9}, {"case_id": "c2", "dice": 0.3}],
         1: [{"case_id": "c1", "dice": 0.5}]}
    b = {0: [{"case_id": "c2", "dice": 0.2}, {"case_id": "c1", "dice": 0.8}, {"case_id": "c9", "dice": 0.0}],
         1: [{"case_id": "c1", "dice": 0.4}]}
    st = paired_difference(a, b, resamples=300)  # every shared case is exactly +0.1 better
    assert st["n"] == 3 and st["mean"] == pytest.approx(0.1)
    assert st["ci95"] == pytest.approx([0.1, 0.1]) and st["sd"] == pytest.approx(0.0, abs=1e-12)


def test_extra_per_case_metrics_pass_through():
    rows = {0: [{"case_id": "a", "dice": 1.0, "ece": 0.25, "hd95": None}, {"case_id": "b", "dice": 0.0, "ece": 0.75}]}
    stats = metric_stats(rows, resamples=100)
    assert stats["ece"]["mean"] == 0.5 and stats["dice"]["n"] == 2
    assert stats["hd95"]["mean"] is None  # NaN (JSON null) values are dropped
