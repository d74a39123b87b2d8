"""Experiment tracking: ``metrics.jsonl`` always, plus Weights & Biases (offline by default).

``make_tracker(cfg, run_dir)`` is the one entry point. The returned tracker never raises out of
``log``/``log_table``/``log_images``/``finish``: a backend that cannot start or fails mid-run is
reported once with ``logging.warning`` and switched off; ``metrics.jsonl`` keeps everything.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from medsegdiff.config import ExperimentConfig
from medsegdiff.tracking.base import MultiTracker, NullTracker, SafeTracker, Tracker
from medsegdiff.tracking.jsonl import JsonlTracker, read_metrics
from medsegdiff.tracking.wandb_tracker import WandbTracker

logger = logging.getLogger("medsegdiff.tracking")


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def make_tracker(cfg: ExperimentConfig, run_dir: str | os.PathLike[str], *, wandb_module: Any = None) -> Tracker:
    """The tracker for a run: JSON lines in ``run_dir/metrics.jsonl`` + W&B unless ``backend: none``.

    Only rank 0 of a distributed run logs; other ranks get a :class:`NullTracker`.

    Args:
        cfg: the resolved experiment config (logged to W&B as the run config).
        run_dir: the run directory; the W&B offline run is written under ``run_dir/wandb``.
        wandb_module: a stand-in for the ``wandb`` module (tests).
    """
    if _rank() != 0:
        return NullTracker()
    run_dir = Path(run_dir)
    trackers: list[Any] = [SafeTracker(JsonlTracker(run_dir, images=cfg.tracking.log_images), "metrics.jsonl")]
    if cfg.tracking.backend == "wandb":
        t0 = time.perf_counter()
        try:
            wb = WandbTracker(cfg, run_dir, module=wandb_module)
        except Exception as err:  # noqa: BLE001 - tracking must never stop a run
            logger.warning(
                "Weights & Biases could not start (%s: %s); going on with metrics.jsonl only "
                "(set tracking.backend=none to silence this)", type(err).__name__, err,
            )
        else:
            logger.info("W&B %s run started in %.1f s", wb.mode, time.perf_counter() - t0)
            trackers.append(SafeTracker(wb, "Weights & Biases"))
    return MultiTracker(trackers)


def wandb_location(tracker: Tracker) -> tuple[str, str | None] | None:
    """(mode, where) of the W&B run inside ``tracker``: the offline folder, or the run URL online.

    None when W&B is off or has failed.
    """
    for t in getattr(tracker, "trackers", []):
        inner = getattr(t, "inner", None)
        if inner is not None and hasattr(inner, "offline_dir") and not getattr(t, "failed", False):
            offline = inner.offline_dir
            if offline is not None:
                return inner.mode, str(offline)
            return inner.mode, getattr(inner.run, "url", None)
    return None


__all__ = [
    "JsonlTracker",
    "MultiTracker",
    "NullTracker",
    "SafeTracker",
    "Tracker",
    "make_tracker",
    "read_metrics",
    "wandb_location",
]
