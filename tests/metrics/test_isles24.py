"""Official ISLES'24 metrics against hand-computed cases (golden numbers derived by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric

from medsegdiff.metrics.isles24 import (
    METRIC_KEYS,
    ISLES24Metric,
    case_metrics,
    connected_components,
    hd95_distance,
    isles24_official_avd,
)


def line(n: int, segments: list[tuple[int, int]]) -> np.ndarray:
    """A (1, 1, n) volume with the half-open index ranges set."""
    a = np.zeros((1, 1, n), dtype=np.uint8)
    for lo, hi in segments:
        a[0, 0, lo:hi] = 1
    return a


# ---------------------------------------------------------------- connectivity


def test_corner_touching_cubes_are_one_lesion_under_official_26_connectivity():
    gt = np.zeros((6, 6, 6), dtype=np.uint8)
    gt[0:2, 0:2, 0:2] = 1
    gt[2:4, 2:4, 2:4] = 1  # shares only the corner point between (1,1,1) and (2,2,2)
    assert connected_components(gt)[1] == 1
    assert connected_components(gt, 26)[1] == 1
    assert connected_components(gt, 18)[1] == 2
    assert connected_components(gt, 6)[1] == 2
    empty = np.zeros_like(gt)
    assert case_metrics(empty, gt, 1.0, hd95=False)["lesion_count_diff"] == 1.0
    assert case_metrics(empty, gt, 1.0, hd95=False, connectivity=6)["lesion_count_diff"] == 2.0


def test_edge_touching_voxels_join_at_18_but_not_6():
    gt = np.zeros((3, 3, 3), dtype=np.uint8)
    gt[0, 0, 0] = gt[0, 1, 1] = 1  # share an edge
    assert connected_components(gt, 6)[1] == 2
    assert connected_components(gt, 18)[1] == 1


def test_2d_official_default_is_4_connectivity():
    m = np.zeros((4, 4), dtype=np.uint8)
    m[0, 0] = m[1, 1] = 1
    assert connected_components(m)[1] == 2
    assert connected_components(m, 8)[1] == 1
    metrics = case_metrics(np.zeros_like(m), m, 1.0, hd95=False)
    assert metrics["gt_lesions"] == 2.0


def test_invalid_connectivity_is_rejected():
    with pytest.raises(ValueError, match="connectivity 8 is invalid for 3-D; allowed: \\[6, 18, 26\\]"):
        connected_components(np.zeros((2, 2, 2)), 8)


# ---------------------------------------------------------------- matching threshold


@pytest.mark.parametrize(
    ("pred_len", "threshold", "expected_f1"),
    [
        (11, 0.5, 1.0),  # IoU 11/20 = 0.55 > 0.5
        (10, 0.5, 1.0),  # IoU 10/20 = 0.5 exactly: inclusive
        (9, 0.5, 0.0),  # IoU 9/20 = 0.45 < 0.5
        (4, 0.2, 1.0),  # IoU 4/20 = 0.2 exactly at the organisers' latest threshold
        (3, 0.2, 0.0),  # IoU 3/20 = 0.15
    ],
)
def test_iou_threshold_is_inclusive(pred_len, threshold, expected_f1):
    gt = line(30, [(0, 20)])
    pred = line(30, [(0, pred_len)])
    m = case_metrics(pred, gt, 1.0, threshold, hd95=False)
    assert m["lesion_f1"] == expected_f1
    assert m["lesion_tp"] == expected_f1
    assert m["dice"] == pytest.approx(2 * pred_len / (pred_len + 20))


def test_f1_counts_fp_and_fn_halves():
    # GT: two lesions; prediction: matches the first (IoU 1) and adds a separate false positive.
    gt = line(40, [(0, 5), (10, 15)])
    pred = line(40, [(0, 5), (30, 33)])
    m = case_metrics(pred, gt, 1.0, hd95=False)
    assert (m["lesion_tp"], m["lesion_fp"], m["lesion_fn"]) == (1.0, 1.0, 1.0)
    assert m["lesion_f1"] == pytest.approx(1 / (1 + 0.5 + 0.5))
    assert m["lesion_count_diff"] == 0.0


def test_matching_is_greedy_one_to_one_not_optimal():
    # G1=[0,10), G2=[12,22); P=[5,15) overlaps G1 with IoU 5/15 and G2 with IoU 3/17;
    # Q=[0,3) overlaps G1 with IoU 3/10. Greedy at 0.15 takes P-G1 (highest) and then cannot use
    # Q-G1 (G1 taken) or P-G2 (P taken): TP 1, FP 1, FN 1. An optimal assignment would find 2.
    gt = line(30, [(0, 10), (12, 22)])
    pred = line(30, [(0, 3), (5, 15)])
    m = case_metrics(pred, gt, 1.0, 0.15, hd95=False)
    assert (m["lesion_tp"], m["lesion_fp"], m["lesion_fn"]) == (1.0, 1.0, 1.0)
    assert m["lesion_f1"] == pytest.approx(0.5)


# ---------------------------------------------------------------- edge cases, AVD


def test_both_empty():
    z = np.zeros((4, 4, 4), dtype=np.uint8)
    m = case_metrics(z, z, 0.5)
    assert m["dice"] == 1.0 and m["lesion_f1"] == 1.0
    assert m["lesion_count_diff"] == 0.0 and m["avd_ml"] == 0.0
    assert math.isnan(m["hd95"])
    assert list(m) == list(METRIC_KEYS)


def test_one_empty():
    gt = np.zeros((4, 4, 4), dtype=np.uint8)
    gt[1:3, 1:3, 1:3] = 1  # 8 voxels
    empty = np.zeros_like(gt)
    m = case_metrics(empty, gt, 0.25, hd95=False)
    assert m["dice"] == 0.0 and m["lesion_f1"] == 0.0
    assert m["avd_ml"] == pytest.approx(8 * 0.25)
    assert m["lesion_count_diff"] == 1.0
    m2 = case_metrics(gt, empty, 0.25, hd95=False)
    assert m2["dice"] == 0.0 and m2["lesion_f1"] == 0.0 and m2["lesion_fp"] == 1.0


def test_avd_in_ml_from_reference_spacing():
    gt = np.zeros((2, 4, 4), dtype=np.uint8)
    gt[0, 0, :] = 1
    gt[1, 0, 0] = 1  # 5 voxels
    pred = np.zeros_like(gt)
    pred[0, 3, 0:2] = 1  # 2 voxels
    zooms_xyz = (0.5, 0.5, 2.0)  # 0.5 mm^3 = 0.0005 mL per voxel
    assert isles24_official_avd(pred, gt, zooms_xyz) == pytest.approx(3 * 0.0005)
    m = case_metrics(pred, gt, 0.5 * 0.5 * 2.0 / 1000, hd95=False)
    assert m["avd_ml"] == pytest.approx(0.0015)
    assert m["gt_volume_ml"] == pytest.approx(0.0025)
    assert m["pred_volume_ml"] == pytest.approx(0.0010)


def test_nonzero_values_are_foreground_like_astype_bool():
    gt = np.zeros((1, 1, 6), dtype=np.float32)
    gt[0, 0, :3] = 65535.0
    pred = np.zeros_like(gt)
    pred[0, 0, :3] = 0.2
    assert case_metrics(pred, gt, 1.0, hd95=False)["dice"] == 1.0


def test_dice_matches_monai_dicemetric_on_random_volumes():
    rng = np.random.default_rng(0)
    metric = DiceMetric(include_background=True, reduction="none")
    for _ in range(5):
        pred = rng.random((6, 9, 7)) > 0.6
        gt = rng.random((6, 9, 7)) > 0.5
        ours = case_metrics(pred, gt, 1.0, hd95=False)["dice"]
        theirs = metric(torch.from_numpy(pred)[None, None].float(), torch.from_numpy(gt)[None, None].float())
        assert ours == pytest.approx(float(theirs.item()), abs=1e-6)


def test_precision_recall_voxelwise():
    gt = line(10, [(0, 4)])
    pred = line(10, [(2, 8)])  # overlap 2, |P| 6, |G| 4
    m = case_metrics(pred, gt, 1.0, hd95=False)
    assert m["precision"] == pytest.approx(2 / 6)
    assert m["recall"] == pytest.approx(2 / 4)


def test_hd95_in_mm_uses_array_axis_spacing():
    gt = np.zeros((3, 3, 8), dtype=np.uint8)
    pred = np.zeros_like(gt)
    gt[1, 1, 1] = 1
    pred[1, 1, 4] = 1  # 3 voxels apart along the last axis
    assert hd95_distance(pred, gt, (2.0, 1.0, 0.5)) == pytest.approx(1.5)
    assert case_metrics(pred, gt, 1.0, spacing=(2.0, 1.0, 0.5))["hd95"] == pytest.approx(1.5)
    assert math.isnan(hd95_distance(np.zeros_like(gt), gt, (1.0, 1.0, 1.0)))


def test_shape_mismatch_message():
    with pytest.raises(ValueError, match=r"prediction shape \(2, 2\) differs from reference shape \(2, 3\)"):
        case_metrics(np.zeros((2, 2)), np.zeros((2, 3)), 1.0)


# ---------------------------------------------------------------- stateful metric


def test_stateful_metric_aggregate_and_reset():
    metric = ISLES24Metric(iou_threshold=0.5, hd95=False)
    gt = line(10, [(0, 4)])
    metric(gt, gt, 1.0)  # dice 1
    metric(np.zeros_like(gt), gt, 1.0)  # dice 0
    metric(line(10, [(0, 2)]), gt, 1.0)  # dice 2*2/6
    agg = metric.aggregate()
    dices = [1.0, 0.0, 4 / 6]
    assert agg["dice"]["mean"] == pytest.approx(np.mean(dices))
    assert agg["dice"]["std"] == pytest.approx(np.std(dices))
    assert agg["dice"]["median"] == pytest.approx(4 / 6)
    assert agg["dice"]["n"] == 3
    assert agg["hd95"]["n"] == 0 and math.isnan(agg["hd95"]["mean"])
    metric.reset()
    assert metric.aggregate()["dice"]["n"] == 0
