"""A dependency-free PNG writer for overlay and sample images (grey or RGB, 8 bit)."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np

from medsegdiff.utils.io import atomic_write_bytes


def to_uint8(image: np.ndarray) -> np.ndarray:
    """``(H, W)`` or ``(H, W, 3|4)`` array to uint8; floats are read as [0, 1] and clipped.

    Raises:
        ValueError: for other shapes.
    """
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ValueError(f"image of shape {arr.shape}; expected (H, W), (H, W, 3) or (H, W, 4)")
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    arr = np.nan_to_num(arr.astype(np.float64), nan=0.0)
    return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an image (see :func:`to_uint8` for accepted inputs)."""
    arr = np.ascontiguousarray(to_uint8(image))
    h, w = arr.shape[:2]
    color = 0 if arr.ndim == 2 else {3: 2, 4: 6}[arr.shape[2]]  # grey, RGB, RGBA
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def write_png(path: str | os.PathLike[str], image: np.ndarray) -> None:
    """Write an image as PNG atomically."""
    atomic_write_bytes(path, encode_png(image))
