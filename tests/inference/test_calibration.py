from __future__ import annotations

import json

import numpy as np
import pytest

from medsegdiff.errors import CheckpointError
from medsegdiff.inference.calibration import (
    calibrate_threshold,
    find_calibration,
    save_calibration,
    volume_dice,
)


def _case(lesion_prob: float) -> tuple[np.ndarray, np.ndarray]:
    gt = np.zeros((4, 8, 8), dtype=np.uint8)
    gt[1:3, 2:5, 2:5] = 1
    prob = np.zeros(gt.shape, dtype=np.float32)
    prob[gt > 0] = lesion_prob
    prob[0, 6:8, 6:8] = 0.12  # a faint false positive
    return prob, gt


def test_calibration_picks_the_known_best_threshold():
    # case A is exact for 0.15 <= t <= 0.33, case B for 0.15 <= t <= 0.28: best = {0.15, 0.2, 0.25},
    # ties go to the one closest to 0.5 -> 0.25
    (pa, ga), (pb, gb) = _case(0.33), _case(0.28)
    best, table = calibrate_threshold([pa, pb], [ga, gb], [0.1, 0.1])
    assert best == pytest.approx(0.25)
    row = {round(r["threshold"], 2): r for r in table}
    assert row[0.25]["mean_dice"] == pytest.approx(1.0)
    assert row[0.3]["mean_dice"] == pytest.approx(0.5)  # case B empty -> Dice 0
    assert row[0.05]["mean_avd_ml"] == pytest.approx(4 * 0.1)  # 4 false-positive voxels x 0.1 mL
    assert len(table) == 19


def test_volume_dice_empty_both_is_one():
    z = np.zeros((2, 2))
    assert volume_dice(z, z) == 1.0
    assert volume_dice(np.ones((2, 2)), z) == 0.0


def test_save_and_find_calibration(tmp_path):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    assert find_calibration(ckpt, {}) is None
    assert find_calibration(ckpt, {"calibration": {"threshold": 0.4}}) == (0.4, f"{ckpt} (embedded)")
    path = save_calibration(run, 0.35, [{"threshold": 0.35, "mean_dice": 0.5, "mean_avd_ml": 1.0}], combine="mean")
    assert json.loads(path.read_text())["combine"] == "mean"
    assert find_calibration(ckpt, {"calibration": 0.4}) == (0.35, str(run / "calibration.json"))
    assert find_calibration(run, None) == (0.35, str(run / "calibration.json"))
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable calibration file"):
        find_calibration(ckpt, {})


def test_stale_calibration_is_ignored_with_a_warning(tmp_path):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    save_calibration(run, 0.35, [], step=100)
    assert find_calibration(ckpt, {"step": 100}) == (0.35, str(run / "calibration.json"))
    with pytest.warns(UserWarning, match="calibrated for step 100 but the checkpoint is step 200"):
        assert find_calibration(ckpt, {"step": 200}) is None
