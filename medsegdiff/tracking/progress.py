"""A tracker wrapper that drives a tqdm progress bar from the logged steps (for training)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from medsegdiff.tracking.base import to_scalar

SHOWN = ("train/loss", "val/dice", "train/samples_per_s")


class ProgressTracker:
    """Forward every call to ``inner`` and advance a progress bar to the logged step.

    ``finish`` is forwarded too; :meth:`close` only closes the bar (the caller keeps ``inner``).
    """

    def __init__(self, inner: Any, total: int, *, desc: str = "train", enabled: bool = True) -> None:
        self.inner = inner
        self.bar = tqdm(total=total, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)
        self._post: dict[str, str] = {}
        self.step = 0

    def _advance(self, metrics: Mapping[str, Any], step: int) -> None:
        if step > self.step:
            self.bar.update(step - self.step)
            self.step = step
        for key in SHOWN:
            if key in metrics:
                try:
                    v = float(to_scalar(metrics[key]))
                except (TypeError, ValueError):
                    continue
                if math.isfinite(v):
                    self._post[key.split("/")[-1]] = f"{v:.3g}"
        if self._post:
            self.bar.set_postfix(self._post, refresh=False)

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self.inner.log(metrics, step)
        self._advance(metrics, step)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        self.inner.log_table(name, columns, rows, step)

    def log_images(self, name: str, images: Mapping[str, np.ndarray], step: int) -> None:
        self.inner.log_images(name, images, step)

    def close(self) -> None:
        self.bar.close()

    def finish(self) -> None:
        self.close()
        self.inner.finish()
