"""The tracker interface and the composition/fail-safe wrappers.

A tracker receives scalar metrics, small tables and images, each tagged with an optimisation step.
Tracking must never stop training: :class:`SafeTracker` turns any exception of a wrapped tracker
into ONE ``logging.warning`` and then ignores that tracker for the rest of the run.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

logger = logging.getLogger("medsegdiff.tracking")


@runtime_checkable
class Tracker(Protocol):
    """What the trainer, the pipeline and the evaluation log through."""

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalar metrics (numbers, 0-d arrays/tensors) at ``step``."""

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        """Log a small table (e.g. per-case metrics)."""

    def log_images(self, name: str, images: Mapping[str, np.ndarray], step: int) -> None:
        """Log images: ``(H, W)`` grey or ``(H, W, 3)`` RGB, uint8 or float in [0, 1]."""

    def finish(self) -> None:
        """Flush and close; safe to call twice."""


class NullTracker:
    """Logs nothing (non-zero ranks of a distributed run)."""

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        pass

    def log_images(self, name: str, images: Mapping[str, np.ndarray], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


def to_scalar(value: Any) -> Any:
    """Plain Python number/str/bool/None for a metric value (tensors and numpy scalars included).

    Raises:
        TypeError: for values with more than one element.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)  # torch.Tensor, numpy array / scalar
    if callable(item):
        size = getattr(value, "numel", None)
        n = size() if callable(size) else getattr(value, "size", 1)
        if n != 1:
            raise TypeError(f"metric value with {n} elements; log scalars only")
        return to_scalar(item())
    raise TypeError(f"metric value of type {type(value).__name__} is not a scalar")


def finite_or_none(value: Any) -> Any:
    """``None`` for NaN/inf floats (JSON has no NaN), the value otherwise."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class SafeTracker:
    """Wrap a tracker so that its failures are reported once and never propagate."""

    def __init__(self, inner: Any, label: str) -> None:
        self.inner = inner
        self.label = label
        self.failed = False

    def _call(self, method: str, *args: Any) -> None:
        if self.failed:
            return
        try:
            getattr(self.inner, method)(*args)
        except Exception as err:  # noqa: BLE001 - tracking must never stop a run
            self.failed = True
            logger.warning(
                "%s tracking failed in %s (%s: %s); it is switched off for this run, "
                "metrics.jsonl in the run directory keeps everything",
                self.label, method, type(err).__name__, err,
            )

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        self._call("log", metrics, step)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        self._call("log_table", name, columns, rows, step)

    def log_images(self, name: str, images: Mapping[str, np.ndarray], step: int) -> None:
        self._call("log_images", name, images, step)

    def finish(self) -> None:
        if self.failed:
            # still try to close resources quietly
            try:
                self.inner.finish()
            except Exception:  # noqa: BLE001
                pass
            return
        self._call("finish")


class MultiTracker:
    """Send every call to several trackers (each already fail-safe)."""

    def __init__(self, trackers: Sequence[Any]) -> None:
        self.trackers = list(trackers)
        self._finished = False

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        for t in self.trackers:
            t.log(metrics, step)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        for t in self.trackers:
            t.log_table(name, columns, rows, step)

    def log_images(self, name: str, images: Mapping[str, np.ndarray], step: int) -> None:
        for t in self.trackers:
            t.log_images(name, images, step)

    def finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        for t in self.trackers:
            t.finish()

    def __enter__(self) -> MultiTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()
