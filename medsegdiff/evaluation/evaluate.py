"""Score a folder of predicted masks against ISLES'24 references (``medsegdiff evaluate``).

Predictions are files named by case id, ``sub-strokeNNNN.nii.gz`` (also ``.nii`` / ``.mha``), on
the reference grid (each patient's native NCCT grid). The reference is either an ISLES'24 data root
(either release layout; masks found by :func:`medsegdiff.data.discovery.discover_cases`) or a
folder of reference masks named like the predictions.

Every reference case is scored with :func:`medsegdiff.metrics.isles24.case_metrics`; a missing
prediction is scored as an empty mask, listed in the summary and reported on stderr. Outputs in
``out_dir`` (written atomically):

* ``metrics.csv``: one row per case (``case_id``, ``missing_prediction``, then every metric; the
  uncertainty metrics of :mod:`medsegdiff.metrics.uncertainty` (ECE, Brier, ensemble gain,
  member Dice, pairwise Dice, GED, uncertainty AUROC) as extra columns when the prediction folder
  has ``<case>_members.npz``, ``<case>_prob.nii.gz`` and ``<case>_uncertainty.nii.gz``, as
  ``medsegdiff predict`` writes for diffusion models; NaN for cases without them).
* ``summary.json``: mean / std / median / n per metric, number of cases, missing and extra
  predictions, IoU threshold and connectivity.
* ``volume_scatter.png``: predicted vs reference lesion volume (mL) with labelled axes, both from
  0 to the ``volume_scatter_max_ml`` given in the summary, the identity line, and a legend for
  scored cases and missing predictions.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from medsegdiff.data.discovery import discover_cases
from medsegdiff.data.loading import read_image
from medsegdiff.errors import DataError
from medsegdiff.inference.members import members_path, read_members
from medsegdiff.metrics.isles24 import METRIC_KEYS, OFFICIAL_METRICS, case_metrics, summarize
from medsegdiff.metrics.uncertainty import UNCERTAINTY_KEYS, uncertainty_metrics
from medsegdiff.utils.io import atomic_write_json, atomic_write_text
from medsegdiff.utils.jsonable import json_safe
from medsegdiff.utils.plotting import PREDICTION_COLOR, REFERENCE_COLOR, new_figure, save_png

logger = logging.getLogger(__name__)

CASE_FILE = re.compile(r"^(sub-stroke\d+)\.(nii\.gz|nii|mha)$")
GRID_TOLERANCE = 1e-3
CSV_COLUMNS = ("case_id", "missing_prediction", *METRIC_KEYS)


# ---------------------------------------------------------------------------------------- files


def _case_files(folder: Path, what: str) -> dict[str, Path]:
    """``{case_id: path}`` for files named ``sub-strokeNNNN.<nii.gz|nii|mha>`` directly in ``folder``."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        m = CASE_FILE.match(path.name)
        if not m or not path.is_file():
            continue
        case_id = m.group(1)
        if case_id in found:
            raise DataError(
                f"{what} folder {folder}: two files for {case_id} ({found[case_id].name}, {path.name}); "
                "keep one"
            )
        found[case_id] = path
    return found


def find_predictions(pred_dir: str | Path) -> dict[str, Path]:
    """Prediction files in ``pred_dir`` keyed by case id.

    Raises:
        DataError: the folder does not exist, holds no ``sub-strokeNNNN.nii.gz`` file, or holds
            two files for one case.
    """
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DataError(f"prediction folder {pred_dir} does not exist; pass the folder written by `medsegdiff predict`")
    found = _case_files(pred_dir, "prediction")
    if not found:
        raise DataError(
            f"prediction folder {pred_dir}: no files named sub-strokeNNNN.nii.gz; "
            "pass the folder written by `medsegdiff predict` or `medsegdiff baseline`"
        )
    return found


def find_references(gt: str | Path) -> dict[str, Path]:
    """Reference masks keyed by case id, from a folder of ``sub-strokeNNNN.nii.gz`` files or a data root.

    Raises:
        DataError: ``gt`` does not exist or no reference mask is found.
    """
    gt = Path(gt)
    if not gt.is_dir():
        raise DataError(f"reference {gt} does not exist; pass an ISLES24 data root or a folder of reference masks")
    found = _case_files(gt, "reference")
    if found:
        return found
    result = discover_cases(gt, [], layout="auto")
    refs = {c.case_id: Path(c.mask) for c in result.cases if getattr(c, "mask", None)}
    if not refs:
        raise DataError(
            f"reference {gt}: found no lesion masks (neither sub-strokeNNNN.nii.gz files nor an ISLES24 "
            "data root with derivatives/*/ses-02/*lesion-msk.nii.gz); check the path"
        )
    return refs


