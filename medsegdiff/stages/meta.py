"""``meta.json`` of a run directory: read and update it, and whether its training finished.

The pipeline writes the provenance (:func:`medsegdiff.pipeline.rundir.collect_meta`); the train stage
records the training status under ``"training"``: ``{"finished": bool, "step", "steps", "stopped_by",
"updated"}``. ``finished`` is written ``false`` when training starts and ``true`` when it ends
normally (all ``train.steps`` or the time budget), so a run killed mid-training stays unfinished.
Predicting or evaluating an unfinished run is refused unless asked for (``--allow-unfinished``):
:func:`require_finished`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from medsegdiff.errors import CheckpointError
from medsegdiff.stages.layout import RunDir, as_run_dir
from medsegdiff.utils.io import atomic_write_json


def read_meta(run: RunDir | str | os.PathLike[str]) -> dict[str, Any]:
    """The run's ``meta.json`` (``{}`` when missing or unreadable)."""
    try:
        data = json.loads(as_run_dir(run).meta.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def update_meta(run: RunDir | str | os.PathLike[str], **fields: Any) -> dict[str, Any]:
    """Merge ``fields`` into ``meta.json`` (written atomically) and return the new content."""
    rd = as_run_dir(run)
    meta = read_meta(rd)
    meta.update(fields)
    atomic_write_json(rd.meta, meta)
    return meta


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def record_training(run: RunDir | str | os.PathLike[str], *, finished: bool, step: int, steps: int,
                    stopped_by: str | None = None) -> None:
    """Write the training status (``meta.json["training"]``) of the run."""
    update_meta(run, training={"finished": bool(finished), "step": int(step), "steps": int(steps),
                               "stopped_by": stopped_by, "updated": now_iso()})


def training_status(run: RunDir | str | os.PathLike[str]) -> dict[str, Any] | None:
    """``meta.json["training"]`` of the run, or None when it records no training."""
    status = read_meta(run).get("training")
    return status if isinstance(status, dict) else None


def run_of_checkpoint(checkpoint: str | os.PathLike[str]) -> Path | None:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/x.pt`` or ``<run>``), or None."""
    path = Path(checkpoint)
    root = path if path.is_dir() else path.parent.parent
    return root if (root / "meta.json").is_file() else None


def run_containing(path: str | os.PathLike[str]) -> Path | None:
    """The run directory ``path`` is (or is directly inside, e.g. ``<run>/predictions``), or None."""
    path = Path(path)
    for cand in (path, path.parent):
        if (cand / "meta.json").is_file() and (cand / "config.yaml").is_file():
            return cand
    return None


def run_of_predictions(pred_dir: str | os.PathLike[str]) -> Path | None:
    """The run of the checkpoint that made ``pred_dir`` (its ``predict.json``), or None."""
    try:
        data = json.loads((Path(pred_dir) / "predict.json").read_text(encoding="utf-8"))
        return run_of_checkpoint(data["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def require_finished(run: RunDir | str | os.PathLike[str] | None, *, allow_unfinished: bool = False,
                     what: str = "predict") -> dict[str, Any] | None:
    """Refuse to use a run whose training did not finish, unless ``allow_unfinished``.

    A run that records no training status (older runs, a checkpoint outside a run directory) passes.

    Returns:
        The training status (None when none is recorded).

    Raises:
        CheckpointError: ``meta.json`` says training did not finish and ``allow_unfinished`` is false.
    """
    if run is None:
        return None
    rd = as_run_dir(run)
    status = training_status(rd)
    if status is None or status.get("finished", True) or allow_unfinished:
        return status
    raise CheckpointError(
        f"{rd.root}: training did not finish (step {status.get('step')} of {status.get('steps')}, "
        f"meta.json training.finished=false); continue it with --resume, or pass --allow-unfinished "
        f"to {what} with its checkpoint anyway"
    )
