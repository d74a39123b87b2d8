"""Tracking section (Weights & Biases; metrics.jsonl is always written)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from medsegdiff.config.base import option


@dataclass
class TrackingConfig:
    backend: Literal["wandb", "none"] = option("wandb")
    mode: Literal["offline", "online", "auto"] = option(
        "offline", doc="offline works with no network; auto = online when logged in"
    )
    project: str = option("medsegdiff")
    entity: str = option("")
    group: str = option("")
    tags: list[str] = option([])
    name: str = option("", doc="run name; empty = the run directory name")
    log_images: bool = option(True)
