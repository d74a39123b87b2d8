"""The acute-core oracle (synthetic data only): how much of the follow-up lesion the acute images carry.

In the synthetic look-alike (:mod:`medsegdiff.data.synthetic`) the follow-up lesion is the acute
core, which lowers CBF and CBV and raises Tmax and MTT, plus 10-35 % infarct growth into the
penumbra that no acute image shows. The generator writes the core of every case
(:func:`~medsegdiff.data.synthetic.acute_core_path`); this reference predicts exactly that core on
the native grid. A model that sees only the acute images cannot know where the growth goes, so
this Dice (about ``2 / (2 + u)`` = 0.85-0.95 per case for growth ``u``) is the practical bound on
what the data holds. It is not a strict bound: a model that adds the most likely growth voxels
next to the core can score a little above it. The resolution ceiling
(:mod:`medsegdiff.baselines.ceiling`) is the other bound, what the cache grid keeps; a model is
limited by both. Real ISLES24 data has no such file, so the reference exists only for synthetic
data.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import SimpleITK as sitk
from tqdm import tqdm

from medsegdiff.baselines.tmax import select_cases, write_mask
from medsegdiff.data.loading import read_image
from medsegdiff.data.synthetic import ACUTE_CORE_SUFFIX, TRUTH_DIR, acute_core_path
from medsegdiff.errors import DataError

LABEL = "acute-core oracle"


def has_acute_core(data: str | Path) -> bool:
    """True when ``data`` is a synthetic dataset root that carries the acute cores."""
    return (Path(data) / TRUTH_DIR).is_dir()


def acute_core_baseline(data: str | Path, out_dir: str | Path, *, cases: Sequence[str] | None = None,
                        progress: bool = True) -> list[Path]:
    """Write each case's acute core as ``sub-strokeNNNN.nii.gz`` (its own native grid).

    Args:
        data: a synthetic dataset root (``medsegdiff synth``; a dataset written before the cores
            were gets them when it is reused with the same arguments).
        out_dir: output folder (created).
        cases: only these case ids (default: every case with a core file).
        progress: progress bar.

    Returns:
        The written files, sorted by case id.

    Raises:
        DataError: ``data`` has no ``synthetic_truth/`` folder (real data, or a dataset generated
            before the cores were written), or a requested case has no core file.
    """
    data, out_dir = Path(data), Path(out_dir)
    if not has_acute_core(data):
        raise DataError(f"{data}: no {TRUTH_DIR}/ folder; the acute-core oracle exists only for synthetic data "
                        "written by `medsegdiff synth` (run it again with the same arguments to add the cores to older data)")
    available = [p.name[: -len(ACUTE_CORE_SUFFIX)] for p in (data / TRUTH_DIR).glob(f"*{ACUTE_CORE_SUFFIX}")]
    written = []
    for cid in tqdm(select_cases(available, cases, data), desc="acute core", unit="case", disable=not progress):
        img = read_image(acute_core_path(data, cid))
        mask = (sitk.GetArrayFromImage(img) > 0).astype("uint8")
        written.append(write_mask(mask, img, out_dir / f"{cid}.nii.gz"))
    return written


__all__ = ["LABEL", "acute_core_baseline", "has_acute_core"]
