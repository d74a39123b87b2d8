"""The baseline stage: the official Tmax > 9 s baseline on the run's held-out cases."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medsegdiff.baselines.tmax import tmax_baseline
from medsegdiff.config import ExperimentConfig
from medsegdiff.stages.layout import RunDir
from medsegdiff.utils.console import say


def baseline(cfg: ExperimentConfig, run: RunDir, cases: Sequence[str], *, progress: bool = True) -> list[Path]:
    """Tmax > ``evaluation.tmax_threshold`` masks of ``cases`` from ``data.root`` into ``run.baseline_predictions``.

    Raises:
        DataError: unreadable data or a case without Tmax.
    """
    ev = cfg.evaluation
    say(f"[evaluate] Tmax > {ev.tmax_threshold:g} s baseline on the same {len(cases)} cases")
    return tmax_baseline(Path(cfg.data.root), run.baseline_predictions, threshold=ev.tmax_threshold, cases=list(cases),
                         progress=progress)
