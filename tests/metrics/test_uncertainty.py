"""Uncertainty metrics from first principles (hand-computed golden numbers)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medsegdiff.metrics.uncertainty import (
    UNCERTAINTY_KEYS,
    brier_score,
    dice_score,
    ensemble_gain,
    error_detection_auroc,
    expected_calibration_error,
    generalized_energy_distance,
    iou_distance,
    pairwise_dice,
    uncertainty_metrics,
)


def test_ece_by_hand():
    # bins of width 0.5: {0.1, 0.2, 0.4} -> conf 0.7/3, acc 1/3; {0.6, 0.9} -> conf 0.75, acc 1/2
    p = np.array([0.1, 0.2, 0.4, 0.6, 0.9])
    y = np.array([0, 1, 0, 1, 0])
    expected = 3 / 5 * abs(1 / 3 - 0.7 / 3) + 2 / 5 * abs(0.5 - 0.75)
    assert expected_calibration_error(p, y, n_bins=2) == pytest.approx(expected)


def test_ece_zero_when_calibrated_and_region_restricts():
    p = np.array([0.0, 0.0, 1.0, 1.0, 0.7])
    y = np.array([0, 0, 1, 1, 0])
    region = np.array([True, True, True, True, False])
    assert expected_calibration_error(p, y, region) == 0.0
    assert expected_calibration_error(p, y) == pytest.approx(0.7 / 5)  # p = 1 falls in the last bin
    assert math.isnan(expected_calibration_error(p, y, np.zeros(5, bool)))


def test_brier_by_hand():
    assert brier_score(np.array([0.2, 0.9]), np.array([0, 1])) == pytest.approx((0.04 + 0.01) / 2)
    assert brier_score(np.array([0.2, 0.9]), np.array([0, 1]), np.array([False, True])) == pytest.approx(0.01)


def test_dice_and_iou_distance():
    a = np.array([1, 1, 0, 0])
    b = np.array([1, 0, 1, 0])
    assert dice_score(a, b) == 0.5 and iou_distance(a, b) == pytest.approx(1 - 1 / 3)
    z = np.zeros(4)
    assert dice_score(z, z) == 1.0 and iou_distance(z, z) == 0.0 and dice_score(a, z) == 0.0


def test_ensemble_gain_and_pairwise_dice():
    gt = np.array([1, 1, 1, 1, 0, 0])
    members = np.array([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    combined = np.array([1, 1, 1, 1, 0, 0])  # majority vote
    member_dices = [2 * 2 / 6, 2 * 2 / 6, 2 * 4 / 10]
    assert ensemble_gain(members, combined, gt) == pytest.approx(1.0 - np.mean(member_dices))
    pairs = [dice_score(members[0], members[1]), dice_score(members[0], members[2]), dice_score(members[1], members[2])]
    assert pairs == [0.0, 2 * 2 / 8, 2 * 2 / 8]
    assert pairwise_dice(members) == pytest.approx(np.mean(pairs))
    assert math.isnan(pairwise_dice(members[:1]))


def test_ged_by_hand():
    y = np.array([1, 1, 0, 0])
    # identical members equal to the reference: 0
    assert generalized_energy_distance(np.stack([y, y]), y) == 0.0
    s = np.array([[1, 0, 0, 0], [0, 1, 0, 0]])
    d_sy = (iou_distance(s[0], y) + iou_distance(s[1], y)) / 2  # 0.5 each
    d_ss = iou_distance(s[0], s[1])  # 1.0 (pairs i != j)
    assert generalized_energy_distance(s, y) == pytest.approx(2 * d_sy - d_ss) == pytest.approx(0.0)
    far = np.array([[0, 0, 1, 1], [0, 0, 1, 1]])
    assert generalized_energy_distance(far, y) == pytest.approx(2.0)
    # two annotations: - E d(Y, Y')
    ys = np.stack([y, np.array([1, 0, 0, 0])])
    expected = 2 * np.mean([iou_distance(a, b) for a in far for b in ys]) - 0.0 - iou_distance(ys[0], ys[1])
    assert generalized_energy_distance(far, ys) == pytest.approx(expected)


def test_auroc_perfect_random_and_ties():
    err = np.array([1, 1, 0, 0, 0])
    assert error_detection_auroc(np.array([0.9, 0.8, 0.1, 0.2, 0.3]), err) == 1.0
    assert error_detection_auroc(np.array([0.0, 0.1, 0.5, 0.6, 0.7]), err) == 0.0
    assert error_detection_auroc(np.full(5, 0.3), err) == 0.5
    # one error voxel ranked above 2 of 3 correct ones, tie with the third counts half: (2 + 0.5) / 3
    assert error_detection_auroc(np.array([0.5, 0.1, 0.2, 0.5]), np.array([1, 0, 0, 0])) == pytest.approx(2.5 / 3)
    assert math.isnan(error_detection_auroc(np.ones(3), np.zeros(3)))
    region = np.array([True, True, True, False, False])
    assert error_detection_auroc(np.array([0.9, 0.0, 0.5, 9.0, 9.0]), err, region) == 0.5


def test_auroc_matches_pairwise_definition_on_random_data():
    rng = np.random.default_rng(0)
    u = rng.integers(0, 5, 200).astype(float)
    e = rng.random(200) < 0.3
    pos, neg = u[e], u[~e]
    pairwise = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert error_detection_auroc(u, e) == pytest.approx(pairwise)


def test_uncertainty_metrics_keys_and_information_flow():
    rng = np.random.default_rng(1)
    gt = np.zeros((4, 8, 8), bool)
    gt[1:3, 2:6, 2:6] = True
    members = np.stack([gt ^ (rng.random(gt.shape) < 0.05) for _ in range(4)])
    prob = members.mean(0)
    unc = members.std(0)
    final = prob >= 0.5
    out = uncertainty_metrics(members, prob, unc, final, gt)
    assert tuple(out) == UNCERTAINTY_KEYS
    assert out["ensemble_gain"] > 0  # independent flips are voted away
    assert out["uncertainty_auroc"] > 0.75  # errors are where members disagree
    same = uncertainty_metrics(np.stack([final] * 4), final.astype(float), np.zeros(gt.shape), final, gt)
    assert same["ensemble_gain"] == 0.0 and same["member_pairwise_dice"] == 1.0
    assert (final != gt).any() and same["uncertainty_auroc"] == 0.5  # constant uncertainty: chance


def test_shape_errors():
    with pytest.raises(ValueError, match="region shape"):
        brier_score(np.zeros(3), np.zeros(3), np.zeros(2, bool))
    with pytest.raises(ValueError, match="members must have shape"):
        pairwise_dice(np.zeros(3))
