"""The official simple ISLES'24 baseline: lesion = Tmax > 9 s (``medsegdiff baseline tmax``).

The organisers' notebook (``ezequieldlrosa/isles24`` ``utils/isles24_evaluate.ipynb``) and their
Grand-Challenge template (``predict_infarct(cutoff=9)``) threshold the Tmax perfusion map on the
NCCT grid. We do the same per case with the ``space-ncct`` Tmax found by
:func:`medsegdiff.data.discovery.discover_cases` and write ``sub-strokeNNNN.nii.gz`` (uint8, the
Tmax grid copied exactly) so ``medsegdiff evaluate`` scores it like any model. The threshold is
strict (``>``), as in the official code.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

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
    import SimpleITK as sitk

    from medsegdiff.data.loading import read_image

    tmax_img = read_image(tmax_path)
    if tmax_img.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"Tmax map {tmax_path}: expected a scalar image, got a vector image; check the file")
    mask = sitk.GetImageFromArray(tmax_mask(sitk.GetArrayViewFromImage(tmax_img), threshold))
    mask.CopyInformation(tmax_img)
    out_path = Path(out_path)
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
    """Write the official Tmax > ``threshold`` baseline for every case of an ISLES'24 data root.

    Args:
        data: dataset root (either release layout), a case folder (see ``discover_cases``).
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
    from tqdm import tqdm

    from medsegdiff.data.discovery import discover_cases

    result = discover_cases(data, ["tmax"], require_mask=False)
    by_id = {c.case_id: c for c in result.cases}
    if cases is not None:
        unknown = sorted(set(cases) - set(by_id))
        if unknown:
            raise DataError(f"data {data}: requested case(s) not found: {', '.join(unknown)}")
        by_id = {c: by_id[c] for c in cases}
    todo = {cid: c.images["tmax"] for cid, c in sorted(by_id.items()) if "tmax" in c.images}
    skipped = sorted(set(by_id) - set(todo))
    if skipped:
        logger.warning("tmax baseline: %d case(s) without a space-ncct Tmax map skipped: %s",
                       len(skipped), ", ".join(skipped))
    if not todo:
        raise DataError(f"data {data}: no case has a space-ncct Tmax map (derivatives/*/ses-01/perfusion-maps/)")
    out_dir = Path(out_dir)
    written = []
    for case_id, tmax_path in tqdm(todo.items(), desc="tmax baseline", unit="case", disable=not progress):
        written.append(predict_case(tmax_path, out_dir / f"{case_id}.nii.gz", threshold))
    return written
