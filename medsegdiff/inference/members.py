"""The per-case members file ``<case>_members.npz``: what ``evaluate`` needs for the uncertainty metrics.

``medsegdiff predict`` writes, next to ``<case>.nii.gz`` / ``_prob`` / ``_uncertainty``, one
compressed ``.npz`` per diffusion case on the native grid (the reference grid):

* ``members``: the ensemble members' binary masks ``(M, Z, Y, X)``, each member's probability
  resampled to the native grid like the combined one and thresholded at the same threshold, stored
  bit-packed (``numpy.packbits`` over the flattened array, 1 bit per voxel);
* ``brain``: the region for voxel-wise calibration and error detection ``(Z, Y, X)``, bit-packed:
  the support of the model's input images (any input channel > 0 on the cache grid, holes filled
  per slice, as :func:`medsegdiff.data.preprocess.support_mask`), resampled to the native grid
  with nearest-neighbour interpolation. With ``data.brain_mask`` the inputs are already zero
  outside the brain, so this is the brain mask itself; without it, it is the imaged tissue;
* ``shape``: ``(M, Z, Y, X)``; ``format``: 1.

A 5-member 512 x 512 x 70 case takes 11 MiB unpacked and usually well under 1 MiB compressed.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from medsegdiff.data.preprocess import support_mask
from medsegdiff.inference.export import to_native
from medsegdiff.utils.io import atomic_write_bytes

__all__ = ["MEMBERS_FORMAT", "brain_region", "members_path", "native_members", "read_members", "write_members"]

MEMBERS_FORMAT = 1


def members_path(out_dir: str | os.PathLike[str], case_id: str) -> Path:
    """``<out_dir>/<case_id>_members.npz``."""
    return Path(out_dir) / f"{case_id}_members.npz"


def brain_region(image: np.ndarray) -> np.ndarray:
    """Support of a cached image ``(C, Z, H, W)``: any channel > 0, holes filled per slice -> bool ``(Z, H, W)``."""
    return support_mask(list(np.asarray(image)))


def native_members(members: np.ndarray, image: np.ndarray, threshold: float, cache_geometry: Any,
                   native_geometry: Any) -> tuple[np.ndarray, np.ndarray]:
    """Member masks and brain region of one case on the native grid.

    Args:
        members: ``(M, Z, H, W)`` member probabilities on the cache grid.
        image: ``(C, Z, H, W)`` the cached model input (for :func:`brain_region`).
        threshold: the probability threshold of the final mask.
        cache_geometry, native_geometry: the case's grids.

    Returns:
        ``(M, Z, Y, X)`` bool member masks (each resampled linearly, then ``>= threshold``) and the
        ``(Z, Y, X)`` bool brain region (nearest neighbour).
    """
    masks = np.stack([to_native(m, cache_geometry, native_geometry) >= threshold for m in np.asarray(members)])
    brain = to_native(brain_region(image).astype(np.float32), cache_geometry, native_geometry,
                      interpolator="nearest") > 0.5
    return masks, brain


def write_members(path: str | os.PathLike[str], members: np.ndarray, brain: np.ndarray) -> Path:
    """Write member masks ``(M, *S)`` and the brain region ``(*S)`` bit-packed, atomically.

    Raises:
        ValueError: ``brain`` does not match the members' spatial shape.
    """
    m = np.asarray(members) > 0
    b = np.asarray(brain) > 0
    if m.ndim < 2 or m.shape[1:] != b.shape:
        raise ValueError(f"members {m.shape} and brain {b.shape} must be (M, *S) and (*S)")
    buf = io.BytesIO()
    np.savez_compressed(buf, members=np.packbits(m.ravel()), brain=np.packbits(b.ravel()),
                        shape=np.asarray(m.shape, dtype=np.int64), format=np.int64(MEMBERS_FORMAT))
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def read_members(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(members bool (M, *S), brain bool (*S))`` from :func:`write_members`'s file.

    Raises:
        ValueError: a file of another format.
    """
    with np.load(Path(path)) as data:
        if int(data["format"]) != MEMBERS_FORMAT:
            raise ValueError(f"{path}: members file format {int(data['format'])}, expected {MEMBERS_FORMAT}")
        shape = tuple(int(s) for s in data["shape"])
        n = int(np.prod(shape))
        members = np.unpackbits(data["members"], count=n).astype(bool).reshape(shape)
        brain = np.unpackbits(data["brain"], count=n // shape[0]).astype(bool).reshape(shape[1:])
    return members, brain
