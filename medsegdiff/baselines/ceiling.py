"""The resolution ceiling as a reference method: the reference mask sent through the cache grid and back.

The network sees the case on the cache grid (``data.image_size``) and its prediction is sent back
to the native grid (:func:`medsegdiff.inference.export.to_native`, then ``>= 0.5``). Doing the
same with the cached reference mask gives the best a model on that grid can score with a perfect
cache-grid prediction; anything below 1 is lost to resolution before any learning. ``prepare``
reports the same number per cache (:func:`medsegdiff.data.grid.resolution_ceiling`); this
module writes the masks so that ``medsegdiff evaluate`` scores them with every official metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from medsegdiff.baselines.tmax import select_cases, write_mask
from medsegdiff.data.cache import Manifest
from medsegdiff.data.grid import roundtrip_mask
from medsegdiff.errors import DataError

LABEL = "resolution ceiling"


def ceiling_baseline(cache: str | Path, out_dir: str | Path, *, cases: Sequence[str] | None = None,
                     progress: bool = True) -> list[Path]:
    """Write the round-tripped reference mask ``sub-strokeNNNN.nii.gz`` of each cached case (native grid).

    Args:
        cache: a prepared cache folder (``manifest.json``).
        out_dir: output folder (created).
        cases: only these case ids (default: every cached case with a reference mask).
        progress: progress bar.

    Returns:
        The written files, sorted by case id.

    Raises:
        DataError: not a cache, an unknown case, or no case with a reference mask.
    """
    cache, out_dir = Path(cache), Path(out_dir)
    manifest = Manifest.open(cache)
    ids = [cid for cid in select_cases(manifest.case_ids, cases, cache) if manifest.case(cid).has_mask]
    if not ids:
        raise DataError(f"{cache}: no cached case with a reference mask; prepare the data root with its masks")
    written = []
    for cid in tqdm(ids, desc="resolution ceiling", unit="case", disable=not progress):
        case = manifest.case(cid)
        mask = roundtrip_mask(case.mask, case.cache_geometry, case.native_geometry)
        written.append(write_mask(mask, case.native_geometry.reference_image(), out_dir / f"{cid}.nii.gz"))
    return written


__all__ = ["LABEL", "ceiling_baseline"]
