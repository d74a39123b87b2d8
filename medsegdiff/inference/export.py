"""Write predictions in the patient's own geometry: NIfTI masks/probabilities, overlays, a CSV.

The network works on the cache grid (in-plane resampled to ``H = W = data.image_size``, Z kept).
:func:`to_native` resamples a cache-grid volume back onto the case's original NCCT grid (size,
spacing, origin and direction, oblique ones included) with SimpleITK linear interpolation in
physical space; thresholding happens after resampling, on the native grid, so the written mask
follows the probability's iso-contour rather than blocky cache voxels. Every file is written
atomically and carries the native header exactly (the official code wrote JPEGs).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from medsegdiff.utils.io import atomic_write_text, atomic_write_with


class GeometryLike(Protocol):
    """What :class:`medsegdiff.data.loading.Geometry` provides (SimpleITK conventions)."""

    size: Sequence[int]  # (x, y, z)
    spacing: Sequence[float]
    origin: Sequence[float]
    direction: Sequence[float]  # 9 floats, row-major


def geometry_image(geometry: GeometryLike, array: np.ndarray | None = None) -> Any:
    """A ``sitk.Image`` on ``geometry``'s grid, holding ``array`` ``(Z, Y, X)`` (zeros when None).

    Raises:
        ValueError: ``array`` shape does not match ``geometry.size`` reversed.
    """
    import SimpleITK as sitk

    size = tuple(int(s) for s in geometry.size)
    if array is None:
        array = np.zeros(size[::-1], dtype=np.float32)
    if tuple(array.shape) != size[::-1]:
        raise ValueError(f"array shape {tuple(array.shape)} does not match geometry size {size} (x, y, z)")
    img = sitk.GetImageFromArray(np.ascontiguousarray(array))
    img.SetSpacing(tuple(float(s) for s in geometry.spacing))
    img.SetOrigin(tuple(float(o) for o in geometry.origin))
    img.SetDirection(tuple(float(d) for d in geometry.direction))
    return img


def to_native(
    volume: np.ndarray,
    cache_geometry: GeometryLike,
    native_geometry: GeometryLike,
    *,
    interpolator: str = "linear",
) -> np.ndarray:
    """Resample a cache-grid volume ``(Z, H, W)`` onto the native grid ``(Z, Y, X)``.

    Args:
        volume: values on the cache grid (probability, uncertainty, ...).
        cache_geometry: the cache grid (``CachedCase.cache_geometry``).
        native_geometry: the original NCCT grid (``CachedCase.native_geometry``).
        interpolator: ``"linear"`` or ``"nearest"``.

    Returns:
        float32 ``(Z, Y, X)``; points outside the cache grid get 0.
    """
    import SimpleITK as sitk

    src = geometry_image(cache_geometry, np.asarray(volume, dtype=np.float32))
    ref = geometry_image(native_geometry)
    interp = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}[interpolator]
    out = sitk.Resample(src, ref, sitk.Transform(), interp, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).astype(np.float32, copy=False)


def write_nifti(path: str | os.PathLike[str], array: np.ndarray, geometry: GeometryLike) -> Path:
    """Write ``array`` ``(Z, Y, X)`` as compressed NIfTI with ``geometry``'s header, atomically."""
    import SimpleITK as sitk

    img = geometry_image(geometry, array)
    path = Path(path)
    atomic_write_with(path, lambda tmp: sitk.WriteImage(img, tmp, True), suffix=".nii.gz")
    return path


def output_paths(out_dir: str | os.PathLike[str], case_id: str) -> dict[str, Path]:
    """The per-case file names: ``mask``, ``prob``, ``uncertainty``, ``overlay``."""
    out = Path(out_dir)
    return {
        "mask": out / f"{case_id}.nii.gz",
        "prob": out / f"{case_id}_prob.nii.gz",
        "uncertainty": out / f"{case_id}_uncertainty.nii.gz",
        "overlay": out / f"{case_id}_overlay.png",
    }


def write_case(
    out_dir: str | os.PathLike[str],
    case_id: str,
    *,
    mask: np.ndarray,
    prob: np.ndarray,
    uncertainty: np.ndarray,
    native_geometry: GeometryLike,
) -> dict[str, Path]:
    """Write the three native-grid NIfTI files of one case (uint8 mask, float32 prob/uncertainty)."""
    paths = output_paths(out_dir, case_id)
    write_nifti(paths["prob"], np.asarray(prob, dtype=np.float32), native_geometry)
    write_nifti(paths["uncertainty"], np.asarray(uncertainty, dtype=np.float32), native_geometry)
    write_nifti(paths["mask"], np.asarray(mask, dtype=np.uint8), native_geometry)  # last: marks completion
    return {k: v for k, v in paths.items() if k != "overlay"}


