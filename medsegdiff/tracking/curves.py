"""Learning curves from ``metrics.jsonl``: ``learning_curves.png`` in the run directory.

Two panels over the optimisation step: the training loss terms (``train/loss`` and the objective's
terms; learning rate, timing and memory left out) and the validation metrics (``val/*``), each
with labelled axes and a legend. Written when the run's tracker finishes
(:class:`~medsegdiff.tracking.jsonl.JsonlTracker`), so every run directory that trained has it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medsegdiff.utils.plotting import new_figure, save_png

CURVES_FILE = "learning_curves.png"
_NOT_A_LOSS = ("lr", "grad_norm", "step_time_s", "samples_per_s", "max_memory_gb", "max_rss_gb",
               "non_finite_steps", "skipped_step", "loss_scale")


def curve_series(records: Sequence[dict[str, Any]]) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[tuple[int, float]]]]:
    """``(training, validation)``: ``{key: [(step, value), ...]}`` of the finite scalar records."""
    train: dict[str, list[tuple[int, float]]] = {}
    val: dict[str, list[tuple[int, float]]] = {}
    for rec in records:
        if "table" in rec or "images" in rec or "step" not in rec:
            continue
        for key, value in rec.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                continue
            if key.startswith("train/") and key[6:] not in _NOT_A_LOSS:
                train.setdefault(key, []).append((int(rec["step"]), float(value)))
            elif key.startswith("val/"):
                val.setdefault(key, []).append((int(rec["step"]), float(value)))
    return train, val


def write_learning_curves(records: Sequence[dict[str, Any]], out_path: str | os.PathLike[str]) -> Path | None:
    """Plot the ``metrics.jsonl`` records into ``out_path`` (PNG); None (nothing written) without any curve.

    Raises:
        OSError: the file cannot be read or written.
    """
    fig = learning_curves_figure(records)
    return None if fig is None else save_png(fig, out_path)


def learning_curves_figure(records: Sequence[dict[str, Any]]) -> Any:
    """The two-panel figure of :func:`curve_series` (None without any curve)."""
    train, val = curve_series(records)
    if not train and not val:
        return None
    panels = [(title, series, ylabel) for title, series, ylabel in (
        ("training", train, "loss (per term)"), ("validation", val, "metric")) if series]
    fig = new_figure(5.0 * len(panels), 3.8)
    for i, (title, series, ylabel) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for key in sorted(series):
            steps, values = zip(*series[key])
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, ms=3, lw=1.2, label=key)
        ax.set_xlabel("optimisation step")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, color="0.9")
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


__all__ = ["CURVES_FILE", "curve_series", "learning_curves_figure", "write_learning_curves"]
