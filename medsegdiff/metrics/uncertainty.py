"""Uncertainty and ensemble metrics of one case: calibration, ensemble gain, diversity, error detection.

All functions take numpy arrays of one case (any shape; members stacked on axis 0) and return
Python floats; NaN where a quantity is undefined (said per function). ``region`` restricts the
voxel-wise metrics to a boolean mask (the brain), as the reference notes ask.

* Calibration of the mean probability: the expected calibration error over equal-width bins,
  ``ECE = sum_b (n_b / n) |acc_b - conf_b|`` (Guo et al. 2017, arXiv:1706.04599, Eq. 3), and the
  Brier score ``mean((p - y)^2)`` (Brier 1950).
* Ensemble gain: Dice of the combined mask minus the mean Dice of the members.
* Diversity: the mean pairwise Dice between members, and the generalised energy distance with
  ``d = 1 - IoU``, ``D^2 = 2 E d(S, Y) - E d(S, S') - E d(Y, Y')`` (Kohl et al. 2018, the
  probabilistic U-Net, arXiv:1806.05034, Eq. 4); with one reference annotation ``E d(Y, Y') = 0``.
* Error detection: the AUROC of the per-voxel uncertainty for separating error voxels (the final
  mask differs from the reference) from correct ones, by the Mann-Whitney rank statistic with
  average ranks for ties (so a constant uncertainty scores 0.5).

Choices the papers leave open (written down here):

* Dice and IoU of two empty masks are 1 (so ``d = 0``): two members that both see no lesion agree.
* ``E d(S, S')`` averages over pairs of *different* members (independent draws, ``i != j``); with
  one member it is 0.
* ECE uses 10 bins by default (``n_bins``); a probability of exactly 1 falls in the last bin.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata

from medsegdiff.metrics.isles24 import dice_score

__all__ = [
    "UNCERTAINTY_KEYS",
    "brier_score",
    "dice_score",
    "ensemble_gain",
    "error_detection_auroc",
    "expected_calibration_error",
    "generalized_energy_distance",
    "iou_distance",
    "pairwise_dice",
    "uncertainty_metrics",
]

UNCERTAINTY_KEYS = (
    "ece",
    "brier",
    "ensemble_gain",
    "member_dice_mean",
    "member_pairwise_dice",
    "ged",
    "uncertainty_auroc",
)
"""The keys :func:`uncertainty_metrics` returns, in a stable order (CSV columns)."""


def _select(values: np.ndarray, region: np.ndarray | None) -> np.ndarray:
    values = np.asarray(values)
    if region is None:
        return values.ravel()
    region = np.asarray(region, dtype=bool)
    if region.shape != values.shape:
        raise ValueError(f"region shape {region.shape} != values shape {values.shape}")
    return values[region]


def expected_calibration_error(prob: np.ndarray, target: np.ndarray, region: np.ndarray | None = None,
                               n_bins: int = 10) -> float:
    """ECE of voxel probabilities over ``n_bins`` equal-width bins of [0, 1].

    Args:
        prob: probabilities in [0, 1], any shape.
        target: reference mask of the same shape (nonzero = lesion).
        region: optional boolean mask of the voxels to score (the brain).
        n_bins: number of equal-width bins.

    Returns:
        ``sum_b (n_b / n) |mean(target in b) - mean(prob in b)|``; NaN for an empty region.

    Raises:
        ValueError: shapes differ or ``n_bins < 1``.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    p = _select(np.asarray(prob, dtype=np.float64), region)
    y = _select(np.asarray(target) > 0, region).astype(np.float64)
    if p.shape != y.shape:
        raise ValueError(f"prob and target differ in shape: {np.shape(prob)} vs {np.shape(target)}")
    if p.size == 0:
        return math.nan
    idx = np.clip((np.clip(p, 0.0, 1.0) * n_bins).astype(np.int64), 0, n_bins - 1)
    # per bin b: n_b voxels, conf_b = sum(p) / n_b, acc_b = sum(y) / n_b, so (n_b / n) |acc_b - conf_b|
    # = |sum(y) - sum(p)| / n
    conf = np.bincount(idx, weights=p, minlength=n_bins)
    acc = np.bincount(idx, weights=y, minlength=n_bins)
    return float(np.abs(acc - conf).sum() / p.size)


def brier_score(prob: np.ndarray, target: np.ndarray, region: np.ndarray | None = None) -> float:
    """``mean((p - y)^2)`` over the region; NaN for an empty region."""
    p = _select(np.asarray(prob, dtype=np.float64), region)
    y = _select(np.asarray(target) > 0, region).astype(np.float64)
    if p.shape != y.shape:
        raise ValueError(f"prob and target differ in shape: {np.shape(prob)} vs {np.shape(target)}")
    return float(np.mean((p - y) ** 2)) if p.size else math.nan


