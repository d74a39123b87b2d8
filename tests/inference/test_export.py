from __future__ import annotations

import csv
import math
from dataclasses import dataclass

import numpy as np
import pytest
import SimpleITK as sitk

from medsegdiff.inference.export import (
    case_row,
    count_components,
    geometry_image,
    to_native,
    write_case,
    write_overlay,
    write_predictions_csv,
)


@dataclass
class Geo:
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0


def _oblique_direction(tilt_deg: float = 11.0, yaw_deg: float = 7.0) -> tuple[float, ...]:
    a, b = math.radians(tilt_deg), math.radians(yaw_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    rz = np.array([[math.cos(b), -math.sin(b), 0], [math.sin(b), math.cos(b), 0], [0, 0, 1]])
    return tuple((rz @ rx).ravel().tolist())


NATIVE = Geo(size=(40, 44, 7), spacing=(0.45, 0.42, 2.0), origin=(12.5, -30.25, 4.0), direction=_oblique_direction())


def _cache_geometry(native: Geo, image_size: int) -> Geo:
    """The cache grid exactly as ``medsegdiff prepare`` builds it."""
    from medsegdiff.data.grid import cache_geometry

    return cache_geometry(native, image_size)


def _reference_blob(native: Geo) -> np.ndarray:
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(native.size[::-1], native.spacing[::-1])],
                          indexing="ij")
    r2 = ((x - 9.0) / 5.0) ** 2 + ((y - 8.0) / 4.5) ** 2 + ((z - 6.0) / 5.0) ** 2
    return (r2 <= 1.0).astype(np.uint8)


def test_geometry_round_trip_oblique_anisotropic(tmp_path):
    cache = _cache_geometry(NATIVE, 16)
    ref = _reference_blob(NATIVE)
    assert ref.sum() > 500
    # down-sample the reference to the cache grid in physical space (what prepare does), as a probability
    down = sitk.Resample(geometry_image(NATIVE, ref.astype(np.float32)), geometry_image(cache), sitk.Transform(),
                         sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    prob_cache = sitk.GetArrayFromImage(down)
    assert prob_cache.shape == (7, 16, 16)
    prob_native = to_native(prob_cache, cache, NATIVE)
    assert prob_native.shape == ref.shape and prob_native.dtype == np.float32
    mask = (prob_native >= 0.5).astype(np.uint8)
    dice = 2 * (mask & ref).sum() / (mask.sum() + ref.sum())
    assert dice > 0.93

    paths = write_case(tmp_path, "sub-stroke0001", mask=mask, prob=prob_native,
                       uncertainty=np.zeros_like(prob_native), native_geometry=NATIVE)
    for key, dtype in (("mask", sitk.sitkUInt8), ("prob", sitk.sitkFloat32), ("uncertainty", sitk.sitkFloat32)):
        img = sitk.ReadImage(str(paths[key]))
        assert img.GetPixelID() == dtype
        assert img.GetSize() == NATIVE.size
        np.testing.assert_allclose(img.GetSpacing(), NATIVE.spacing, atol=1e-6)
        np.testing.assert_allclose(img.GetOrigin(), NATIVE.origin, atol=1e-4)
        np.testing.assert_allclose(img.GetDirection(), NATIVE.direction, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(paths["mask"]))), mask)
    assert paths["mask"].name == "sub-stroke0001.nii.gz"
    assert not list(tmp_path.glob(".*.tmp*"))  # atomic writes leave no temporaries


def test_to_native_uses_physical_space_not_indices():
    # a cache grid shifted by one cache voxel along its x axis must move the content accordingly
    cache = _cache_geometry(NATIVE, 16)
    vol = np.zeros((7, 16, 16), dtype=np.float32)
    vol[:, 6:10, 6:10] = 1.0
    a = to_native(vol, cache, NATIVE)
    d = np.array(cache.direction).reshape(3, 3)
    moved = Geo(cache.size, cache.spacing, tuple((np.array(cache.origin) + d[:, 0] * cache.spacing[0]).tolist()),
                cache.direction)
    b = to_native(vol, moved, NATIVE)
    ca = np.array(np.nonzero(a > 0.5)).mean(1)
    cb = np.array(np.nonzero(b > 0.5)).mean(1)
    # x index shift in native voxels = cache spacing / native spacing along x
    assert cb[2] - ca[2] == pytest.approx(cache.spacing[0] / NATIVE.spacing[0], abs=0.3)


