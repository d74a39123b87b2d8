"""``metrics.jsonl``: every logged value as one JSON line, always written, whatever the tracker.

Each line holds ``step`` and ``time`` (Unix seconds) and either the metrics themselves, or
``table``/``columns``/``rows``, or ``images`` with the PNG files written under ``images/``.
Each line is flushed as it is written, so a killed run keeps everything logged before. When the
tracker finishes, the curves are drawn into ``learning_curves.png`` (:mod:`.curves`).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsegdiff.tracking.base import finite_or_none, to_scalar
from medsegdiff.tracking.curves import CURVES_FILE, write_learning_curves
from medsegdiff.tracking.png import write_png

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl`` file (a torn last line from a crash is ignored)."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def truncate_metrics(path: str | os.PathLike[str], step: int) -> int:
    """Drop every record of ``metrics.jsonl`` logged after ``step`` (and torn lines), in place.

    Used when a run resumes from its step-``step`` checkpoint: what was logged between that
    checkpoint and the crash is logged again by the resumed run, so keeping it would duplicate those
    steps. The file is rewritten in place (not replaced), so a tracker holding it open for appending
    keeps writing to it.

    Returns:
        The number of lines removed (0 when the file does not exist).
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, removed = [], 0
    with open(path, "r+", encoding="utf-8") as fh:
        for line in fh.read().splitlines(keepends=True):
            try:
                record = json.loads(line)
                keep = line.endswith("\n") and int(record.get("step", 0)) <= step
            except (json.JSONDecodeError, TypeError, ValueError, AttributeError):
                keep = False
            if keep:
                kept.append(line)
            elif line.strip():
                removed += 1
        if removed:
            fh.seek(0)
            fh.write("".join(kept))
            fh.truncate()
            fh.flush()
            os.fsync(fh.fileno())
    return removed


class JsonlTracker:
    """Append-only JSON-lines log in the run directory (``run_dir/metrics.jsonl``)."""

    def __init__(self, run_dir: str | os.PathLike[str], *, images: bool = True, curves: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.curves = curves
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.images = images
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in finish()

    def _write(self, record: dict[str, Any]) -> None:
        if self._fh is None:
            raise RuntimeError(f"{self.path}: tracker already finished")
        self._fh.write(json.dumps(record, default=str) + "\n")
        self._fh.flush()

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        record: dict[str, Any] = {"step": int(step), "time": round(time.time(), 3)}
        for k, v in metrics.items():
            record[str(k)] = finite_or_none(to_scalar(v))
        self._write(record)

    def log_table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int) -> None:
        clean = [[finite_or_none(to_scalar(v)) if not isinstance(v, str) else v for v in r] for r in rows]
        self._write({"step": int(step), "time": round(time.time(), 3), "table": name,
                     "columns": list(columns), "rows": clean})

    def log_images(self, name: str, images: Mapping[str, np.ndarray], step: int) -> None:
        if not self.images:
            return
        files = {}
        for key, img in images.items():
            rel = Path("images") / _SAFE.sub("_", name) / f"step_{int(step):08d}_{_SAFE.sub('_', key)}.png"
            write_png(self.run_dir / rel, img)
            files[key] = rel.as_posix()
        self._write({"step": int(step), "time": round(time.time(), 3), "images": name, "files": files})

    def finish(self) -> None:
        """Close the file and draw ``learning_curves.png`` next to it (when there is any curve)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            if self.curves:
                write_learning_curves(read_metrics(self.path), self.run_dir / CURVES_FILE)
