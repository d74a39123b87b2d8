"""Preprocessing: windows, equalisation, brain mask, lesion statistics, resampling, the whole cache."""

from __future__ import annotations

import numpy as np
import pytest

from medsegdiff.data.grid import cache_geometry, resample_inplane
from medsegdiff.data.preprocess import (
    brain_mask_from_ncct,
    equalize_positive,
    lesion_statistics,
    prepare_dataset,
    support_mask,
    window_normalise,
)


def test_window_clips_and_scales_to_unit_range():
    v = np.array([-10.0, 0.0, 17.5, 35.0, 100.0, np.nan, np.inf], dtype=np.float64)
    out = window_normalise(v, 0.0, 35.0)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1, 0, 0])
    hu = np.array([-1000, 40, 80], dtype=np.int16)  # brain window 0-80 HU
    np.testing.assert_allclose(window_normalise(hu, 0.0, 80.0), [0, 0.5, 1])


def test_equalize_keeps_background_and_spreads_values():
    rng = np.random.default_rng(0)
    v = np.zeros((4, 16, 16), dtype=np.float32)
    v[:, 4:12, 4:12] = rng.uniform(0.05, 0.3, size=(4, 8, 8))  # bunched into a narrow range
    out = equalize_positive(v)
    assert np.all(out[v == 0] == 0)
    inside = out[v > 0]
    # equalised values are the empirical CDF: about uniform on (0, 1]
    assert inside.max() == pytest.approx(1.0)
    assert abs(np.median(inside) - 0.5) < 0.05
    order = np.argsort(v[v > 0])
    assert np.all(np.diff(inside[order]) >= -1e-7)  # monotonic
    assert np.all(equalize_positive(np.zeros((2, 2))) == 0)


def _head(nz=6, n=32):
    z, y, x = np.mgrid[:nz, :n, :n]
    r = np.hypot(y - n / 2, x - n / 2)
    ncct = np.full((nz, n, n), -1000.0, dtype=np.float32)  # air
    ncct[r < 14] = 1000.0  # skull
    ncct[r < 12] = 30.0  # brain
    ncct[(r < 3)] = 0.0  # CSF hole (below 1 HU): filled
    ncct[:, 1:3, 1:3] = 40.0  # a soft-tissue speck outside the skull: not the largest component
    return ncct, (r < 12)


def test_brain_mask_from_ncct():
    ncct, brain = _head()
    mask = brain_mask_from_ncct(ncct)
    assert mask.dtype == bool
    assert np.array_equal(mask, brain)


def test_support_mask_is_union_with_holes_filled():
    a = np.zeros((1, 7, 7))
    b = np.zeros((1, 7, 7))
    a[0, 1:6, 1:4] = 5
    b[0, 1:6, 3:6] = 2
    b[0, 3, 3] = 0
    a[0, 3, 3] = 0  # a hole in the union
    out = support_mask([a, b])
    expected = np.zeros((1, 7, 7), bool)
    expected[0, 1:6, 1:6] = True
    assert np.array_equal(out, expected)


def test_lesion_statistics_counts_26_connected_components():
    m = np.zeros((4, 6, 6), dtype=np.uint8)
    m[0, 0, 0] = 1
    m[1, 1, 1] = 1  # touches the first only through a corner: same component under 26-connectivity
    m[3, 4:6, 4:6] = 1  # a second component of 4 voxels
    stats = lesion_statistics(m, voxel_volume_ml=0.002)
    assert stats == {"voxels": 6, "ml": pytest.approx(0.012), "components": 2}
    assert lesion_statistics(np.zeros((2, 2, 2)), 1.0) == {"voxels": 0, "ml": 0.0, "components": 0}


# ----------------------------------------------------------------------------- grids and resampling


def _geometry():
    from medsegdiff.data.loading import Geometry

    return Geometry(size=(40, 48, 3), spacing=(0.5, 0.4, 2.0), origin=(10.0, -5.0, 3.0),
                    direction=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))