def _near(rgb: np.ndarray, hex_color: str, tol: int = 40) -> np.ndarray:
    target = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
    return np.abs(rgb.astype(int) - target).max(-1) <= tol


def test_overlay_outlines_visible_on_dark_and_bright_with_legend_and_titles(tmp_path):
    from medsegdiff.inference.export import dice, overlay_figure
    from medsegdiff.utils.plotting import PREDICTION_COLOR, REFERENCE_COLOR, figure_rgb

    image = np.zeros((4, 32, 32), np.float32)
    image[:, :, 16:] = 1000.0  # right half saturated white (a bright Tmax), left half black
    pred = np.zeros((4, 32, 32), np.uint8)
    ref = np.zeros((4, 32, 32), np.uint8)
    pred[2, 8:20, 2:12] = 1  # on black
    ref[2, 8:20, 20:30] = 1  # on white: a blended green fill was invisible here
    rgb = figure_rgb(overlay_figure(image, pred, ref, case_id="sub-stroke0007", n_slices=2, min_tile=256))
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    magenta, cyan = _near(rgb, PREDICTION_COLOR), _near(rgb, REFERENCE_COLOR)
    assert magenta.sum() > 100 and cyan.sum() > 100
    # outlines, not fills: far fewer coloured pixels than the filled lesion would cover
    px_per_voxel = (rgb.shape[1] / 2 / 32) ** 2
    assert cyan.sum() < 0.5 * ref.sum() * px_per_voxel and magenta.sum() < 0.5 * pred.sum() * px_per_voxel
    fig = overlay_figure(image, pred, ref, case_id="sub-stroke0007", n_slices=2)
    assert fig._suptitle.get_text() == f"sub-stroke0007: Dice {dice(pred, ref):.3f} (whole volume)"
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["slice 0 of 4, Dice 1.00", "slice 2 of 4, Dice 0.00"]  # z order, both-empty Dice = 1
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["prediction", "reference"]
    no_ref = overlay_figure(image, pred, None, case_id="c1")
    assert no_ref._suptitle.get_text() == "c1: no reference mask"
    assert [t.get_text() for t in no_ref.legends[0].get_texts()] == ["prediction"]
    # the PNG on disk is exactly the rendered figure, in RGB
    path = write_overlay(tmp_path / "o.png", image, pred, ref, case_id="sub-stroke0007", n_slices=2)
    back = sitk.ReadImage(str(path))
    assert back.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), rgb)


def test_dice_of_masks():
    from medsegdiff.inference.export import dice

    a = np.zeros((2, 4, 4), bool)
    b = np.zeros((2, 4, 4), bool)
    assert dice(a, b) == 1.0
    a[0, :2, :2] = True  # 4 voxels
    b[0, :2, :1] = True  # 2 voxels, both inside a
    assert dice(a, b) == pytest.approx(2 * 2 / 6)

def test_predictions_csv_row(tmp_path):
    mask = np.zeros((4, 6, 6), np.uint8)
    mask[0, 0:2, 0:2] = 1  # 4 voxels
    mask[3, 4:6, 4:6] = 1  # 4 voxels, a separate component
    unc = np.full(mask.shape, 0.1, np.float32)
    unc[mask > 0] = 0.5
    row = case_row("sub-stroke0002", mask, unc, 0.25, 0.4, combine="mean", members=5, respacing="ddim250")
    assert row["lesion_volume_ml"] == pytest.approx(8 * 0.25)
    assert row["n_components"] == 2 == count_components(mask)
    assert row["mean_uncertainty_lesion"] == pytest.approx(0.5)
    assert row["mean_uncertainty"] == pytest.approx((8 * 0.5 + 136 * 0.1) / 144, abs=1e-6)
    path = write_predictions_csv(tmp_path / "predictions.csv", [row])
    rows = list(csv.DictReader(path.open()))
    assert rows[0]["case_id"] == "sub-stroke0002" and float(rows[0]["threshold"]) == 0.4