# ----------------------------------------------------------------------------------- reading


def _read_info(path: Path, what: str) -> Any:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise DataError(
            f"{what}: image file {path} cannot be read by SimpleITK ({_first_line(err)}); re-export or replace it"
        ) from None
    return reader


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "description" in ln.lower() or "error" in ln.lower()]
    text = (useful or lines or [type(err).__name__])[-1]
    return text[:200]


def read_mask(path: str | Path, what: str = "mask", threshold: float | None = None) -> tuple[np.ndarray, Any]:
    """Read a mask with SimpleITK (scale slope applied) as a bool array.

    A binary file (0 and at most one other value: 0/1, 0/255, ...) is read as ``!= 0``. Anything
    else (a probability map, a label map) is refused unless ``threshold`` is given, which reads
    the file as ``value > threshold``: binarising it at ``> 0`` without a word would score a
    probability map as a huge lesion.

    Returns:
        ``(mask, image)``: bool array ``(Z, Y, X)`` (or ``(Y, X)``) and the ``sitk.Image``.

    Raises:
        DataError: the file is missing, truncated, unreadable, not a scalar 2-D/3-D image, or
            not binary while ``threshold`` is None.
    """
    path = Path(path)
    try:
        image = read_image(path)  # also detects truncated .nii.gz (SimpleITK would read zeros)
    except DataError as err:
        raise DataError(f"{what}: {err}") from None
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() not in (2, 3):
        raise DataError(
            f"{what} {path}: expected a scalar 2-D/3-D mask, got {image.GetDimension()}-D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s) per voxel"
        )
    values = sitk.GetArrayViewFromImage(image)
    if threshold is not None:
        return np.nan_to_num(values, nan=0.0) > threshold, image
    nonzero = values[values != 0]
    if nonzero.size and (nonzero != nonzero.flat[0]).any():
        lo, hi = float(np.nanmin(nonzero)), float(np.nanmax(nonzero))
        hint = ("pass --threshold T (e.g. 0.5) to score it as value > T" if what == "prediction"
                else "give a binary reference mask")
        raise DataError(
            f"{what} {path}: not a binary mask (non-zero values from {lo:.4g} to {hi:.4g}, e.g. a probability "
            f"or label map); {hint}"
        )
    return values != 0, image


def grid_mismatch(pred: Any, ref: Any, tol: float = GRID_TOLERANCE) -> str | None:
    """Describe how two grids differ (size, spacing, origin, direction beyond ``tol``), or None.

    Works on anything with ``GetSize/GetSpacing/GetOrigin/GetDirection`` (``sitk.Image``,
    ``sitk.ImageFileReader`` after ``ReadImageInformation``).
    """
    if tuple(pred.GetSize()) != tuple(ref.GetSize()):
        return f"size {tuple(pred.GetSize())} vs reference {tuple(ref.GetSize())}"
    for name in ("Spacing", "Origin", "Direction"):
        a = np.asarray(getattr(pred, f"Get{name}")(), dtype=np.float64)
        b = np.asarray(getattr(ref, f"Get{name}")(), dtype=np.float64)
        if a.shape != b.shape or not np.allclose(a, b, rtol=0.0, atol=tol):
            fa = tuple(round(float(v), 4) for v in a)
            fb = tuple(round(float(v), 4) for v in b)
            return f"{name.lower()} {fa} vs reference {fb}"
    return None


# --------------------------------------------------------------------------------- evaluate


