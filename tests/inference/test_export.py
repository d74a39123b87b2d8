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
    overlay_rgb,
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
    from medsegdiff.data.preprocess import cache_geometry

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


def test_overlay_png_colours(tmp_path):
    image = np.zeros((4, 8, 8), np.float32)  # black background: blends are exact
    pred = np.zeros((4, 8, 8), np.uint8)
    ref = np.zeros((4, 8, 8), np.uint8)
    pred[2, 1:3, 1:3] = 1
    ref[2, 5:7, 5:7] = 1
    rgb = overlay_rgb(image, pred, ref, n_slices=2)
    assert rgb.shape == (8, 16, 3) and rgb.dtype == np.uint8
    path = write_overlay(tmp_path / "o.png", image, pred, ref, n_slices=2, min_tile=0)
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    np.testing.assert_array_equal(back, rgb)
    # small grids are enlarged by an integer nearest-neighbour factor: 8 px tiles -> 32 px (factor 4)
    big = sitk.GetArrayFromImage(sitk.ReadImage(str(write_overlay(tmp_path / "b.png", image, pred, ref,
                                                                  n_slices=2, min_tile=30))))
    assert big.shape == (32, 64, 3)
    np.testing.assert_array_equal(big[::4, ::4], rgb)
    # slice 2 has the lesions; slices are shown in z order, so it is one of the two tiles
    # slice 2 has the most lesion, then slice 0 (stable order): tiles are z-sorted -> [0, 2]
    tile = rgb[:, 8:]
    np.testing.assert_array_equal(tile[1, 1], [127, 0, 0])  # prediction: half red
    np.testing.assert_array_equal(tile[5, 5], [0, 127, 0])  # reference: half green
    np.testing.assert_array_equal(tile[0, 0], [0, 0, 0])
    assert rgb[:, :8].max() == 0


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
