"""The evaluate stage: the model's predictions and the Tmax baseline scored on the same held-out cases."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medsegdiff.baselines.references import available_references, write_references
from medsegdiff.config import ExperimentConfig
from medsegdiff.errors import DataError
from medsegdiff.evaluation.evaluate import evaluate as evaluate_dir
from medsegdiff.stages.baseline import baseline
from medsegdiff.stages.layout import RunDir
from medsegdiff.stages.predict import test_cases
from medsegdiff.utils.console import say
from medsegdiff.utils.io import atomic_write_json
from medsegdiff.utils.jsonable import json_safe


def summary_of(report: Mapping[str, Any]) -> dict[str, Any]:
    """Mean of every metric of an evaluation report (``report["metrics"][key]["mean"]``)."""
    metrics = report.get("metrics", report) if isinstance(report, Mapping) else {}
    out = {}
    for k, v in metrics.items():
        if isinstance(v, Mapping) and "mean" in v:
            out[k] = v["mean"]
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
    return out


def evaluate_references(gt: Path, cache: Path, out_root: Path, cases: Sequence[str], kw: Mapping[str, Any], *,
                        progress: bool = True) -> dict[str, dict[str, Any]]:
    """Score the CBF rule, the resolution ceiling and (synthetic data) the acute core on ``cases``.

    A missing map skips a rule with a message; real data has no acute cores, so that reference is left out.
    """
    out: dict[str, dict[str, Any]] = {}
    for name in available_references(gt, ("cbf_rule", "ceiling", "acute_core")):
        try:
            folder = write_references(gt, cache, out_root, cases=cases, names=[name], progress=progress)[name]
        except DataError as err:
            say(f"[evaluate] reference {name} skipped: {err}")
            continue
        out[name] = evaluate_dir(folder, gt, folder.parent / "evaluation", **{**kw, "progress": progress})
    return out


def evaluate(cfg: ExperimentConfig, run: RunDir, *, progress: bool = True) -> dict[str, Any]:
    """Score ``run.predictions`` and the Tmax baseline (:func:`~medsegdiff.stages.baseline.baseline`) on the test cases.

    The reference masks are read from ``data.root`` (native grids, as the challenge scores). The
    comparison is saved to ``run.results`` (strict JSON).

    Returns:
        ``{"cases", "iou_threshold", "model", "baseline_tmax", "references", "per_case", "paths"}`` (summaries are
        metric means, see :func:`summary_of`).

    Raises:
        DataError: no split / empty test split, unreadable references.
    """
    cases = test_cases(run.splits)
    gt = Path(cfg.data.root)
    ev = cfg.evaluation
    kw: dict[str, Any] = dict(iou_threshold=ev.iou_threshold, hd95=ev.hd95, cases=cases, progress=progress,
                              connectivity=ev.connectivity)
    say(f"[evaluate] model predictions in {run.predictions}")
    model = evaluate_dir(run.predictions, gt, run.evaluation, **kw)
    baseline(cfg, run, cases, progress=progress)
    base = evaluate_dir(run.baseline_predictions, gt, run.baseline_evaluation, **kw)
    refs = evaluate_references(gt, Path(cfg.data.cache_dir), run.root / "references", cases, kw, progress=progress)
    results = {
        "cases": cases,
        "iou_threshold": ev.iou_threshold,
        "model": summary_of(model),
        "baseline_tmax": summary_of(base),
        "references": {name: summary_of(r) for name, r in refs.items()},
        "per_case": {"model": model.get("cases", []), "baseline_tmax": base.get("cases", []),
                     **{name: r.get("cases", []) for name, r in refs.items()}},
        "paths": {
            "run_dir": str(run.root),
            "predictions": str(run.predictions),
            "evaluation": str(run.evaluation),
            "baseline": str(run.baseline_predictions.parent),
        },
    }
    atomic_write_json(run.results, json_safe(results))
    return results