def test_cache_grid_keeps_origin_direction_and_extent():
    native = _geometry()
    grid = cache_geometry(native, 8)
    assert grid.size == (8, 8, 3)
    assert grid.origin == native.origin and grid.direction == native.direction
    # first and last voxel centres coincide: spacing * (n - 1) / (size - 1)
    assert grid.spacing == pytest.approx((0.5 * 39 / 7, 0.4 * 47 / 7, 2.0))
    a, b = native.reference_image(), grid.reference_image()
    for idx_native, idx_cache in [((39, 47, 2), (7, 7, 2)), ((0, 0, 0), (0, 0, 0)), ((39, 0, 1), (7, 0, 1))]:
        np.testing.assert_allclose(a.TransformIndexToPhysicalPoint(idx_native),
                                   b.TransformIndexToPhysicalPoint(idx_cache), atol=1e-9)


def test_resampling_is_inplane_and_keeps_borders():
    native = _geometry()
    grid = cache_geometry(native, 8)
    const = resample_inplane(np.full((3, 48, 40), 0.7, np.float32), native, grid)
    assert const.shape == (3, 8, 8)
    np.testing.assert_allclose(const, 0.7, rtol=1e-5)  # no dark border from zero padding
    ramp = np.broadcast_to(np.arange(3, dtype=np.float32)[:, None, None], (3, 48, 40)).copy()
    out = resample_inplane(ramp, native, grid)
    np.testing.assert_allclose(out[:, 4, 4], [0, 1, 2], atol=1e-5)  # z untouched
    lesion = np.zeros((3, 48, 40), np.uint8)
    lesion[:, -6:, -5:] = 1  # one cache voxel's worth of lesion in the far corner
    for mode in ("soft", "nearest"):
        out = resample_inplane(lesion, native, grid, mode=mode)
        assert out.dtype == np.uint8
        assert out[:, 7, 7].tolist() == [1, 1, 1] and out.sum() == 3, mode


def test_upsampling_needs_no_smoothing():
    native = _geometry()
    grid = cache_geometry(native, 79)  # x: 40 -> 79 voxels, exactly half spacing
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32), (3, 48, 40)).copy()
    out = resample_inplane(ramp, native, grid)
    np.testing.assert_allclose(out[1, 10], np.arange(79) / 2, atol=1e-4)  # linear interpolation


# ----------------------------------------------------------------------------- the whole cache


def _cfg(**kw):
    from medsegdiff.config.data import DataConfig

    return DataConfig(image_size=kw.pop("image_size", 16), **kw)


def test_brain_mask_and_equalisation_in_the_cache(synth_root, tmp_path):
    import SimpleITK as sitk

    from medsegdiff.data.discovery import discover_cases

    cfg = _cfg(modalities=["ncct", "cbf", "tmax"], brain_mask=True, equalize=True)
    manifest = prepare_dataset(synth_root, tmp_path / "cache", cfg, workers=1, progress=False)
    assert manifest.settings["brain_mask"] and manifest.settings["equalize"]
    cases = discover_cases(synth_root, ["ncct"]).by_id()
    for cid in manifest.case_ids[:3]:
        case = manifest.case(cid)
        image = np.asarray(case.image, dtype=np.float32)
        ncct = sitk.GetArrayFromImage(sitk.ReadImage(str(cases[cid].ncct))).astype(np.float32)
        brain = resample_inplane(brain_mask_from_ncct(ncct), case.native_geometry, case.cache_geometry, mode="soft")
        assert np.all(image[:, brain == 0] == 0)  # nothing outside the brain
        positive = image[0][image[0] > 0]
        assert positive.size > 0 and positive.max() == pytest.approx(1.0, abs=1e-3)  # equalised to (0, 1]
        assert 0.3 < np.median(positive) < 0.7


# ------------------------------------------------------------- what the cache keeps: ceiling, windows


def test_dice_score_is_the_official_case_dice():
    from medsegdiff.metrics.isles24 import case_metrics, dice_score

    rng = np.random.default_rng(3)
    for _ in range(5):
        p, g = rng.random((3, 9, 9)) > 0.6, rng.random((3, 9, 9)) > 0.5
        assert dice_score(p, g) == pytest.approx(case_metrics(p, g, 1.0, hd95=False)["dice"])
    empty = np.zeros((2, 4, 4), bool)
    assert dice_score(empty, empty) == 1.0 and dice_score(empty, ~empty) == 0.0


