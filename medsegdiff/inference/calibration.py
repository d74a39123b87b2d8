"""Probability-threshold calibration on validation cases.

Sweep thresholds over combined probability volumes, pick the one with the best mean volume Dice,
and store it next to the run (``<run_dir>/calibration.json``). ``medsegdiff predict`` uses it when
present and ``inference.use_calibrated_threshold`` is true.

Volume Dice here is the ISLES'24 one: computed on the whole 3-D volume, ``1.0`` when both the
prediction and the reference are empty.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsegdiff.errors import CheckpointError
from medsegdiff.utils.io import atomic_write_json

CALIBRATION_FILE = "calibration.json"
DEFAULT_THRESHOLDS = np.linspace(0.05, 0.95, 19)


def volume_dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """``2 |P & G| / (|P| + |G|)`` over the whole volume; 1.0 when both are empty."""
    p, g = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    denom = int(p.sum()) + int(g.sum())
    if denom == 0:
        return 1.0
    return 2.0 * float(np.logical_and(p, g).sum()) / denom


def calibrate_threshold(
    probs_list: Sequence[np.ndarray],
    gts_list: Sequence[np.ndarray],
    voxel_volumes: Sequence[float],
    thresholds: Sequence[float] | np.ndarray = DEFAULT_THRESHOLDS,
) -> tuple[float, list[dict[str, float]]]:
    """Pick the threshold with the best mean volume Dice over cases.

    Args:
        probs_list: per case, the combined probability volume ``(Z, Y, X)`` (native grid).
        gts_list: per case, the reference mask, same shape.
        voxel_volumes: per case, voxel volume in mL (for the absolute volume difference column).
        thresholds: candidates; the mask is ``prob >= threshold``.

    Returns:
        ``(best_threshold, table)``; ``table`` has one row per threshold with ``threshold``,
        ``mean_dice``, ``mean_avd_ml``. Ties in mean Dice go to the threshold closest to 0.5.

    Raises:
        ValueError: empty or mismatched inputs (programming errors).
    """
    if not probs_list or len(probs_list) != len(gts_list) or len(gts_list) != len(voxel_volumes):
        raise ValueError("calibrate_threshold needs the same non-zero number of probs, gts and voxel volumes")
    table: list[dict[str, float]] = []
    for thr in np.asarray(thresholds, dtype=np.float64):
        dices, avds = [], []
        for prob, gt, vv in zip(probs_list, gts_list, voxel_volumes):
            if np.shape(prob) != np.shape(gt):
                raise ValueError(f"prob {np.shape(prob)} and gt {np.shape(gt)} shapes differ")
            pred = np.asarray(prob) >= thr
            dices.append(volume_dice(pred, gt))
            avds.append(abs(float(pred.sum()) - float(np.asarray(gt, dtype=bool).sum())) * float(vv))
        table.append({"threshold": round(float(thr), 6), "mean_dice": float(np.mean(dices)),
                      "mean_avd_ml": float(np.mean(avds))})
    return pick_best(table), table


def pick_best(table: Sequence[dict[str, float]]) -> float:
    """The threshold of the row with the best ``mean_dice``; ties go to the one closest to 0.5."""
    best = max(table, key=lambda r: (round(r["mean_dice"], 12), -abs(r["threshold"] - 0.5)))
    return float(best["threshold"])


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
    from medsegdiff.inference import ensemble as ens
    from medsegdiff.inference.export import to_native
    from medsegdiff.inference.predict import Predictor, resolve_sources

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
    path = save_calibration(run_dir, best, table, combine=method, cases=ids, checkpoint=str(ckpt_path),
                            step=pred.ckpt.get("step"), respacing=pred.respacing, members=pred.members_per_case)
    return best, table, path


def save_calibration(
    run_dir: str | os.PathLike[str], threshold: float, table: list[dict[str, float]], **meta: Any
) -> Path:
    """Write ``<run_dir>/calibration.json`` atomically; ``meta`` (e.g. combine, cases) is stored too."""
    path = Path(run_dir) / CALIBRATION_FILE
    atomic_write_json(path, {"threshold": float(threshold), "metric": "mean volume dice", **meta, "table": table})
    return path


def find_calibration(checkpoint: str | os.PathLike[str], ckpt: dict[str, Any] | None = None) -> tuple[float, str] | None:
    """The calibrated threshold for a checkpoint and where it came from, or None.

    Looks in ``calibration.json`` next to the checkpoint, then in the run directory
    (``<run>/checkpoints/x.pt`` -> ``<run>/calibration.json``), then in the checkpoint's own
    ``calibration`` entry (a float or ``{"threshold": float}``). A file that records another
    training ``step`` than the checkpoint's is ignored with a warning (stale calibration).

    Raises:
        CheckpointError: a ``calibration.json`` that cannot be read or has no valid threshold.
    """
    ckpt_path = Path(checkpoint)
    if ckpt_path.is_dir():  # a run directory
        cands = [ckpt_path / CALIBRATION_FILE]
    else:
        cands = [ckpt_path.parent / CALIBRATION_FILE, ckpt_path.parent.parent / CALIBRATION_FILE]
    for cand in cands:
        if cand.is_file():
            try:
                data = json.loads(cand.read_text(encoding="utf-8"))
                thr = float(data["threshold"])
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise CheckpointError(
                    f"{cand}: unreadable calibration file ({err}); delete it or rerun calibration"
                ) from None
            if not 0.0 < thr < 1.0:
                raise CheckpointError(f"{cand}: threshold {thr} is not in (0, 1); delete it or rerun calibration")
            step, ckpt_step = data.get("step"), (ckpt or {}).get("step")
            if step is not None and ckpt_step is not None and int(step) != int(ckpt_step):
                warnings.warn(f"{cand}: calibrated for step {step} but the checkpoint is step {ckpt_step}; "
                              "ignoring it (rerun calibration)", stacklevel=2)
                continue
            return thr, str(cand)
    entry = (ckpt or {}).get("calibration")
    if isinstance(entry, dict):
        entry = entry.get("threshold")
    if isinstance(entry, (int, float)) and not isinstance(entry, bool) and 0.0 < float(entry) < 1.0:
        return float(entry), f"{ckpt_path} (embedded)"
    return None


__all__ = ["CALIBRATION_FILE", "calibrate_checkpoint", "calibrate_threshold", "pick_best", "find_calibration", "save_calibration", "volume_dice"]


def validation_cases(run_dir: str | os.PathLike[str]) -> list[str] | None:
    """The validation case ids of a run (``<run>/splits.json``), or None when it has no split."""
    from medsegdiff.data.splits import Splits

    path = Path(run_dir) / "splits.json"
    if not path.is_file():
        return None
    return list(Splits.load(path).val) or None
