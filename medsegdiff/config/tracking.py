"""Tracking section (Weights & Biases; metrics.jsonl is always written)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medsegdiff.config.base import option


@dataclass
class TrackingConfig:
    """Experiment tracking. ``metrics.jsonl`` in the run directory is written whatever this says."""

    backend: Literal["wandb", "none"] = option("wandb", doc="wandb = also log to Weights & Biases; none = metrics.jsonl only")
    mode: Literal["offline", "online", "auto"] = option(
        "offline", doc="offline works with no network (wandb sync later); auto = online when logged in"
    )
    project: str = option("medsegdiff")
    entity: str = option("", doc="W&B team or user; empty = your default entity")
    group: str = option("", doc="W&B group (e.g. a sweep name)")
    tags: list[str] = option([])
    name: str = option("", doc="run name; empty = the run directory name")
    log_images: bool = option(True, doc="log overlay images (PNG in the run directory + W&B)")
    init_timeout: float = option(60.0, gt=0.0, doc="seconds W&B may take to start before it is skipped")
