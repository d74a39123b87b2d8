"""The calibrate stage: sample the validation cases, sweep the probability threshold, store it in the run.

The threshold sweep itself is :func:`medsegdiff.inference.calibration.calibrate_threshold`;
``<run>/calibration.json`` is written by :func:`~medsegdiff.inference.calibration.save_calibration`
and applied by ``predict`` (:func:`~medsegdiff.inference.calibration.find_calibration`) when its
settings (sampler, respacing, ensemble size, combination...) are the ones predict uses; calibrations
made under other settings are kept beside it, never replaced.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medsegdiff.config import ExperimentConfig, to_dict
from medsegdiff.data.splits import Splits
from medsegdiff.inference import ensemble as ens
from medsegdiff.inference.calibration import (
    CALIBRATION_FILE,
    DEFAULT_THRESHOLDS,
    calibrate_threshold,
    load_calibrations,
    pick_best,
    save_calibration,
)
from medsegdiff.inference.export import to_native
from medsegdiff.inference.predict import Predictor, resolve_sources
from medsegdiff.stages.layout import RunDir, as_run_dir
from medsegdiff.utils.console import say


def calibrate_checkpoint(
    checkpoint: str | os.PathLike[str],
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    cases: Sequence[str] | None = None,
    *,
    overrides: Sequence[str] = (),
    run_dir: str | os.PathLike[str] | None = None,
    thresholds: Sequence[float] | np.ndarray = DEFAULT_THRESHOLDS,
    progress: bool = True,
) -> tuple[float, list[dict[str, float]], Path]:
    """Sample validation cases with ``checkpoint``, sweep thresholds, save ``calibration.json``.

    The sweep is on the native grid against ``CachedCase.native_mask()``, with the same combination
    (``inference.combine``) predict uses: for ``mean`` the probability is thresholded directly; for
    ``vote`` and ``staple`` (whose combination depends on the member threshold) the members are
    recombined for every candidate threshold.

    Args:
        checkpoint: ``.pt`` file or run directory.
        data: a prepared cache (or raw data; prepared into ``<run_dir>/calibration_cache``).
        cases: validation case ids (default: every case of ``data``).
        overrides: prediction-time overrides (as for ``predict``).
        run_dir: where ``calibration.json`` goes; default: the checkpoint's run directory.
        thresholds: candidate thresholds.
        progress: progress bars.

    Returns:
        ``(best_threshold, table, path of calibration.json)``.

    Raises:
        CheckpointError, ConfigError, DataError: as :func:`medsegdiff.inference.predict.predict`.
    """
    ckpt_path = Path(checkpoint)
    if run_dir is None:
        run_dir = ckpt_path if ckpt_path.is_dir() else ckpt_path.parent.parent
    run_dir = Path(run_dir)
    pred = Predictor.load(ckpt_path, [*overrides, "inference.use_calibrated_threshold=false"])
    method = pred.cfg.inference.combine
    sources = resolve_sources(data, run_dir / "calibration_cache", pred.cfg, cases, progress, stage="calibrate")
    members, geos, gts, vvs, ids = [], [], [], [], []
    for src in sources:
        for cid in src.case_ids:
            case = src.manifest.case(cid)
            members.append(pred.members(src.manifest, cid, progress=progress))
            geos.append((case.cache_geometry, case.native_geometry))
            gts.append(case.native_mask())
            vvs.append(case.native_geometry.voxel_volume_ml)
            ids.append(cid)
    if method == "mean":
        probs = [to_native(ens.combine_mean(m), cg, ng) for m, (cg, ng) in zip(members, geos)]
        best, table = calibrate_threshold(probs, gts, vvs, thresholds)
    else:
        table = []
        for thr in np.asarray(thresholds, dtype=np.float64):
            masks = [ens.binarize(to_native(ens.combine(m, method, float(thr)), cg, ng), float(thr), method)
                     .astype(np.float32) for m, (cg, ng) in zip(members, geos)]
            table.append(calibrate_threshold(masks, gts, vvs, [thr])[1][0])
        best = pick_best(table)
    settings, step = pred.calibration_settings, pred.ckpt.get("step")
    before = load_calibrations(run_dir / CALIBRATION_FILE)
    path = save_calibration(run_dir, best, table, settings=settings, combine=method, cases=ids,
                            checkpoint=str(ckpt_path), step=step, respacing=pred.respacing,
                            members=pred.members_per_case)
    same = sum(e.get("settings") == settings and e.get("step") == step for e in before)
    if same:
        say(f"[calibrate] replaced the earlier calibration made with the same settings at step {step}")
    if len(before) - same:
        say(f"[calibrate] kept {len(before) - same} calibration(s) made under other settings or steps in {path}")
    return best, table, path


def validation_cases(run_dir: str | os.PathLike[str]) -> list[str] | None:
    """The validation case ids of a run (``<run>/splits.json``), or None when it has no split."""
    path = as_run_dir(run_dir).splits
    if not path.is_file():
        return None
    return list(Splits.load(path).val) or None


def inference_overrides(cfg: ExperimentConfig) -> list[str]:
    """The run's current inference settings as overrides (they may differ from the checkpoint's)."""
    return [f"inference.{k}={json.dumps(v)}" for k, v in to_dict(cfg.inference).items()]


def calibrate(cfg: ExperimentConfig, run: RunDir, checkpoint: Path, *, progress: bool = True) -> float | None:
    """Calibrate ``checkpoint`` on the run's validation cases (``data.cache_dir``) with the run's inference settings.

    Returns:
        The threshold written to ``<run>/calibration.json``, or None without validation cases.

    Raises:
        CheckpointError, ConfigError, DataError: as :func:`calibrate_checkpoint`.
    """
    cases = validation_cases(run.root)
    if not cases:
        say("[calibrate] no validation cases; keeping inference.threshold")
        return None
    best, _, path = calibrate_checkpoint(checkpoint, Path(cfg.data.cache_dir), cases,
                                         overrides=inference_overrides(cfg), run_dir=run.root, progress=progress)
    say(f"[calibrate] threshold {best:.2f} from {len(cases)} validation cases -> {path}")
    return best
