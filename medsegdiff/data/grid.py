"""The cache grid: its geometry, in-plane resampling onto it, and what it costs (the resolution ceiling).

The cache keeps every slice of the native NCCT grid and resamples in-plane only, to
``data.image_size`` pixels over the same physical extent (:func:`cache_geometry`). Predictions come
back to the native grid by linear interpolation; :func:`roundtrip_mask` sends a reference mask the
same way, and the Dice of that round trip (:func:`resolution_ceiling`) is the most any model
trained on this grid can score.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import SimpleITK as sitk

from medsegdiff.config.data import DataConfig
from medsegdiff.metrics.isles24 import dice_score

# --------------------------------------------------------------------------------------------
# Resampling (SimpleITK)


def cache_geometry(native: Any, image_size: int) -> Any:
    """The cache grid of a native :class:`~medsegdiff.data.loading.Geometry`.

    Size ``(image_size, image_size, z)``; same origin and direction; in-plane spacing
    ``s * (n - 1) / (image_size - 1)`` so that the first and last voxel centres coincide with the
    native ones (the grid covers the same physical extent); z spacing unchanged.
    """
    nx, ny, nz = (int(v) for v in native.size)
    sx, sy, sz = (float(v) for v in native.spacing)

    def new_spacing(s: float, n: int) -> float:
        return s * (n - 1) / (image_size - 1) if n > 1 else s * n / image_size

    return dataclasses.replace(native, size=(image_size, image_size, nz),
                               spacing=(new_spacing(sx, nx), new_spacing(sy, ny), sz))


def _to_sitk(volume: np.ndarray, geometry: Any) -> Any:
    img = sitk.GetImageFromArray(volume, isVector=False)
    img.SetSpacing([float(v) for v in geometry.spacing])
    img.SetOrigin([float(v) for v in geometry.origin])
    img.SetDirection([float(v) for v in geometry.direction])
    return img


def resample_inplane(volume: np.ndarray | list[np.ndarray], native: Any, target: Any, *,
                     mode: str = "linear", antialias: bool = True) -> np.ndarray:
    """Resample a ``(Z, Y, X)`` volume from the ``native`` grid onto the ``target`` grid (in-plane only).

    Args:
        volume: float32 (or bool/uint8 mask) on ``native``; or a one-element list holding it, which
            is emptied so that the array is freed as soon as SimpleITK has its copy (peak memory).
        native, target: :class:`~medsegdiff.data.loading.Geometry` with the same z size / spacing.
        mode: ``linear`` (anti-aliased: Gaussian smoothing with sigma = (target - native spacing) / 2
            along each in-plane axis that is downsampled, then linear interpolation), ``soft``
            (``linear`` on the 0/1 mask, then >= 0.5; returns uint8) or ``nearest`` (returns uint8).
        antialias: False = no Gaussian smoothing, plain linear interpolation (what
            :func:`medsegdiff.inference.export.to_native` does to predictions on the way back).

    Returns:
        ``(Z, H, W)`` float32 (``linear``) or uint8 (``soft``, ``nearest``).
    """
    if mode not in ("linear", "soft", "nearest"):
        raise ValueError(f"mode must be linear, soft or nearest, got {mode!r}")
    if isinstance(volume, list):
        volume = volume.pop()
    if mode == "nearest":
        img = _to_sitk(np.ascontiguousarray(volume, dtype=np.uint8), native)
        out = sitk.Resample(img, target.reference_image(), sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        return sitk.GetArrayFromImage(out)
    arr = np.ascontiguousarray(volume, dtype=np.float32)
    img = _to_sitk(arr, native)
    del arr, volume
    for axis in (0, 1) if antialias else ():
        sigma = (float(target.spacing[axis]) - float(native.spacing[axis])) / 2
        if sigma > 0:
            img = sitk.RecursiveGaussian(img, sigma, False, sitk.RecursiveGaussianImageFilter.ZeroOrder, axis)
    out = sitk.Resample(img, target.reference_image(), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    del img
    res = sitk.GetArrayFromImage(out)
    if mode == "soft":
        return (res >= 0.5).astype(np.uint8)
    return res


# --------------------------------------------------------------------------------------------
# Resolution ceiling: what the cache grid keeps of the reference mask


def roundtrip_mask(cache_mask: np.ndarray, cache_geo: Any, native_geo: Any) -> np.ndarray:
    """A cache-grid mask sent back to the native grid the way predictions are.

    Linear interpolation in physical space without smoothing, then ``>= 0.5`` (as
    :func:`medsegdiff.inference.export.to_native` followed by the 0.5 threshold).

    Args:
        cache_mask: ``(Z, H, W)`` 0/1 on ``cache_geo``.
        cache_geo, native_geo: :class:`~medsegdiff.data.loading.Geometry` of the two grids.

    Returns:
        uint8 ``(Z, Y, X)`` on ``native_geo``.
    """
    back = resample_inplane(np.asarray(cache_mask, dtype=np.float32), cache_geo, native_geo, mode="linear",
                            antialias=False)
    return (back >= 0.5).astype(np.uint8)


def resolution_ceiling(native_mask: np.ndarray, cache_mask: np.ndarray, native_geo: Any, cache_geo: Any) -> float:
    """Dice of the reference mask after the round trip native grid -> cache grid -> native grid.

    This is what a *perfect* cache-grid prediction scores on the native grid, i.e. the Dice that
    the cache resolution alone takes away before any learning.

    Args:
        native_mask: ``(Z, Y, X)`` reference on ``native_geo``.
        cache_mask: ``(Z, H, W)`` the same mask on the cache grid (as cached, ``data.mask_resample``).
    """
    return dice_score(roundtrip_mask(cache_mask, cache_geo, native_geo), native_mask)


def ceiling_summary(records: Iterable[Mapping[str, Any]], data_cfg: DataConfig) -> dict[str, Any]:
    """The cache's resolution ceiling from the per-case records (cases with a reference mask).

    Returns:
        ``mean_dice``, ``min_dice``, ``min_case``, ``n_cases`` (None / 0 without masks),
        ``image_size``, ``native_inplane_max`` (largest native x or y size), ``min_required``
        (``data.min_resolution_ceiling``) and ``ok`` (mean >= min_required, or nothing to check).
    """
    values = {str(r["case_id"]): float(r["resolution_ceiling"]) for r in records
              if r.get("resolution_ceiling") is not None}
    sizes = [max(int(v) for v in r["native_geometry"]["size"][:2]) for r in records if "native_geometry" in r]
    mean = float(np.mean(list(values.values()))) if values else None
    worst = min(values, key=values.__getitem__) if values else None
    required = float(data_cfg.min_resolution_ceiling)
    return {
        "mean_dice": mean,
        "min_dice": values[worst] if worst else None,
        "min_case": worst,
        "n_cases": len(values),
        "image_size": int(data_cfg.image_size),
        "native_inplane_max": max(sizes) if sizes else None,
        "min_required": required,
        "ok": mean is None or mean >= required,
    }


def ceiling_message(summary: Mapping[str, Any]) -> str:
    """One console line about the resolution ceiling (a warning with the fix when it is too low)."""
    mean = summary.get("mean_dice")
    if mean is None:
        return "resolution ceiling: no reference masks to measure it"
    text = (f"resolution ceiling {mean:.3f} Dice (worst case {summary['min_dice']:.3f}, {summary['min_case']}): "
            f"the reference masks sent through the {summary['image_size']} px cache grid and back")
    if summary.get("ok", True):
        return text
    return (f"WARNING: {text} lose lesion detail (below data.min_resolution_ceiling="
            f"{summary['min_required']:g}); raise data.image_size towards the native in-plane size "
            f"(up to {summary['native_inplane_max']} px), or set data.min_resolution_ceiling=0 to accept it")


__all__ = ["cache_geometry", "ceiling_message", "ceiling_summary", "resample_inplane",
           "resolution_ceiling", "roundtrip_mask"]
