"""The non-learned references scored beside every model on the same cases.

* ``tmax``: the official baseline, Tmax > 9 s (:mod:`medsegdiff.baselines.tmax`);
* ``cbf_rule``: Tmax > 6 s and CBF < 15 on the native maps (:mod:`medsegdiff.baselines.cbf_rule`);
* ``ceiling``: the reference mask through the cache grid and back (:mod:`medsegdiff.baselines.ceiling`);
* ``acute_core``: synthetic data only, the part of the lesion the acute images show
  (:mod:`medsegdiff.baselines.acute_core`).

The first is what a model must beat to be useful at all, the second what one line of domain
knowledge gets, the third the most that the cache resolution allows, the fourth the most that the
acute images tell (the rest of the follow-up lesion is growth they do not show).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from medsegdiff.baselines import acute_core, cbf_rule, ceiling
from medsegdiff.baselines.tmax import tmax_baseline

REFERENCES = ("tmax", "cbf_rule", "ceiling", "acute_core")
SYNTHETIC_ONLY = ("acute_core",)


def reference_label(name: str, tmax_threshold: float = 9.0) -> str:
    """The table label of a reference (``tmax``, ``cbf_rule``, ``ceiling``, ``acute_core``)."""
    return {"tmax": f"Tmax > {tmax_threshold:g} s baseline", "cbf_rule": cbf_rule.LABEL,
            "ceiling": ceiling.LABEL, "acute_core": acute_core.LABEL}[name]


def available_references(data_root: str | Path, names: Sequence[str] = REFERENCES) -> list[str]:
    """``names`` without the synthetic-only references that ``data_root`` cannot give (real data)."""
    return [n for n in names if n not in SYNTHETIC_ONLY or acute_core.has_acute_core(data_root)]


def write_references(data_root: str | Path, cache: str | Path, out_root: str | Path, *,
                     cases: Sequence[str] | None = None, names: Sequence[str] = REFERENCES,
                     tmax_threshold: float = 9.0, progress: bool = True) -> dict[str, Path]:
    """Write the predictions of each reference to ``<out_root>/<name>/predictions``.

    Args:
        data_root: the dataset root (native maps for the two rules, the acute cores of synthetic data).
        cache: the prepared cache of the model (its grid defines the ceiling).
        out_root: output folder.
        cases: the case ids (e.g. the test split).
        names: which references (subset of :data:`REFERENCES`).
        tmax_threshold: the official baseline's cut-off.
        progress: progress bars.

    Returns:
        ``{name: prediction folder}``.

    Raises:
        DataError: see the baselines (``acute_core`` on data without acute cores).
        ValueError: an unknown reference name.
    """
    unknown = sorted(set(names) - set(REFERENCES))
    if unknown:
        raise ValueError(f"unknown reference(s) {unknown}; known: {', '.join(REFERENCES)}")
    out_root = Path(out_root)
    folders = {}
    for name in names:
        folder = out_root / name / "predictions"
        if name == "tmax":
            tmax_baseline(data_root, folder, threshold=tmax_threshold, cases=cases, progress=progress)
        elif name == "cbf_rule":
            cbf_rule.cbf_rule_baseline(data_root, folder, cases=cases, progress=progress)
        elif name == "acute_core":
            acute_core.acute_core_baseline(data_root, folder, cases=cases, progress=progress)
        else:
            ceiling.ceiling_baseline(cache, folder, cases=cases, progress=progress)
        folders[name] = folder
    return folders


__all__ = ["REFERENCES", "SYNTHETIC_ONLY", "available_references", "reference_label", "write_references"]
