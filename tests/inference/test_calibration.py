from __future__ import annotations

import json

import numpy as np
import pytest

from medsegdiff.errors import CheckpointError
from medsegdiff.inference.calibration import (
    calibrate_threshold,
    find_calibration,
    save_calibration,
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


def test_save_and_find_calibration(tmp_path):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    assert find_calibration(ckpt, {}) is None
    assert find_calibration(ckpt, {"calibration": {"threshold": 0.4}}) == (0.4, f"{ckpt} (embedded)")
    path = save_calibration(run, 0.35, [{"threshold": 0.35, "mean_dice": 0.5, "mean_avd_ml": 1.0}], combine="mean")
    assert json.loads(path.read_text())["calibrations"][0]["combine"] == "mean"
    assert find_calibration(ckpt, {"calibration": 0.4}) == (0.35, str(run / "calibration.json"))
    assert find_calibration(run, None) == (0.35, str(run / "calibration.json"))
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable calibration file"):
        find_calibration(ckpt, {})


def test_stale_calibration_is_ignored_with_a_warning(tmp_path, caplog):
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    save_calibration(run, 0.35, [], step=100)
    assert find_calibration(ckpt, {"step": 100}) == (0.35, str(run / "calibration.json"))
    with caplog.at_level("WARNING", logger="medsegdiff.inference"):
        assert find_calibration(ckpt, {"step": 200}) is None
    assert "calibrated for step 100 but the checkpoint is step 200" in caplog.text


def _settings(**changes):
    from medsegdiff.config import load_config
    from medsegdiff.inference.calibration import calibration_settings

    cfg = load_config(None, [f"{k.replace('__', '.')}={v}" for k, v in changes.items()])
    return calibration_settings(cfg, respacing=cfg.inference.respacing or cfg.diffusion.respacing,
                                members=cfg.inference.ensemble)


def test_calibration_settings_hold_what_changes_the_probability_map():
    base = _settings()
    assert base["respacing"] == "ddim250" and base["members"] == 5 and base["inference.combine"] == "mean"
    assert base["sampler"] == "ddim" and "diffusion.eta" in base
    # the sampler that runs is the key: inference.sampler="" falls back to diffusion.sampler
    assert _settings(inference__sampler="ddim") == base
    assert _settings(inference__sampler="dpmpp_2m") != base
    # the key follows sampler, respacing, ensemble, combination and eta ...
    for change in ({"inference__respacing": "ddim10"}, {"inference__ensemble": 1}, {"inference__combine": "staple"},
                   {"diffusion__eta": 0.5}, {"diffusion__sampler": "ddpm"}):
        assert _settings(**change) != base, change
    # ... but not the threshold, the memory budget, the outputs or the uncertainty map
    for change in ({"inference__threshold": 0.3}, {"inference__batch_size": 2}, {"inference__overlays": "false"},
                   {"inference__uncertainty": "entropy"}, {"inference__use_calibrated_threshold": "false"}):
        assert _settings(**change) == base, change


def test_calibrations_under_other_settings_are_kept_and_only_matching_ones_used(tmp_path, caplog):
    from medsegdiff.inference.calibration import load_calibrations

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    fast = _settings(inference__respacing="ddim10", inference__ensemble=1)
    full = _settings(inference__combine="staple")
    save_calibration(run, 0.2, [], settings=fast, step=7)
    save_calibration(run, 0.6, [], settings=full, step=7)
    save_calibration(run, 0.25, [], settings=fast, step=7)  # same settings and step: replaces 0.2
    entries = load_calibrations(run / "calibration.json")
    assert [(e["threshold"], e["settings"] == fast) for e in entries] == [(0.6, False), (0.25, True)]
    assert find_calibration(ckpt, {"step": 7}, settings=fast) == (0.25, str(run / "calibration.json"))
    assert find_calibration(ckpt, {"step": 7}, settings=full) == (0.6, str(run / "calibration.json"))
    with caplog.at_level("WARNING", logger="medsegdiff.inference"):
        assert find_calibration(ckpt, {"step": 7}, settings=_settings()) is None
    assert "no calibration for these settings" in caplog.text and (
        "members=1 vs now 5, respacing='ddim10' vs now 'ddim250'" in caplog.text)


def test_a_first_format_file_is_read_but_matches_no_settings(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    (run / "calibration.json").write_text(json.dumps({"threshold": 0.3, "step": 5, "table": []}))
    assert find_calibration(run, {"step": 5}) == (0.3, str(run / "calibration.json"))
    with caplog.at_level("WARNING", logger="medsegdiff.inference"):
        assert find_calibration(run, {"step": 5}, settings=_settings()) is None
    assert "settings were not recorded" in caplog.text