def iou_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``1 - |a & b| / |a | b|`` (0.0 when both are empty)."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    union = int((a | b).sum())
    return 0.0 if union == 0 else 1.0 - int((a & b).sum()) / union


def _members(members: np.ndarray) -> np.ndarray:
    arr = np.asarray(members) > 0
    if arr.ndim < 2 or arr.shape[0] < 1:
        raise ValueError(f"members must have shape (M, *S) with M >= 1, got {np.shape(members)}")
    return arr


def ensemble_gain(members: np.ndarray, combined: np.ndarray, target: np.ndarray) -> float:
    """Dice of the combined mask minus the mean member Dice (positive = the ensemble helps).

    Args:
        members: ``(M, *S)`` member masks.
        combined: ``(*S)`` the final (ensemble) mask.
        target: ``(*S)`` reference mask.
    """
    arr = _members(members)
    return dice_score(combined, target) - float(np.mean([dice_score(m, target) for m in arr]))


def pairwise_dice(members: np.ndarray) -> float:
    """Mean Dice over the pairs ``i < j`` of members; NaN with fewer than two members."""
    arr = _members(members)
    m = arr.shape[0]
    if m < 2:
        return math.nan
    return float(np.mean([dice_score(arr[i], arr[j]) for i in range(m) for j in range(i + 1, m)]))


def generalized_energy_distance(members: np.ndarray, references: np.ndarray) -> float:
    """``D^2_GED = 2 E d(S, Y) - E d(S, S') - E d(Y, Y')`` with ``d = 1 - IoU`` (Kohl et al. 2018, Eq. 4).

    Args:
        members: ``(M, *S)`` sampled masks ``S``.
        references: ``(R, *S)`` reference annotations ``Y`` (``R = 1`` for one annotation), or ``(*S)``.

    Returns:
        The squared distance (0 for members identical to a single reference).
    """
    s = _members(members)
    y = np.asarray(references) > 0
    if y.ndim == s.ndim - 1:
        y = y[None]
    d_sy = np.mean([iou_distance(a, b) for a in s for b in y])
    d_ss = np.mean([iou_distance(s[i], s[j]) for i in range(len(s)) for j in range(len(s)) if i != j]) if len(s) > 1 else 0.0
    d_yy = np.mean([iou_distance(y[i], y[j]) for i in range(len(y)) for j in range(len(y)) if i != j]) if len(y) > 1 else 0.0
    return float(2.0 * d_sy - d_ss - d_yy)


def error_detection_auroc(uncertainty: np.ndarray, error: np.ndarray, region: np.ndarray | None = None) -> float:
    """AUROC of ``uncertainty`` for the voxels where ``error`` is true, against the others.

    ``(sum of ranks of error voxels - n_e (n_e + 1) / 2) / (n_e n_c)`` with average ranks for
    ties (Mann-Whitney U / (n_e n_c)); 1 = every error voxel is more uncertain than every correct one.

    Returns:
        The AUROC in [0, 1]; NaN when the region has no error voxel or no correct voxel.
    """
    u = _select(np.asarray(uncertainty, dtype=np.float64), region)
    e = _select(np.asarray(error) > 0, region)
    if u.shape != e.shape:
        raise ValueError(f"uncertainty and error differ in shape: {np.shape(uncertainty)} vs {np.shape(error)}")
    n_e = int(e.sum())
    n_c = int(e.size - n_e)
    if n_e == 0 or n_c == 0:
        return math.nan
    ranks = rankdata(u)
    return float((ranks[e].sum() - n_e * (n_e + 1) / 2.0) / (n_e * n_c))


def uncertainty_metrics(members: np.ndarray, prob: np.ndarray, uncertainty: np.ndarray, final_mask: np.ndarray,
                        target: np.ndarray, region: np.ndarray | None = None, n_bins: int = 10) -> dict[str, float]:
    """Every metric of :data:`UNCERTAINTY_KEYS` for one case.

    Args:
        members: ``(M, *S)`` member masks.
        prob: ``(*S)`` combined (mean) probability.
        uncertainty: ``(*S)`` per-voxel uncertainty (std or entropy over members).
        final_mask: ``(*S)`` the predicted mask that is scored.
        target: ``(*S)`` reference mask.
        region: ``(*S)`` brain region for ECE, Brier and AUROC (None = every voxel).
        n_bins: ECE bins.
    """
    error = (np.asarray(final_mask) > 0) != (np.asarray(target) > 0)
    arr = _members(members)
    return {
        "ece": expected_calibration_error(prob, target, region, n_bins),
        "brier": brier_score(prob, target, region),
        "ensemble_gain": ensemble_gain(arr, final_mask, target),
        "member_dice_mean": float(np.mean([dice_score(m, target) for m in arr])),
        "member_pairwise_dice": pairwise_dice(arr),
        "ged": generalized_energy_distance(arr, target),
        "uncertainty_auroc": error_detection_auroc(uncertainty, error, region),
    }
