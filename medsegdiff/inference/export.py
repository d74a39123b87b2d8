"""Write predictions in the patient's own geometry: NIfTI masks/probabilities, overlays, a CSV.

The network works on the cache grid (in-plane resampled to ``H = W = data.image_size``, Z kept).
:func:`to_native` resamples a cache-grid volume back onto the case's original NCCT grid (size,
spacing, origin and direction, oblique ones included) with SimpleITK linear interpolation in
physical space; thresholding happens after resampling, on the native grid, so the written mask
follows the probability's iso-contour rather than blocky cache voxels. Every file is written
atomically and carries the native header exactly (the official code wrote JPEGs). Overlay PNGs
outline the prediction and the reference (no blended fills, which vanish on a bright Tmax map)
and name the case, the slices and their Dice (:func:`overlay_figure`).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from medsegdiff.utils.io import atomic_write_text, atomic_write_with
from medsegdiff.utils.plotting import HALO_COLOR, PREDICTION_COLOR, REFERENCE_COLOR, new_figure, save_png


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
    src = geometry_image(cache_geometry, np.asarray(volume, dtype=np.float32))
    ref = geometry_image(native_geometry)
    interp = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}[interpolator]
    out = sitk.Resample(src, ref, sitk.Transform(), interp, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).astype(np.float32, copy=False)


def write_nifti(path: str | os.PathLike[str], array: np.ndarray, geometry: GeometryLike) -> Path:
    """Write ``array`` ``(Z, Y, X)`` as compressed NIfTI with ``geometry``'s header, atomically."""
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


def _window(image: np.ndarray) -> tuple[float, float]:
    """Grey-level window: the 1st and 99th percentile of the finite voxels."""
    img = np.asarray(image, dtype=np.float32)
    finite = img[np.isfinite(img)]
    lo, hi = np.percentile(finite, [1.0, 99.0]) if finite.size else (0.0, 1.0)
    return float(lo), float(hi if hi > lo else lo + 1.0)


def dice(pred: np.ndarray, reference: np.ndarray) -> float:
    """Dice ``2|P & R| / (|P| + |R|)`` of two masks (1.0 when both are empty)."""
    p, r = np.asarray(pred) > 0, np.asarray(reference) > 0
    total = int(p.sum() + r.sum())
    return 1.0 if total == 0 else 2.0 * float((p & r).sum()) / total


def overlay_slices(pred: np.ndarray, reference: np.ndarray | None, n_slices: int) -> np.ndarray:
    """Indices of the ``n_slices`` slices with the most predicted (+ reference) lesion, in Z order.

    Without any lesion, evenly spaced slices.
    """
    pred = np.asarray(pred) > 0
    area = pred.reshape(pred.shape[0], -1).sum(1)
    if reference is not None:
        area = area + (np.asarray(reference) > 0).reshape(pred.shape[0], -1).sum(1)
    n = max(1, min(n_slices, pred.shape[0]))
    if area.max() > 0:
        return np.sort(np.argsort(-area, kind="stable")[:n])
    return np.linspace(0, pred.shape[0] - 1, n).round().astype(int)


def _contour(ax: Any, mask: np.ndarray, color: str, linestyle: Any) -> None:
    """Outline ``mask`` in ``color`` over a black halo, so it shows on dark and bright images."""
    if not mask.any():
        return
    m = np.pad(mask.astype(np.float32), 1)  # closed contours at the border too
    extent = (-1.5, mask.shape[1] + 0.5, mask.shape[0] + 0.5, -1.5)
    ax.contour(m, levels=[0.5], colors=[HALO_COLOR], linewidths=3.4, extent=extent, origin="upper")
    ax.contour(m, levels=[0.5], colors=[color], linewidths=1.6, linestyles=[linestyle], extent=extent,
               origin="upper")


