"""Bootstrap statistics over per-case metrics stratified by data seed (the learning benchmark's CIs).

:func:`stratified_bootstrap` is a percentile bootstrap (Efron & Tibshirani 1993, ch. 13) that resamples
within each stratum (data seed), so every resample keeps the observed number of cases per seed.
:func:`paired_difference` bootstraps the per-case differences of two methods on the cases both
scored, which removes the case-to-case spread that dominates unpaired comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def stratified_bootstrap(values_by_seed: Sequence[np.ndarray], *, resamples: int = 2000, level: float = 0.95,
                         seed: int = 0) -> dict[str, Any]:
    """Mean of all values and its percentile-bootstrap CI, resampling within each stratum (seed).

    Each resample draws ``n_s`` values with replacement from every stratum ``s`` and takes the
    mean of all drawn values, so the number of values per seed stays as observed.

    Args:
        values_by_seed: one 1-D array per stratum (NaN values are dropped).
        resamples: bootstrap resamples.
        level: confidence level.
        seed: generator seed (the result is deterministic).

    Returns:
        ``mean``, ``ci95`` ``[low, high]`` (None when there are no values), ``sd`` (of all values),
        ``n``.
    """
    strata = [np.asarray(v, dtype=np.float64) for v in values_by_seed]
    strata = [v[np.isfinite(v)] for v in strata]
    strata = [v for v in strata if v.size]
    n = sum(v.size for v in strata)
    if n == 0:
        return {"mean": None, "ci95": None, "sd": None, "n": 0}
    allv = np.concatenate(strata)
    rng = np.random.default_rng(seed)
    sums = np.zeros(resamples)
    for v in strata:
        sums += v[rng.integers(0, v.size, size=(resamples, v.size))].sum(axis=1)
    means = sums / n
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return {"mean": float(allv.mean()), "ci95": [float(lo), float(hi)], "sd": float(allv.std(ddof=1)) if n > 1
            else 0.0, "n": int(n)}


def _rows_by_seed(rows: Mapping[int, Sequence[Mapping[str, Any]]]) -> dict[int, dict[str, Mapping[str, Any]]]:
    return {seed: {str(r["case_id"]): r for r in rs} for seed, rs in rows.items()}


def metric_stats(rows: Mapping[int, Sequence[Mapping[str, Any]]], *, resamples: int) -> dict[str, Any]:
    """Bootstrap statistics of every numeric per-case key (the official metrics and any extras)."""
    keys: list[str] = []
    for rs in rows.values():
        for r in rs:
            keys += [k for k, v in r.items() if k not in keys and k != "case_id"
                     and (v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))]
    return {k: stratified_bootstrap([np.array([_num(r.get(k)) for r in rs]) for rs in rows.values()],
                                    resamples=resamples) for k in keys}


def _num(value: Any) -> float:
    """A per-case value as float; None (NaN written as JSON null) and non-numbers are NaN (dropped)."""
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def paired_difference(rows: Mapping[int, Sequence[Mapping[str, Any]]],
                      ref_rows: Mapping[int, Sequence[Mapping[str, Any]]], key: str = "dice", *,
                      resamples: int = 2000) -> dict[str, Any]:
    """Paired ``method - reference`` on the cases both have (matched by seed and case id), bootstrapped."""
    a, b = _rows_by_seed(rows), _rows_by_seed(ref_rows)
    diffs = []
    for seed in sorted(set(a) & set(b)):
        common = sorted(set(a[seed]) & set(b[seed]))
        diffs.append(np.array([_num(a[seed][c].get(key)) - _num(b[seed][c].get(key)) for c in common]))
    return stratified_bootstrap(diffs, resamples=resamples)


__all__ = ["metric_stats", "paired_difference", "stratified_bootstrap"]