def evaluate(
    pred_dir: str | Path,
    gt: str | Path,
    out_dir: str | Path,
    *,
    iou_threshold: float = 0.5,
    hd95: bool = True,
    connectivity: int | None = None,
    cases: Sequence[str] | None = None,
    progress: bool = True,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Score every reference case and write ``metrics.csv``, ``summary.json`` and a volume plot.

    Args:
        pred_dir: folder of predicted masks ``sub-strokeNNNN.nii.gz`` on the reference grids.
        gt: ISLES'24 data root, or a folder of reference masks named like the predictions.
        out_dir: where the outputs go (created).
        iou_threshold: lesion-matching IoU for the lesion-wise F1 (0.5 panoptica default; 0.2 in
            the organisers' code since 2025-12-16).
        hd95: also compute HD95 in mm.
        connectivity: component connectivity; ``None``/0 = official (26 in 3-D, 4 in 2-D).
        cases: score only these case ids (default: every reference case).
        progress: show a progress bar.
        threshold: binarise predictions as ``value > threshold`` (probability maps); None =
            predictions must be binary masks (see :func:`read_mask`).

    Returns:
        The summary (as in ``summary.json``) plus ``"cases"``: the per-case metric rows.

    Raises:
        DataError: missing folders, no predictions, a case id asked for without reference, an
            unreadable file, a non-binary prediction without ``threshold``, or prediction grids
            that differ from their reference.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise DataError(f"iou_threshold {iou_threshold}: must be in (0, 1]")
    connectivity = connectivity or None
    preds = find_predictions(pred_dir)
    refs = find_references(gt)
    if cases is not None:
        unknown = sorted(set(cases) - set(refs))
        if unknown:
            raise DataError(f"reference {gt}: no mask for requested case(s) {', '.join(unknown)}")
        refs = {c: refs[c] for c in sorted(cases)}
    case_ids = sorted(refs)
    missing = [c for c in case_ids if c not in preds]
    extra = sorted(set(preds) - set(refs)) if cases is None else []

    # 1. headers only: every grid problem is reported before any voxel is read
    problems = []
    for case_id in case_ids:
        ref_info = _read_info(refs[case_id], "reference mask")
        if case_id in preds:
            pred_info = _read_info(preds[case_id], "prediction")
            diff = grid_mismatch(pred_info, ref_info)
            if diff:
                problems.append(f"{case_id}: {diff}")
    if problems:
        more = f" (and {len(problems) - 1} more case(s))" if len(problems) > 1 else ""
        raise DataError(
            f"prediction grid differs from the reference grid for {problems[0]}{more}; "
            "write predictions on the reference (native NCCT) grid"
        )
    if missing:
        logger.warning(
            "evaluate: no prediction for %d case(s), scored as empty masks: %s", len(missing), ", ".join(missing)
        )
    if extra:
        logger.warning("evaluate: %d prediction(s) without a reference ignored: %s", len(extra), ", ".join(extra))

    # 2. metrics
    rows: list[dict[str, Any]] = []
    for case_id in tqdm(case_ids, desc="evaluate", unit="case", disable=not progress):
        gt_mask, gt_image = read_mask(refs[case_id], "reference mask")
        if case_id in preds:
            pred_mask, _ = read_mask(preds[case_id], "prediction", threshold)
        else:
            pred_mask = np.zeros_like(gt_mask)
        spacing = tuple(gt_image.GetSpacing())
        voxel_ml = float(np.prod(spacing)) / 1000.0
        m = case_metrics(
            pred_mask, gt_mask, voxel_ml, iou_threshold,
            spacing=spacing[::-1], hd95=hd95, connectivity=connectivity,
        )
        extra = uncertainty_row(Path(pred_dir), case_id, pred_mask, gt_mask) if case_id in preds else {}
        rows.append({"case_id": case_id, "missing_prediction": int(case_id in missing), **m, **extra})
    if any(k in r for r in rows for k in UNCERTAINTY_KEYS):
        rows = [{**dict.fromkeys(UNCERTAINTY_KEYS, math.nan), **r} for r in rows]

    # 3. outputs
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = (*METRIC_KEYS, *(k for k in UNCERTAINTY_KEYS if rows and k in rows[0]))
    atomic_write_text(out_dir / "metrics.csv", rows_to_csv(rows, ("case_id", "missing_prediction", *keys)))
    vmax = write_volume_scatter(out_dir / "volume_scatter.png", rows) if rows else 0.0
    summary: dict[str, Any] = {
        "n_cases": len(rows),
        "iou_threshold": iou_threshold,
        "connectivity": connectivity or "official (26 in 3-D, 4 in 2-D)",
        "hd95": hd95,
        "prediction_threshold": threshold,
        "missing_predictions": missing,
        "extra_predictions": extra,
        "pred_dir": str(pred_dir),
        "reference": str(gt),
        "metrics": summarize(rows, keys),
        "volume_scatter_max_ml": vmax,
    }
    atomic_write_json(out_dir / "summary.json", json_safe(summary))
    return {**summary, "cases": rows}


def uncertainty_row(pred_dir: Path, case_id: str, pred_mask: np.ndarray, gt_mask: np.ndarray) -> dict[str, float]:
    """The uncertainty metrics of one case from ``predict``'s members, probability and uncertainty files.

    Returns:
        :data:`~medsegdiff.metrics.uncertainty.UNCERTAINTY_KEYS` values, or ``{}`` when a file is missing.

    Raises:
        DataError: files on another grid than the reference, or an unreadable members file.
    """
    paths = [members_path(pred_dir, case_id), pred_dir / f"{case_id}_prob.nii.gz",
             pred_dir / f"{case_id}_uncertainty.nii.gz"]
    if not all(p.is_file() for p in paths):
        return {}
    try:
        members, brain = read_members(paths[0])
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"members file {paths[0]}: cannot be read ({err}); re-run `medsegdiff predict`") from None
    prob = sitk.GetArrayFromImage(read_image(paths[1]))
    unc = sitk.GetArrayFromImage(read_image(paths[2]))
    for name, arr in (("members", members[0]), ("brain", brain), ("probability", prob), ("uncertainty", unc)):
        if arr.shape != gt_mask.shape:
            raise DataError(f"{case_id}: {name} shape {arr.shape} differs from the reference {gt_mask.shape}; "
                            "write predictions on the reference grid")
    return uncertainty_metrics(members, prob, unc, pred_mask, gt_mask, brain)


def rows_to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str] = CSV_COLUMNS) -> str:
    """Per-case rows as CSV text (``columns``, default :data:`CSV_COLUMNS`; floats with 10 significant digits)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        cells = []
        for col in columns:
            v = row[col]
            cells.append(format(v, ".10g") if isinstance(v, float) else v)
        writer.writerow(cells)
    return buf.getvalue()


def format_table(summary: dict[str, Any], keys: Sequence[str] = (*OFFICIAL_METRICS, "hd95", "precision", "recall")) -> str:
    """Compact text table of mean / std / median for the main metrics."""
    lines = [
        f"{summary['n_cases']} case(s), IoU threshold {summary['iou_threshold']}, "
        f"missing predictions: {len(summary['missing_predictions'])}",
        f"{'metric':<18}{'mean':>10}{'std':>10}{'median':>10}",
    ]
    keys = (*keys, *(k for k in UNCERTAINTY_KEYS if k in summary["metrics"] and k not in keys))
    for key in keys:
        s = summary["metrics"][key]
        lines.append(f"{key:<18}" + "".join(_fmt(s[k]) for k in ("mean", "std", "median")))
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return f"{'nan':>10}" if v is None or not math.isfinite(v) else f"{v:>10.4f}"


def write_volume_scatter(path: Path, rows: Sequence[dict[str, Any]], size: int = 256) -> float:
    """Write :func:`volume_scatter_figure` as a PNG (``size``: minimum side in pixels).

    Returns:
        The axis maximum in mL (both axes run from 0 to it).
    """
    fig, vmax = volume_scatter_figure(rows, size)
    save_png(fig, path)
    return vmax


def volume_scatter_figure(rows: Sequence[dict[str, Any]], size: int = 256) -> tuple[Any, float]:
    """Scatter of predicted (y) vs reference (x) lesion volume in mL.

    Labelled axes from 0 to the same maximum, the identity line (perfect agreement), scored cases
    and missing predictions (scored as empty) in a legend, the number of cases in the title.

    Returns:
        ``(figure, axis maximum in mL)``.
    """
    gt_v = np.array([r["gt_volume_ml"] for r in rows], dtype=np.float64)
    pr_v = np.array([r["pred_volume_ml"] for r in rows], dtype=np.float64)
    vmax = float(max(gt_v.max(initial=0.0), pr_v.max(initial=0.0))) * 1.05 or 1.0
    missing = np.array([bool(r.get("missing_prediction")) for r in rows], dtype=bool)
    fig = new_figure(4.6, 4.6, dpi=max(100, -(-int(size) // 4)))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0.0, vmax], [0.0, vmax], color="0.6", lw=1.0, ls="--", label="identity (perfect agreement)")
    ax.scatter(gt_v[~missing], pr_v[~missing], s=28, color=PREDICTION_COLOR, edgecolors="black",
               linewidths=0.6, label="scored case", zorder=3)
    if missing.any():
        ax.scatter(gt_v[missing], pr_v[missing], s=34, marker="s", color=REFERENCE_COLOR, edgecolors="black",
                   linewidths=0.6, label="missing prediction (scored empty)", zorder=3)
    ax.set_xlim(0.0, vmax)
    ax.set_ylim(0.0, vmax)
    ax.set_aspect("equal")
    ax.set_xlabel("reference lesion volume (mL)")
    ax.set_ylabel("predicted lesion volume (mL)")
    ax.set_title(f"lesion volume, {len(rows)} case(s)", fontsize=10)
    ax.grid(True, color="0.9")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig, vmax
