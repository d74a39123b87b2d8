"""Probability-threshold calibration on validation cases.

Sweep thresholds over combined probability volumes, pick the one with the best mean volume Dice,
and store it next to the run (``<run_dir>/calibration.json``). ``medsegdiff predict`` uses it when
``inference.use_calibrated_threshold`` is true and it was calibrated for the same settings.

A threshold is only right for the probability maps it was found on, so every calibration is stored
with the settings that make those maps (:func:`calibration_settings`: every ``inference.*`` and
``diffusion.*`` value except :data:`NOT_CALIBRATED`, with the effective respacing and ensemble size;
new config fields join automatically) and the checkpoint step. ``calibration.json`` keeps one
calibration per (settings, step): calibrating under other settings adds one and replaces none.
Prediction uses the one whose settings and step match; when none matches it warns, naming the
differences, and falls back to ``inference.threshold``.

Volume Dice here is the ISLES'24 one: computed on the whole 3-D volume, ``1.0`` when both the
prediction and the reference are empty.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsegdiff.config import to_dict
from medsegdiff.data.cache import settings_hash
from medsegdiff.errors import CheckpointError
from medsegdiff.inference.sampler import sampler_name
from medsegdiff.metrics.isles24 import dice_score
from medsegdiff.utils.io import atomic_write_json

CALIBRATION_FILE = "calibration.json"
CALIBRATION_FORMAT = 2
DEFAULT_THRESHOLDS = np.linspace(0.05, 0.95, 19)
#: ``inference.*`` keys that do not change the combined probability map (not part of the calibration key):
#: the threshold itself, switches, the memory budget, numeric precision, outputs, the uncertainty map.
NOT_CALIBRATED = ("threshold", "calibrate", "use_calibrated_threshold", "batch_size", "precision", "overlays",
                  "uncertainty")
logger = logging.getLogger("medsegdiff.inference")


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
            dices.append(dice_score(pred, gt))
            avds.append(abs(float(pred.sum()) - float(np.asarray(gt, dtype=bool).sum())) * float(vv))
        table.append({"threshold": round(float(thr), 6), "mean_dice": float(np.mean(dices)),
                      "mean_avd_ml": float(np.mean(avds))})
    return pick_best(table), table


def pick_best(table: Sequence[dict[str, float]]) -> float:
    """The threshold of the row with the best ``mean_dice``; ties go to the one closest to 0.5."""
    best = max(table, key=lambda r: (round(r["mean_dice"], 12), -abs(r["threshold"] - 0.5)))
    return float(best["threshold"])


def calibration_settings(cfg: Any, *, respacing: str, members: int) -> dict[str, Any]:
    """The settings a threshold is calibrated for (the calibration key), as a flat sorted dict.

    Every ``diffusion.*`` value (the sampler, eta, ...) and every ``inference.*`` value except
    :data:`NOT_CALIBRATED` (the combination, EMA weights, ...), with ``respacing`` and ``members``
    and ``sampler`` (what sampling really uses) in place of ``diffusion.respacing`` /
    ``inference.respacing`` / ``inference.ensemble`` / ``diffusion.sampler`` / ``inference.sampler``. Fields added to these sections later join the key automatically.

    Args:
        cfg: the prediction config (checkpoint config with the prediction-time overrides).
        respacing: the effective respacing (``""`` for the discriminative baseline).
        members: the effective ensemble size.
    """
    out: dict[str, Any] = {f"diffusion.{k}": v for k, v in to_dict(cfg.diffusion).items()}
    out.update({f"inference.{k}": v for k, v in to_dict(cfg.inference).items() if k not in NOT_CALIBRATED})
    for key in ("diffusion.respacing", "inference.respacing", "inference.ensemble", "diffusion.sampler",
                "inference.sampler"):
        out.pop(key, None)
    out["sampler"] = sampler_name(cfg)  # the sampler that runs: inference.sampler="" means diffusion.sampler
    out["respacing"] = respacing
    out["members"] = int(members)
    return dict(sorted(out.items()))


def settings_key(settings: Mapping[str, Any]) -> str:
    """Short stable id of a settings dict (8 hex digits)."""
    return settings_hash(settings)[:8]


def _differences(have: Mapping[str, Any] | None, want: Mapping[str, Any]) -> str:
    if have is None:
        return "its settings were not recorded (older medsegdiff)"
    keys = [k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
    return ", ".join(f"{k}={have.get(k)!r} vs now {want.get(k)!r}" for k in keys[:6]) or "none"


def load_calibrations(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every calibration stored in a ``calibration.json`` (oldest first; [] when the file is missing).

    A file of the first format (one threshold, no ``settings``) gives one entry with ``settings`` None.

    Raises:
        CheckpointError: the file cannot be read or an entry has no valid threshold.
    """
    path = Path(path)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data["calibrations"] if "calibrations" in data else [dict(data, settings=None)]
        for e in entries:
            e["threshold"] = float(e["threshold"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable calibration file ({err}); delete it or rerun calibration") from None
    for e in entries:
        if not 0.0 < e["threshold"] < 1.0:
            raise CheckpointError(f"{path}: threshold {e['threshold']} is not in (0, 1); delete it or rerun calibration")
    return entries


def save_calibration(
    run_dir: str | os.PathLike[str], threshold: float, table: list[dict[str, float]], *,
    settings: Mapping[str, Any] | None = None, **meta: Any,
) -> Path:
    """Add a calibration to ``<run_dir>/calibration.json`` (written atomically).

    The file keeps one calibration per (``settings``, ``step``): an earlier one with the same settings
    and step is replaced, every other one is kept. ``meta`` (``step``, ``combine``, ``cases``,
    ``checkpoint``...) is stored too.

    Returns:
        The path of ``calibration.json``.

    Raises:
        CheckpointError: the existing file cannot be read.
    """
    path = Path(run_dir) / CALIBRATION_FILE
    entries = load_calibrations(path)
    settings = dict(settings) if settings is not None else None
    entry = {"threshold": float(threshold), "metric": "mean volume dice",
             "key": settings_key(settings) if settings is not None else None, "settings": settings, **meta,
             "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "table": table}
    kept = [e for e in entries if not (e.get("settings") == settings and e.get("step") == meta.get("step"))]
    atomic_write_json(path, {"format_version": CALIBRATION_FORMAT, "calibrations": [*kept, entry]})
    return path


def find_calibration(
    checkpoint: str | os.PathLike[str], ckpt: dict[str, Any] | None = None, *,
    settings: Mapping[str, Any] | None = None,
) -> tuple[float, str] | None:
    """The calibrated threshold for a checkpoint and where it came from, or None.

    Looks in ``calibration.json`` next to the checkpoint, then in the run directory
    (``<run>/checkpoints/x.pt`` -> ``<run>/calibration.json``), then in the checkpoint's own
    ``calibration`` entry (a float or ``{"threshold": float}``). A file's calibration is used only when
    its training ``step`` is the checkpoint's and (when ``settings`` is given) its settings are
    ``settings``; the newest such one wins. A file with calibrations but none that fits is reported
    with a warning naming the differences (the caller then uses ``inference.threshold``).

    Raises:
        CheckpointError: a ``calibration.json`` that cannot be read or has no valid threshold.
    """
    ckpt_path = Path(checkpoint)
    if ckpt_path.is_dir():  # a run directory
        cands = [ckpt_path / CALIBRATION_FILE]
    else:
        cands = [ckpt_path.parent / CALIBRATION_FILE, ckpt_path.parent.parent / CALIBRATION_FILE]
    ckpt_step = (ckpt or {}).get("step")
    for cand in cands:
        entries = load_calibrations(cand)
        if not entries:
            continue
        fresh = [e for e in entries if e.get("step") is None or ckpt_step is None or int(e["step"]) == int(ckpt_step)]
        fits = [e for e in fresh if settings is None or e.get("settings") == dict(settings)]
        if fits:
            return fits[-1]["threshold"], str(cand)
        if not fresh:
            logger.warning("%s: calibrated for step %s but the checkpoint is step %s; ignoring it (rerun "
                           "`medsegdiff calibrate`)", cand, entries[-1].get("step"), ckpt_step)
        else:
            logger.warning("%s: no calibration for these settings (%d stored; differences to the newest: %s); "
                           "NOT using a calibrated threshold: run `medsegdiff calibrate` with these settings, or "
                           "set inference.threshold", cand, len(fresh), _differences(fresh[-1].get("settings"),
                                                                                    settings or {}))
    entry = (ckpt or {}).get("calibration")
    if isinstance(entry, dict):
        entry = entry.get("threshold")
    if isinstance(entry, (int, float)) and not isinstance(entry, bool) and 0.0 < float(entry) < 1.0:
        return float(entry), f"{ckpt_path} (embedded)"
    return None


__all__ = ["CALIBRATION_FILE", "NOT_CALIBRATED", "calibrate_threshold", "calibration_settings", "find_calibration",
           "load_calibrations", "pick_best", "save_calibration", "settings_key"]