def overlay_figure(
    image: np.ndarray,
    pred: np.ndarray,
    reference: np.ndarray | None = None,
    *,
    case_id: str = "",
    n_slices: int = 3,
    min_tile: int = 256,
) -> Any:
    """A figure of the slices with the most lesion: the image in grey, outlines of the masks.

    Prediction: solid magenta outline; reference: dashed cyan outline; both over a black halo
    (visible on a black or a saturated Tmax background). Each tile is titled with its slice index
    (and that slice's Dice with a reference); the figure title names the case and the whole-volume
    Dice; a legend says which outline is which.

    Args:
        image: ``(Z, H, W)`` one image channel (e.g. Tmax), shown in grey (1-99 % window).
        pred: ``(Z, H, W)`` predicted mask.
        reference: ``(Z, H, W)`` reference mask or None.
        case_id: shown in the title.
        n_slices: tiles, chosen by :func:`overlay_slices`.
        min_tile: each tile is at least this many pixels wide.

    Returns:
        A ``matplotlib.figure.Figure`` on an Agg canvas (see :mod:`medsegdiff.utils.plotting`).
    """
    from matplotlib.lines import Line2D  # delayed: matplotlib is heavy, only overlays need it

    img = np.asarray(image, dtype=np.float32)
    pm = np.asarray(pred) > 0
    rm = None if reference is None else np.asarray(reference) > 0
    picks = overlay_slices(pm, rm, n_slices)
    lo, hi = _window(img)
    tile_in = 3.0
    dpi = max(100, -(-int(min_tile) // int(tile_in)))
    fig = new_figure(tile_in * len(picks), tile_in + 0.9, dpi=dpi)
    axes = fig.subplots(1, len(picks), squeeze=False)[0]
    for ax, z in zip(axes, picks):
        ax.imshow(np.nan_to_num(img[z], nan=lo), cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        if rm is not None:
            _contour(ax, rm[z], REFERENCE_COLOR, (0, (3.0, 1.5)))
        _contour(ax, pm[z], PREDICTION_COLOR, "solid")
        title = f"slice {int(z)} of {pm.shape[0]}"
        if rm is not None:
            title += f", Dice {dice(pm[z], rm[z]):.2f}"
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    name = case_id or "case"
    head = f"{name}: Dice {dice(pm, rm):.3f} (whole volume)" if rm is not None else f"{name}: no reference mask"
    fig.suptitle(head, fontsize=10)
    handles = [Line2D([], [], color=PREDICTION_COLOR, lw=2.0, label="prediction",
                      path_effects=_halo(HALO_COLOR))]
    if rm is not None:
        handles.append(Line2D([], [], color=REFERENCE_COLOR, lw=2.0, ls=(0, (3.0, 1.5)), label="reference",
                              path_effects=_halo(HALO_COLOR)))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.84, bottom=0.12, wspace=0.05)
    return fig


def _halo(color: str) -> list[Any]:
    from matplotlib import patheffects  # delayed: matplotlib is heavy, only overlays need it

    return [patheffects.Stroke(linewidth=4.0, foreground=color), patheffects.Normal()]


def write_overlay(
    path: str | os.PathLike[str],
    image: np.ndarray,
    pred: np.ndarray,
    reference: np.ndarray | None = None,
    **options: Any,
) -> Path:
    """Write :func:`overlay_figure` as an RGB PNG, atomically.

    Args:
        path: the PNG to write.
        image, pred, reference: as for :func:`overlay_figure`.
        **options: its keyword options (``case_id``, ``n_slices``, ``min_tile``).

    Raises:
        OSError: the folder is not writable.
        TypeError: an option :func:`overlay_figure` does not take.
    """
    return save_png(overlay_figure(image, pred, reference, **options), path)


def count_components(mask: np.ndarray) -> int:
    """Connected lesion components with 26-connectivity (as the ISLES'24 evaluation, cc3d)."""
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
    "dice",
    "geometry_image",
    "output_paths",
    "overlay_figure",
    "overlay_slices",
    "to_native",
    "write_case",
    "write_nifti",
    "write_overlay",
    "write_predictions_csv",
]
