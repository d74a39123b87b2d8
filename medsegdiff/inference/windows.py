"""Sliding windows for 3-D patch models: cut a volume into overlapping patches and stitch them.

3-D MedSegDiff networks are built for one patch size (``data.patch_size``, their FF-Parser
weights have that shape), so a whole cached volume ``(C, Z, H, W)`` is cut into patches with 50 %
overlap (the last window flush with the border; the volume is zero-padded where it is smaller than
a patch). All patches then go through the batched sampler together as one batch of "images", and
the member probabilities are stitched back by averaging the overlaps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import product

import numpy as np


def window_starts(size: int, patch: int, overlap: float = 0.5) -> list[int]:
    """Start indices of windows of length ``patch`` covering ``[0, size)`` (``size >= patch``).

    Stride ``max(1, round(patch * (1 - overlap)))``; the last window ends exactly at ``size``.
    """
    if size <= patch:
        return [0]
    stride = max(1, int(round(patch * (1.0 - overlap))))
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    return starts


def extract_patches(
    volume: np.ndarray, patch: Sequence[int], overlap: float = 0.5
) -> tuple[np.ndarray, list[tuple[int, int, int]], tuple[int, int, int]]:
    """Cut ``volume`` ``(C, Z, H, W)`` into patches ``(N, C, D, h, w)``.

    Returns:
        ``(patches, starts, padded_shape)``; ``starts`` are ``(z, y, x)`` corners in the padded volume.
    """
    c, *spatial = volume.shape
    padded = [max(s, p) for s, p in zip(spatial, patch)]
    if padded != list(spatial):
        out = np.zeros((c, *padded), dtype=np.float32)
        out[:, : spatial[0], : spatial[1], : spatial[2]] = volume
        volume = out
    starts = list(product(*(window_starts(s, p, overlap) for s, p in zip(padded, patch))))
    d, h, w = patch
    patches = np.stack([volume[:, z : z + d, y : y + h, x : x + w] for z, y, x in starts]).astype(np.float32)
    return patches, starts, tuple(padded)  # type: ignore[return-value]


def stitch(
    patches: np.ndarray, starts: Sequence[tuple[int, int, int]], padded_shape: Sequence[int],
    shape: Sequence[int],
) -> np.ndarray:
    """Average overlapping patch predictions ``(M, N, D, h, w)`` into ``(M, *shape)``.

    Args:
        patches: per member and patch, the predicted values.
        starts: the patch corners from :func:`extract_patches`.
        padded_shape: the padded ``(Z, H, W)``.
        shape: the original ``(Z, H, W)`` (the padding is cropped away).
    """
    m, _, d, h, w = patches.shape
    acc = np.zeros((m, *padded_shape), dtype=np.float64)
    count = np.zeros(tuple(padded_shape), dtype=np.float64)
    for i, (z, y, x) in enumerate(starts):
        acc[:, z : z + d, y : y + h, x : x + w] += patches[:, i]
        count[z : z + d, y : y + h, x : x + w] += 1.0
    out = acc / np.maximum(count, 1.0)
    return out[:, : shape[0], : shape[1], : shape[2]].astype(np.float32)


def sample_windows(
    sample: Callable[[np.ndarray], np.ndarray], volume: np.ndarray, patch: Sequence[int], overlap: float = 0.5
) -> np.ndarray:
    """Run ``sample`` over the sliding windows of ``volume`` and stitch its member outputs.

    Args:
        sample: patches ``(N, C, D, h, w)`` -> member values ``(M, N, D, h, w)`` (one batched call).
        volume: ``(C, Z, H, W)``.
        patch: ``(D, h, w)``.
        overlap: window overlap fraction.

    Returns:
        ``(M, Z, H, W)`` float32, overlaps averaged.
    """
    patches, starts, padded = extract_patches(volume, patch, overlap)
    return stitch(sample(patches), starts, padded, volume.shape[1:])


__all__ = ["extract_patches", "sample_windows", "stitch", "window_starts"]
