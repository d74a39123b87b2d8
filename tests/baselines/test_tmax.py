"""Official Tmax > 9 s baseline on hand-made Tmax volumes in a Zenodo-layout tree."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import SimpleITK as sitk

from medsegdiff.baselines.tmax import tmax_baseline, tmax_mask
from medsegdiff.cli import main
from medsegdiff.errors import DataError

SPACING = (0.5, 0.5, 2.0)
ORIGIN = (10.0, -20.0, 5.0)
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def write(path, arr, dtype):
    img = sitk.GetImageFromArray(np.asarray(arr, dtype=dtype))
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def make_root(tmp_path):
    """sub-stroke0001 and 0002 with Tmax (+ masks); sub-stroke0003 with a mask but no Tmax."""
    root = tmp_path / "train"
    tmax = np.zeros((2, 3, 4), dtype=np.float32)
    tmax[0, 0, :] = [8.0, 9.0, 9.01, 20.0]  # -> 0, 0 (strict >), 1, 1
    tmax[1, 2, 3] = np.nan  # -> 0
    tmax[1, 1, 1] = 30.0  # -> 1
    for sid, t in (("sub-stroke0001", tmax), ("sub-stroke0002", np.zeros_like(tmax))):
        write(root / "derivatives" / sid / "ses-01" / "perfusion-maps" / f"{sid}_ses-01_space-ncct_tmax.nii.gz",
              t, np.float32)
    for sid in ("sub-stroke0001", "sub-stroke0002", "sub-stroke0003"):
        mask = np.zeros((2, 3, 4), dtype=np.uint16)
        mask[0, 0, 2:4] = 1
        write(root / "derivatives" / sid / "ses-02" / f"{sid}_ses-02_space-ncct_lesion-msk.nii.gz", mask, np.uint16)
    return root, tmax


def test_tmax_mask_is_strict_and_nan_is_background():
    out = tmax_mask(np.array([8.0, 9.0, 9.01, np.nan, 12.0]))
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 0, 1, 0, 1]


def test_baseline_writes_expected_masks_on_the_tmax_grid(tmp_path, caplog):
    root, tmax = make_root(tmp_path)
    with caplog.at_level(logging.WARNING):
        written = tmax_baseline(root, tmp_path / "pred", progress=False)
    assert [p.name for p in written] == ["sub-stroke0001.nii.gz", "sub-stroke0002.nii.gz"]
    assert "1 case(s) without a space-ncct Tmax map skipped: sub-stroke0003" in caplog.text
    img = sitk.ReadImage(str(written[0]))
    assert img.GetPixelID() == sitk.sitkUInt8
    assert img.GetSpacing() == SPACING and img.GetOrigin() == ORIGIN and img.GetDirection() == DIRECTION
    expected = np.zeros((2, 3, 4), dtype=np.uint8)
    expected[0, 0, 2:4] = 1
    expected[1, 1, 1] = 1
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), expected)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(written[1]))).sum() == 0


def test_threshold_option_and_evaluate_round_trip_via_cli(tmp_path, capsys):
    root, _ = make_root(tmp_path)
    pred, ev = tmp_path / "pred", tmp_path / "eval"
    assert main(["baseline", "tmax", str(root), "--out", str(pred), "--threshold", "25", "--no-progress"]) == 0
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(pred / "sub-stroke0001.nii.gz"))).sum() == 1  # only 30 s
    assert main(["baseline", "tmax", str(root), "--out", str(pred), "--no-progress"]) == 0
    # the data root is the reference: masks found by discovery
    assert main(["evaluate", "--pred", str(pred), "--gt", str(root), "--out", str(ev), "--no-hd95", "--no-progress"]) == 0
    summary = json.loads((ev / "summary.json").read_text())
    assert summary["n_cases"] == 3
    assert summary["missing_predictions"] == ["sub-stroke0003"]
    # 0001: prediction 3 voxels incl. the 2 reference voxels -> Dice 2*2/5; 0002, 0003: empty -> 0
    assert summary["metrics"]["dice"]["mean"] == pytest.approx((4 / 5) / 3)
    capsys.readouterr()


def test_no_tmax_anywhere_message(tmp_path):
    root = tmp_path / "train"
    write(root / "derivatives" / "sub-stroke0005" / "ses-02" / "sub-stroke0005_ses-02_space-ncct_lesion-msk.nii.gz",
          np.zeros((2, 2, 2)), np.uint8)
    with pytest.raises(DataError, match="no case has a space-ncct Tmax map"):
        tmax_baseline(root, tmp_path / "pred", progress=False)
    with pytest.raises(DataError, match="requested case\\(s\\) not found: sub-stroke9999"):
        tmax_baseline(root, tmp_path / "pred", cases=["sub-stroke9999"], progress=False)


def test_cache_input_matches_data_root_input(tmp_path):
    from medsegdiff.config.data import DataConfig
    from medsegdiff.data.preprocess import prepare_dataset
    from medsegdiff.data.synthetic import generate_dataset

    root, cache = tmp_path / "synth", tmp_path / "cache"
    ids = generate_dataset(root, cases=2, seed=3)
    prepare_dataset(root, cache, DataConfig(image_size=16), workers=1, progress=False)
    from_root = tmax_baseline(root, tmp_path / "a", progress=False)
    from_cache = tmax_baseline(cache, tmp_path / "b", cases=ids, progress=False)
    assert [p.name for p in from_cache] == [p.name for p in from_root] == [f"{i}.nii.gz" for i in ids]
    for a, b in zip(from_root, from_cache):
        ia, ib = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ia), sitk.GetArrayFromImage(ib))
        assert sitk.GetArrayFromImage(ia).any()
        assert ib.GetSize() == ia.GetSize()
        np.testing.assert_allclose(ib.GetOrigin(), ia.GetOrigin(), atol=1e-3)  # NCCT vs Tmax header