def test_resolution_ceiling_is_recorded_and_warned_about(synth_root, tmp_path):
    from medsegdiff.data.grid import ceiling_message, roundtrip_mask
    from medsegdiff.inference.ensemble import binarize
    from medsegdiff.inference.export import to_native
    from medsegdiff.metrics.isles24 import dice_score

    coarse = prepare_dataset(synth_root, tmp_path / "c16", _cfg(modalities=["tmax"], image_size=16), workers=1,
                             progress=False)
    fine = prepare_dataset(synth_root, tmp_path / "c64", _cfg(modalities=["tmax"], image_size=64), workers=1,
                           progress=False)
    low, high = coarse.last_run["resolution_ceiling"], fine.last_run["resolution_ceiling"]
    assert coarse.data["resolution_ceiling"] == low  # in manifest.json too
    assert low["n_cases"] == len(coarse.case_ids) and low["image_size"] == 16
    assert high["mean_dice"] >= 0.95 and high["ok"]  # native tiny grids are 48 x 48-60
    assert low["mean_dice"] < high["mean_dice"] - 0.1 and not low["ok"]
    assert "WARNING" in ceiling_message(low) and "raise data.image_size" in ceiling_message(low)
    assert "up to 60 px" in ceiling_message(low) and "WARNING" not in ceiling_message(high)
    values = []
    for cid in coarse.case_ids:
        case = coarse.case(cid)
        # the round trip is the predictions' own way back (export.to_native + 0.5 threshold)
        via_export = binarize(to_native(np.asarray(case.mask), case.cache_geometry, case.native_geometry), 0.5)
        mine = roundtrip_mask(case.mask, case.cache_geometry, case.native_geometry)
        np.testing.assert_array_equal(mine, via_export)
        values.append(dice_score(mine, case.native_mask()))
        assert case.record["resolution_ceiling"] == pytest.approx(values[-1])
    assert low["mean_dice"] == pytest.approx(np.mean(values))


def test_default_windows_keep_every_clinical_threshold():
    from medsegdiff.config.data import CLINICAL_THRESHOLDS, DEFAULT_WINDOWS, DataConfig
    from medsegdiff.data.preprocess import window_warnings

    for m, thresholds in CLINICAL_THRESHOLDS.items():
        low, high = DEFAULT_WINDOWS[m]
        assert all(low < t < high for t in thresholds), m
    assert set(CLINICAL_THRESHOLDS["tmax"]) >= {6.0, 9.0, 10.0}
    assert window_warnings(DataConfig(modalities=["cbf", "cbv", "mtt", "tmax", "cta"])) == []
    lines = window_warnings(DataConfig(modalities=["tmax", "cbf"], windows={"tmax": [0.0, 7.0]}))
    assert lines == ["data.windows.tmax=[0, 7] hides the clinical threshold(s) 9, 10; widen the window "
                     "(default [0.0, 20.0]) so the network can see them"]


def test_tmax_above_9_s_is_recoverable_from_the_cached_image(synth_root, tmp_path):
    """Threshold the cached Tmax channel at the 9 s level, send it back: it is the native Tmax > 9 s."""
    from medsegdiff.data.cache import modality_window
    from medsegdiff.data.grid import roundtrip_mask
    from medsegdiff.metrics.isles24 import dice_score

    def recovered(cfg, cache):
        manifest = prepare_dataset(synth_root, tmp_path / cache, cfg, workers=1, progress=False)
        low, high = modality_window(cfg, "tmax")
        level = (9.0 - low) / (high - low)
        dice = []
        for cid in manifest.case_ids:
            case = manifest.case(cid)
            cached = np.asarray(case.image[0], dtype=np.float32) > level
            native = roundtrip_mask(cached, case.cache_geometry, case.native_geometry)
            dice.append(dice_score(native, case.native_tmax() > 9.0))
        return float(np.mean(dice))

    assert recovered(_cfg(modalities=["tmax"], image_size=64), "default") >= 0.9
    # the old [0, 7] s window (the winning team's) clips at 7 s: the 9 s level does not exist in the cache
    assert recovered(_cfg(modalities=["tmax"], image_size=64, windows={"tmax": [0.0, 7.0]}), "old") == 0.0
