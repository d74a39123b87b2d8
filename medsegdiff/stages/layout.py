"""The layout of a run directory: the paths every stage reads and writes (see :mod:`medsegdiff.pipeline.rundir`).

Naming, creating and describing run directories is the pipeline's job; the stages only need where
things go inside one.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    config = property(lambda self: self.root / "config.yaml")
    meta = property(lambda self: self.root / "meta.json")
    splits = property(lambda self: self.root / "splits.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    logs = property(lambda self: self.root / "logs")
    checkpoints = property(lambda self: self.root / "checkpoints")
    predictions = property(lambda self: self.root / "predictions")
    evaluation = property(lambda self: self.root / "evaluation")
    baseline_predictions = property(lambda self: self.root / "baseline" / "predictions")
    baseline_evaluation = property(lambda self: self.root / "baseline" / "evaluation")
    results = property(lambda self: self.root / "results.json")
    wandb = property(lambda self: self.root / "wandb")

    def make(self) -> RunDir:
        for d in (self.root, self.logs, self.checkpoints):
            d.mkdir(parents=True, exist_ok=True)
        return self


def as_run_dir(run: RunDir | str | os.PathLike[str]) -> RunDir:
    """``run`` as a :class:`RunDir` (a path is taken as the run directory's root)."""
    return run if isinstance(run, RunDir) else RunDir(Path(run))
