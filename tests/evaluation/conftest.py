"""Tiny NIfTI folders for the evaluation tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk


def _write_mask(path: Path, arr_zyx, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), dtype=np.uint8) -> Path:
    img = sitk.GetImageFromArray(np.asarray(arr_zyx).astype(dtype))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


@pytest.fixture
def write_mask():
    """``write_mask(path, array_zyx, spacing=(x, y, z), origin=..., dtype=...)`` -> path."""
    return _write_mask


@pytest.fixture
def three_cases(tmp_path, write_mask):
    """References for 3 cases (spacing 1 x 1 x 2 mm = 0.002 mL); predictions for the first two.

    0001: prediction == reference (8 voxels) -> Dice 1.
    0002: reference 4 voxels in a row, prediction the first 2 -> Dice 2*2/6, AVD 2 voxels = 0.004 mL.
    0003: reference 3 voxels, no prediction -> scored empty: Dice 0, AVD 0.006 mL.
    References are uint16 with value 65535 (binarised > 0).
    """
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    shape = (4, 5, 6)
    g1 = np.zeros(shape)
    g1[1:3, 1:3, 1:3] = 1
    g2 = np.zeros(shape)
    g2[2, 2, 0:4] = 1
    p2 = np.zeros(shape)
    p2[2, 2, 0:2] = 1
    g3 = np.zeros(shape)
    g3[0, 0, 0:3] = 1
    for cid, g in (("0001", g1), ("0002", g2), ("0003", g3)):
        _write_mask(gt_dir / f"sub-stroke{cid}.nii.gz", g * 65535, dtype=np.uint16)
    _write_mask(pred_dir / "sub-stroke0001.nii.gz", g1)
    _write_mask(pred_dir / "sub-stroke0002.nii.gz", p2)
    # files that are not predictions (e.g. probability maps) are ignored
    _write_mask(pred_dir / "sub-stroke0002_prob.nii.gz", np.ones(shape), dtype=np.float32)
    return pred_dir, gt_dir