def _to_gray(image: np.ndarray) -> np.ndarray:
    img = np.nan_to_num(np.asarray(image, dtype=np.float32))
    lo, hi = np.percentile(img, [1.0, 99.0]) if img.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((img - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def overlay_rgb(
    image: np.ndarray, pred: np.ndarray, reference: np.ndarray | None = None, *, n_slices: int = 3
) -> np.ndarray:
    """A montage ``(H, n * W, 3)`` uint8 of the slices with the most lesion.

    Args:
        image: ``(Z, H, W)`` one image channel (e.g. Tmax), shown in gray.
        pred: ``(Z, H, W)`` predicted mask, blended in red.
        reference: ``(Z, H, W)`` reference mask or None, blended in green (overlap = yellow).
        n_slices: slices shown, chosen by predicted (+ reference) lesion area, in Z order.
    """
    pred = np.asarray(pred) > 0
    ref = None if reference is None else np.asarray(reference) > 0
    area = pred.reshape(pred.shape[0], -1).sum(1) + (0 if ref is None else ref.reshape(ref.shape[0], -1).sum(1))
    n = max(1, min(n_slices, pred.shape[0]))
    if area.max() > 0:
        picks = np.sort(np.argsort(-area, kind="stable")[:n])
    else:
        picks = np.linspace(0, pred.shape[0] - 1, n).round().astype(int)
    gray = _to_gray(image)
    tiles = []
    for z in picks:
        rgb = np.repeat(gray[z][..., None], 3, axis=-1).astype(np.float32)
        rgb[pred[z]] = 0.5 * rgb[pred[z]] + 0.5 * np.array([255.0, 0.0, 0.0])
        if ref is not None:
            rgb[ref[z], 1] = 0.5 * rgb[ref[z], 1] + 0.5 * 255.0
        tiles.append(rgb.astype(np.uint8))
    return np.concatenate(tiles, axis=1)


def write_overlay(
    path: str | os.PathLike[str],
    image: np.ndarray,
    pred: np.ndarray,
    reference: np.ndarray | None = None,
    *,
    n_slices: int = 3,
    min_tile: int = 256,
) -> Path:
    """Write :func:`overlay_rgb` as an RGB PNG with SimpleITK (no matplotlib), atomically.

    Small grids are enlarged by an integer nearest-neighbour factor so each tile is at least
    ``min_tile`` pixels on its longer side (voxels stay square blocks; nothing is interpolated).
    """
    import SimpleITK as sitk

    rgb = overlay_rgb(image, pred, reference, n_slices=n_slices)
    tile = max(np.asarray(pred).shape[1:])
    factor = max(1, -(-min_tile // max(tile, 1)))
    if factor > 1:
        rgb = np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)
    img = sitk.GetImageFromArray(rgb, isVector=True)
    path = Path(path)
    atomic_write_with(path, lambda tmp: sitk.WriteImage(img, tmp), suffix=".png")
    return path


def count_components(mask: np.ndarray) -> int:
    """Connected lesion components with 26-connectivity (as the ISLES'24 evaluation, cc3d)."""
    from scipy import ndimage

    m = np.asarray(mask) > 0
    if not m.any():
        return 0
    _, n = ndimage.label(m, structure=np.ones((3,) * m.ndim, dtype=bool))
    return int(n)


CSV_COLUMNS = (
    "case_id",
    "lesion_volume_ml",
    "n_components",
    "threshold",
    "mean_uncertainty",
    "mean_uncertainty_lesion",
    "combine",
    "members",
    "respacing",
)


def case_row(
    case_id: str,
    mask: np.ndarray,
    unc: np.ndarray,
    voxel_volume_ml: float,
    threshold: float,
    **extra: Any,
) -> dict[str, Any]:
    """One ``predictions.csv`` row from the native-grid mask and uncertainty."""
    m = np.asarray(mask) > 0
    u = np.asarray(unc, dtype=np.float64)
    return {
        "case_id": case_id,
        "lesion_volume_ml": round(float(m.sum()) * float(voxel_volume_ml), 4),
        "n_components": count_components(m),
        "threshold": round(float(threshold), 6),
        "mean_uncertainty": round(float(u.mean()) if u.size else 0.0, 6),
        "mean_uncertainty_lesion": round(float(u[m].mean()) if m.any() else 0.0, 6),
        **extra,
    }


def write_predictions_csv(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> Path:
    """Write the per-case summary atomically (columns :data:`CSV_COLUMNS` first)."""
    cols = list(CSV_COLUMNS)
    for row in rows:
        cols.extend(k for k in row if k not in cols)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = Path(path)
    atomic_write_text(path, buf.getvalue())
    return path


__all__ = [
    "CSV_COLUMNS",
    "case_row",
    "count_components",
    "geometry_image",
    "output_paths",
    "overlay_rgb",
    "to_native",
    "write_case",
    "write_nifti",
    "write_overlay",
    "write_predictions_csv",
]
