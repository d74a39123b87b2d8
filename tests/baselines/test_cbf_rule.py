"""The CBF-informed rule: Tmax > 6 s and CBF < 15 on the native maps."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from medsegdiff.baselines.cbf_rule import cbf_rule_baseline, cbf_rule_mask
from medsegdiff.errors import DataError


def test_mask_needs_both_conditions_strictly_and_nan_is_background():
    tmax = np.array([7.0, 7.0, 6.0, 12.0, np.nan, 8.0])
    cbf = np.array([10.0, 15.0, 5.0, 40.0, 1.0, np.nan])
    out = cbf_rule_mask(tmax, cbf)
    assert out.dtype == np.uint8 and out.tolist() == [1, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="Tmax shape"):
        cbf_rule_mask(np.zeros(3), np.zeros(4))


def test_baseline_writes_the_rule_on_the_tmax_grid(synth6, tmp_path):
    from medsegdiff.data.discovery import discover_cases

    written = cbf_rule_baseline(synth6, tmp_path / "rule", progress=False)
    cases = discover_cases(synth6, ["tmax", "cbf"]).by_id()
    assert [p.name for p in written] == [f"{c}.nii.gz" for c in sorted(cases)]
    for path in written:
        case = cases[path.name.split(".")[0]]
        tmax_img = sitk.ReadImage(str(case.images["tmax"]))
        tmax = sitk.GetArrayFromImage(tmax_img)
        cbf = sitk.GetArrayFromImage(sitk.ReadImage(str(case.images["cbf"])))
        out = sitk.ReadImage(str(path))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(out), (tmax > 6) & (cbf < 15))
        assert out.GetSpacing() == tmax_img.GetSpacing() and out.GetOrigin() == tmax_img.GetOrigin()


def test_a_cache_is_refused(synth6_cache, tmp_path):
    with pytest.raises(DataError, match="needs the native CBF and Tmax maps; pass the data root"):
        cbf_rule_baseline(synth6_cache, tmp_path / "x", progress=False)
