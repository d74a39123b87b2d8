"""A CBF-informed perfusion rule: lesion = Tmax > 6 s and CBF < 15 (``medsegdiff`` reference method).

The official baseline (Tmax > 9 s, :mod:`medsegdiff.baselines.tmax`) marks the whole
hypoperfused region. The infarct core is the part of it where blood flow has collapsed, so a
rule that also asks for low CBF separates core from penumbra. The thresholds follow the usual
CT-perfusion definitions: Tmax > 6 s for the hypoperfused tissue (DEFUSE 3, Albers et al. 2018)
and CBF below ~30 % of normal tissue (the RAPID core definition rCBF < 30 %), written here as an
absolute CBF < 15 mL/100 g/min for normal tissue at ~50 (absolute instead of relative CBF is our
choice: it needs no contralateral reference region). Both maps are read on each case's native
NCCT grid (the ``space-ncct`` derivatives), exactly like the official baseline, and the mask is
written on the Tmax grid so ``medsegdiff evaluate`` scores it like any model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

from medsegdiff.baselines.tmax import report_skipped, select_cases, write_mask
from medsegdiff.data.discovery import discover_cases
from medsegdiff.data.loading import read_image
from medsegdiff.errors import DataError

TMAX_THRESHOLD = 6.0
CBF_THRESHOLD = 15.0
LABEL = f"Tmax > {TMAX_THRESHOLD:g} s & CBF < {CBF_THRESHOLD:g} rule"


def cbf_rule_mask(tmax: np.ndarray, cbf: np.ndarray, tmax_threshold: float = TMAX_THRESHOLD,
                  cbf_threshold: float = CBF_THRESHOLD) -> np.ndarray:
    """``uint8`` mask of ``(tmax > tmax_threshold) & (cbf < cbf_threshold)`` (NaN = background).

    Args:
        tmax, cbf: maps of the same shape (e.g. ``(Z, Y, X)``), seconds and mL/100 g/min.

    Raises:
        ValueError: the shapes differ.
    """
    tmax, cbf = np.asarray(tmax), np.asarray(cbf)
    if tmax.shape != cbf.shape:
        raise ValueError(f"cbf_rule_mask: Tmax shape {tmax.shape} differs from CBF shape {cbf.shape}")
    with np.errstate(invalid="ignore"):
        return ((tmax > tmax_threshold) & (cbf < cbf_threshold)).astype(np.uint8)


def cbf_rule_baseline(
    data: str | Path,
    out_dir: str | Path,
    *,
    tmax_threshold: float = TMAX_THRESHOLD,
    cbf_threshold: float = CBF_THRESHOLD,
    cases: Sequence[str] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Write the rule's mask ``sub-strokeNNNN.nii.gz`` for every case of a data root.

    Args:
        data: dataset root (either release layout) or case folder(s) (see ``discover_cases``). A
            prepared cache does not keep the native CBF, so it is not accepted.
        out_dir: output folder (created).
        tmax_threshold, cbf_threshold: the two cut-offs.
        cases: only these case ids (default: all found).
        progress: progress bar.

    Returns:
        The written files, sorted by case id (cases without Tmax or CBF are skipped and logged).

    Raises:
        DataError: a cache was given, no case has both maps, an unknown case id, or an unreadable
            or mismatched map.
    """
    data, out_dir = Path(data), Path(out_dir)
    if (data / "manifest.json").is_file():
        raise DataError(f"{data}: the CBF rule needs the native CBF and Tmax maps; pass the data root, "
                        "not a prepared cache")
    result = discover_cases(data, ["tmax", "cbf"], require_mask=False)
    by_id = {c.case_id: c for c in result.cases}
    ids = select_cases(by_id, cases, data)
    todo = [cid for cid in ids if {"tmax", "cbf"} <= set(by_id[cid].images)]
    report_skipped(sorted(set(ids) - set(todo)), len(todo), data, maps=("Tmax", "CBF"), what="CBF rule")
    written = []
    for cid in tqdm(todo, desc="CBF rule", unit="case", disable=not progress):
        tmax_img = read_image(by_id[cid].images["tmax"])
        cbf_img = read_image(by_id[cid].images["cbf"])
        tmax, cbf = sitk.GetArrayViewFromImage(tmax_img), sitk.GetArrayViewFromImage(cbf_img)
        if tmax.shape != cbf.shape:
            raise DataError(f"case {cid}: CBF grid {cbf.shape} differs from the Tmax grid {tmax.shape} (z, y, x)")
        mask = cbf_rule_mask(tmax, cbf, tmax_threshold, cbf_threshold)
        written.append(write_mask(mask, tmax_img, out_dir / f"{cid}.nii.gz"))
    return written


__all__ = ["CBF_THRESHOLD", "LABEL", "TMAX_THRESHOLD", "cbf_rule_baseline", "cbf_rule_mask"]
