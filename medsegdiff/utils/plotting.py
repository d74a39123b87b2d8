"""Figures without pyplot: matplotlib's object API on the Agg canvas, written atomically as PNG.

Nothing here touches matplotlib's global state (no ``pyplot``, no backend switch), so plotting
works headless, in threads and in tests. matplotlib is imported inside the functions: it is heavy
(about a second) and only the commands that draw need it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from medsegdiff.utils.io import atomic_write_with

# Colours that stay visible on black, white and grey backgrounds when drawn over a dark halo.
PREDICTION_COLOR = "#ff2bd6"  # magenta
REFERENCE_COLOR = "#00e5ff"  # cyan
HALO_COLOR = "black"


def new_figure(width_in: float, height_in: float, dpi: int = 100) -> Any:
    """A ``matplotlib.figure.Figure`` attached to an Agg canvas (white background)."""
    # delayed: matplotlib is heavy (about a second) and only the commands that draw need it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    return fig


def figure_rgb(fig: Any) -> np.ndarray:
    """The rendered figure as an ``(H, W, 3)`` uint8 array."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_png(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Render ``fig`` and write it as an RGB PNG, atomically.

    Raises:
        OSError: the folder is not writable (named in the error).
    """
    image = sitk.GetImageFromArray(figure_rgb(fig), isVector=True)
    path = Path(path)
    atomic_write_with(path, lambda tmp: sitk.WriteImage(image, tmp), suffix=".png")
    return path


__all__ = ["HALO_COLOR", "PREDICTION_COLOR", "REFERENCE_COLOR", "figure_rgb", "new_figure", "save_png"]
