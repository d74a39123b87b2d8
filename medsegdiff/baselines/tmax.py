"""The official simple ISLES'24 baseline: lesion = Tmax > 9 s (``medsegdiff baseline tmax``).

The organisers' notebook (``ezequieldlrosa/isles24`` ``utils/isles24_evaluate.ipynb``) and their
Grand-Challenge template (``predict_infarct(cutoff=9)``) threshold the Tmax perfusion map on the
NCCT grid. We do the same per case with the ``space-ncct`` Tmax found by
:func:`medsegdiff.data.discovery.discover_cases` and write ``sub-strokeNNNN.nii.gz`` (uint8, the
Tmax grid copied exactly) so ``medsegdiff evaluate`` scores it like any model. The threshold is
strict (``>``), as in the official code.

``data`` may also be a prepared cache (``medsegdiff prepare``): its ``native.npz`` holds the raw
Tmax on each case's native NCCT grid, which is used with the cached native geometry.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from medsegdiff.data.cache import Manifest
from medsegdiff.data.discovery import discover_cases
from medsegdiff.data.loading import read_image
from medsegdiff.errors import DataError
from medsegdiff.utils.io import atomic_write_with

logger = logging.getLogger(__name__)


def tmax_mask(tmax: np.ndarray, threshold: float = 9.0) -> np.ndarray:
    """``uint8`` mask of ``tmax > threshold`` (NaN counts as background)."""
    with np.errstate(invalid="ignore"):
        return (np.asarray(tmax) > threshold).astype(np.uint8)


def predict_case(tmax_path: str | Path, out_path: str | Path, threshold: float = 9.0) -> Path:
    """Threshold one Tmax file and write the mask on the same grid (atomically).

    Raises:
        DataError: the Tmax file is missing, truncated or unreadable.
    """
    tmax_img = read_image(tmax_path)
    if tmax_img.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"Tmax map {tmax_path}: expected a scalar image, got a vector image; check the file")
    return write_mask(tmax_mask(sitk.GetArrayViewFromImage(tmax_img), threshold), tmax_img, Path(out_path))


def write_mask(mask_zyx: np.ndarray, geometry_image: Any, out_path: Path) -> Path:
    """Write a uint8 mask with the grid of ``geometry_image`` (a ``sitk.Image``), atomically."""
    mask = sitk.GetImageFromArray(mask_zyx)
    mask.CopyInformation(geometry_image)
    atomic_write_with(out_path, lambda tmp: sitk.WriteImage(mask, tmp, True), suffix=".nii.gz")
    return out_path


def tmax_baseline(
    data: str | Path,
    out_dir: str | Path,
    *,
    threshold: float = 9.0,
    cases: Sequence[str] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write the official Tmax > ``threshold`` baseline for every case of a data root or cache.

    Args:
        data: dataset root (either release layout), a case folder (see ``discover_cases``), or a
            prepared cache folder (holding ``manifest.json``).
        out_dir: folder for ``sub-strokeNNNN.nii.gz`` predictions (created).
        threshold: Tmax cut-off in seconds (official: 9).
        cases: only these case ids (default: all found).
        progress: show a progress bar.

    Returns:
        The written prediction files, sorted by case id. Cases without a Tmax map are skipped and
        reported (log warning).

    Raises:
        DataError: no data, an unknown requested case, no case with a Tmax map, or an unreadable
            Tmax file.
    """
    data = Path(data)
    out_dir = Path(out_dir)
    if (data / "manifest.json").is_file():
        return _from_cache(data, out_dir, threshold, cases, progress)

    result = discover_cases(data, ["tmax"], require_mask=False)
    by_id = {c.case_id: c for c in result.cases}
    ids = select_cases(by_id, cases, data)
    todo = {cid: by_id[cid].images["tmax"] for cid in ids if "tmax" in by_id[cid].images}
    report_skipped(sorted(set(ids) - set(todo)), len(todo), data)
    written = []
    for case_id, tmax_path in tqdm(todo.items(), desc="tmax baseline", unit="case", disable=not progress):
        written.append(predict_case(tmax_path, out_dir / f"{case_id}.nii.gz", threshold))
    return written


def select_cases(available: Iterable[str], cases: Sequence[str] | None, data: Path) -> list[str]:
    """``cases`` (sorted) if every one is available, else all available ids; DataError for unknown ones."""
    ids = sorted(available)
    if cases is None:
        return ids
    unknown = sorted(set(cases) - set(ids))
    if unknown:
        raise DataError(f"data {data}: requested case(s) not found: {', '.join(unknown)}")
    return sorted(cases)


def report_skipped(skipped: list[str], n_written: int, data: Path, maps: Sequence[str] = ("Tmax",),
                   what: str = "tmax baseline") -> None:
    """Log the cases left out for want of a map; DataError when no case had the maps.

    Raises:
        DataError: nothing was written.
    """
    names = " and ".join(maps)
    if skipped:
        logger.warning("%s: %d case(s) without a space-ncct %s map skipped: %s",
                       what, len(skipped), names, ", ".join(skipped))
    if not n_written:
        files = ", ".join(f"*_space-ncct_{m.lower()}.nii.gz" for m in maps)
        raise DataError(f"data {data}: no case has a space-ncct {names} map "
                        f"(derivatives/*/ses-01/perfusion-maps/{files})")


def _from_cache(cache: Path, out_dir: Path, threshold: float, cases: Sequence[str] | None,
                progress: bool) -> list[Path]:
    manifest = Manifest.open(cache)
    ids = select_cases(manifest.case_ids, cases, cache)
    written, skipped = [], []
    for case_id in tqdm(ids, desc="tmax baseline", unit="case", disable=not progress):
        case = manifest.case(case_id)
        tmax = case.native_tmax()
        if tmax is None:
            skipped.append(case_id)
            continue
        ref = case.native_geometry.reference_image()
        written.append(write_mask(tmax_mask(tmax, threshold), ref, out_dir / f"{case_id}.nii.gz"))
    report_skipped(skipped, len(written), cache)
    return written
