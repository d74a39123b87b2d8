"""Case discovery for both ISLES'24 on-disk layouts, a single case folder, or a list of them.

Layouts (reference note ``isles24_dataset.md`` section 4):

* **zenodo** (2025 release, root ``train/``)::

      raw_data/{sid}/ses-01/{sid}_ses-01_ncct.nii.gz
      derivatives/{sid}/ses-01/{sid}_ses-01_space-ncct_{cta,ctp}.nii.gz
      derivatives/{sid}/ses-01/perfusion-maps/{sid}_ses-01_space-ncct_{cbf,cbv,mtt,tmax}.nii.gz
      derivatives/{sid}/ses-02/{sid}_ses-02_space-ncct_lesion-msk.nii.gz
      phenotype/{sid}/ses-0{1,2}/*.xlsx

* **challenge2024** (``batch_{1,2,3}/`` each holding the tree above, but the mask is
  ``{sid}_ses-02_lesion-msk.nii.gz`` without ``space-ncct`` and the phenotype files are CSV).

Files are found with globs, never hard-coded full paths, and keyed by subject ID, so one missing
file never shifts another case's files. Tolerated variants: ``rawdata``/``raw_data``, any
``ses-*`` folder, both mask names, ``.nii.gz``/``.nii``/``.mha``. If a subject has both a
``.nii.gz`` and an uncompressed ``.nii`` of the same file (the stray ``sub-stroke0142`` mask of
the real release), the ``.nii.gz`` is kept and the duplicate is reported.

Only files on the NCCT grid are used for CTA/CTP/maps (``derivatives/.../*space-ncct*``); the
native-space copies under ``raw_data`` are on other grids and are ignored. NCCT exists only
under ``raw_data``.

Discovery never reads image data. Problems are *reported* (``DiscoveryResult.problems`` and
``CaseFiles.missing``); whether a case with a missing modality is skipped or stops the run
(``data.missing_modality``) is decided by the caller (``medsegdiff.data.loading.load_cases``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from medsegdiff.errors import DataError

Layout = Literal["zenodo", "challenge2024", "case_folder"]
MODALITY_NAMES = ("ncct", "cta", "ctp", "cbf", "cbv", "mtt", "tmax")
MASK = "mask"
_SID_RE = re.compile(r"(sub-[A-Za-z0-9]+)")
_EXTS = (".nii.gz", ".nii", ".mha")
_RAW_DIRS = ("raw_data", "rawdata")


@dataclass
class CaseFiles:
    """The files of one case.

    Attributes:
        case_id: subject ID (``sub-strokeNNNN``) or the case folder name.
        layout: ``zenodo``, ``challenge2024`` or ``case_folder``.
        ncct: native NCCT (the reference grid), or None if absent.
        images: requested modality -> file (NCCT included when requested); absent ones are left out.
        mask: lesion mask, or None if absent.
        extra: other files found: unrequested modalities on the NCCT grid (e.g. ``tmax`` for the
            official baseline), ``baseline``/``outcome`` phenotype tables, ``stray_mask``.
        missing: requested modalities without a file (and ``"mask"`` when a mask is required).
        problems: this case's discovery problem lines (missing files, ignored duplicates).
    """

    case_id: str
    layout: str
    ncct: Path | None = None
    images: dict[str, Path] = field(default_factory=dict)
    mask: Path | None = None
    extra: dict[str, Path] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing

    def missing_message(self) -> str:
        """One line naming the case and what is missing (empty when complete)."""
        if not self.missing:
            return ""
        detail = [p for p in self.problems if p.startswith(f"case {self.case_id}: missing")
                  or p.startswith(f"case {self.case_id}: no lesion mask")]
        if detail:
            return "; ".join(detail[:1] + [d.split(": ", 1)[1] for d in detail[1:]])
        return f"case {self.case_id}: missing {', '.join(self.missing)} (no matching file found)"


@dataclass
class Problem:
    """One discovery finding: ``kind`` in missing_modality, missing_mask, duplicate, duplicate_subject."""

    case_id: str
    kind: str
    message: str

    def __str__(self) -> str:
        return self.message


@dataclass
class DiscoveryResult:
    """Cases found (sorted by ID, complete or not) and every problem noticed."""

    cases: list[CaseFiles]
    problems: list[Problem]
    layout: str
    root: Path | None = None

    @property
    def complete(self) -> list[CaseFiles]:
        return [c for c in self.cases if c.complete]

    @property
    def incomplete(self) -> list[CaseFiles]:
        return [c for c in self.cases if not c.complete]

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    def by_id(self) -> dict[str, CaseFiles]:
        return {c.case_id: c for c in self.cases}


# --------------------------------------------------------------------------- file matching


def _strip_ext(name: str) -> tuple[str, str] | None:
    for ext in _EXTS:
        if name.endswith(ext):
            return name[: -len(ext)], ext
    return None


def _pick(files: Iterable[Path], case_id: str, what: str, problems: list[Problem]) -> Path | None:
    """One file out of candidates for the same item: prefer .nii.gz > .nii > .mha; report duplicates."""
    files = sorted(set(files), key=lambda p: (_EXTS.index(_strip_ext(p.name)[1]), str(p)))  # type: ignore[index]
    if not files:
        return None
    keep = files[0]
    for other in files[1:]:
        problems.append(Problem(case_id, "duplicate",
                                f"case {case_id}: duplicate {what} file {other} ignored; using {keep}"))
    return keep


def _match_stem(stem: str, key: str) -> str | None:
    """Classify a file stem: ``key`` is the modality/mask name; returns the variant rank or None.

    Variant ``"space"`` = ``*_space-ncct_<key>``, ``"plain"`` = ``*_<key>`` or ``<key>``.
    """
    if key == MASK:
        if stem.endswith("lesion-msk") or stem.endswith("lesion_msk") or stem in ("mask", "label", "seg"):
            return "space" if "space-ncct" in stem else "plain"
        return None
    if stem.endswith(f"space-ncct_{key}"):
        return "space"
    if stem == key or stem.endswith(f"_{key}") or stem.endswith(f"-{key}"):
        return "plain"
    return None


def _files_in(folder: Path, recursive: bool = True) -> list[Path]:
    if not folder.is_dir():
        return []
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and not p.name.startswith(".") and _strip_ext(p.name))


def _classify(files: Sequence[Path], key: str, *, space_only: bool) -> list[Path]:
    """Files matching ``key``: the ``space-ncct`` variant if any, else plain ones (unless space_only)."""
    space, plain = [], []
    for p in files:
        stem = _strip_ext(p.name)[0]  # type: ignore[index]
        if key != MASK and ("lesion-msk" in stem or "lesion_msk" in stem):
            continue
        v = _match_stem(stem, key)
        if v == "space":
            space.append(p)
        elif v == "plain":
            plain.append(p)
    if key == MASK:  # every mask variant; _choose picks one and reports the others
        return space + plain
    if space:
        return space
    return [] if space_only else plain


def _group_by_stem(files: Sequence[Path]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for p in files:
        out.setdefault(str(p.parent / _strip_ext(p.name)[0]), []).append(p)  # type: ignore[index]
    return out


def _choose(files: Sequence[Path], case_id: str, what: str, problems: list[Problem]) -> Path | None:
    """Pick among matching files: same stem with several extensions -> dedup; several stems -> prefer
    the masked-free canonical one (shortest name), report the rest."""
    if not files:
        return None
    groups = _group_by_stem(files)
    stems = sorted(groups, key=lambda s: (len(Path(s).name), s))
    if what == MASK:  # organiser test GT uses *_ncct-masked_lesion-msk; prefer the plain training mask
        stems = sorted(stems, key=lambda s: ("ncct-masked" in Path(s).name, "space-ncct" not in Path(s).name,
                                             len(Path(s).name), s))
    keep = _pick(groups[stems[0]], case_id, what, problems)
    for s in stems[1:]:
        for other in groups[s]:
            problems.append(Problem(case_id, "duplicate",
                                    f"case {case_id}: second {what} file {other} ignored; using {keep}"))
    return keep


# --------------------------------------------------------------------------- layouts


def detect_layout(root: Path) -> str:
    """``zenodo`` / ``challenge2024`` for a dataset root, ``case_folder`` otherwise."""
    if any(p.is_dir() and (p / "derivatives").is_dir() for p in root.glob("batch_*")):
        return "challenge2024"
    if (root / "derivatives").is_dir() or any((root / d).is_dir() for d in _RAW_DIRS):
        return "zenodo"
    return "case_folder"


def _dataset_roots(root: Path, layout: str) -> list[Path]:
    if layout == "challenge2024":
        return sorted((p for p in root.glob("batch_*") if p.is_dir()), key=lambda p: _natural_key(p.name))
    return [root]


def _natural_key(s: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _subjects(base: Path) -> dict[str, dict[str, Path]]:
    """sid -> {'derivatives': folder, 'raw': folder, 'phenotype': folder} under one (batch) root."""
    subs: dict[str, dict[str, Path]] = {}
    for kind, names in (("derivatives", ("derivatives",)), ("raw", _RAW_DIRS), ("phenotype", ("phenotype",))):
        for name in names:
            for d in sorted((base / name).glob("sub-*")):
                if d.is_dir():
                    subs.setdefault(d.name, {}).setdefault(kind, d)
    return subs


def _case_from_dataset(sid: str, folders: dict[str, Path], layout: str, modalities: Sequence[str],
                       require_mask: bool, problems: list[Problem]) -> CaseFiles:
    case = CaseFiles(case_id=sid, layout=layout)
    der = _files_in(folders["derivatives"]) if "derivatives" in folders else []
    raw = _files_in(folders["raw"]) if "raw" in folders else []
    # NCCT: raw_data (the only copy in the releases); a space-ncct NCCT under derivatives also counts
    raw_top = [p for p in raw if "perfusion-maps" not in p.parts]
    ncct_files = _classify(der, "ncct", space_only=True) or _classify(raw_top, "ncct", space_only=False)
    case.ncct = _choose(ncct_files, sid, "ncct", problems)
    for m in modalities:
        if m == "ncct":
            path = case.ncct
        else:
            path = _choose(_classify(der, m, space_only=True), sid, m, problems)
        if path is None:
            case.missing.append(m)
            problems.append(Problem(sid, "missing_modality", _missing_line(sid, m, folders, layout)))
        else:
            case.images[m] = path
    for m in MODALITY_NAMES:  # unrequested modalities on the NCCT grid (e.g. Tmax for the baseline)
        if m not in modalities and m != "ncct":
            path = _choose(_classify(der, m, space_only=True), sid, m, problems)
            if path is not None:
                case.extra[m] = path
    # the lesion mask lives in the follow-up session (ses-02); accept any session
    mask_files = _classify(der, MASK, space_only=False)
    stray = [p for p in mask_files if p.name.endswith(".nii") and p.with_name(p.name + ".gz") in mask_files]
    case.mask = _choose(mask_files, sid, MASK, problems)
    if stray:
        case.extra["stray_mask"] = stray[0]
    if case.mask is None and require_mask:
        case.missing.append(MASK)
        where = folders.get("derivatives", Path("derivatives") / sid)
        problems.append(Problem(sid, "missing_mask",
                                f"case {sid}: no lesion mask (*lesion-msk.nii.gz) under {where}"))
    if "phenotype" in folders:
        for p in sorted(folders["phenotype"].rglob("*")):
            if p.suffix in (".xlsx", ".csv") and p.is_file():
                key = "baseline" if "baseline" in p.name else "outcome" if "outcome" in p.name else p.stem
                case.extra.setdefault(key, p)
    return case


def _missing_line(sid: str, m: str, folders: dict[str, Path], layout: str) -> str:
    if m == "ncct":
        where = folders.get("raw", Path("raw_data") / sid)
        pattern = f"{sid}_ses-01_ncct.nii.gz"
    else:
        where = folders.get("derivatives", Path("derivatives") / sid)
        sub = "perfusion-maps/" if m in ("cbf", "cbv", "mtt", "tmax") else ""
        pattern = f"ses-01/{sub}{sid}_ses-01_space-ncct_{m}.nii.gz"
    return f"case {sid}: missing modality {m} (expected {pattern} under {where})"


def _discover_dataset(root: Path, layout: str, modalities: Sequence[str], require_mask: bool) -> DiscoveryResult:
    problems: list[Problem] = []
    found: dict[str, CaseFiles] = {}
    for base in _dataset_roots(root, layout):
        for sid, folders in _subjects(base).items():
            if "derivatives" not in folders and "raw" not in folders:
                continue  # phenotype only
            if sid in found:
                problems.append(Problem(sid, "duplicate_subject",
                                        f"case {sid}: found again under {base}; keeping the copy under "
                                        f"{_base_of(found[sid])}"))
                continue
            found[sid] = _case_from_dataset(sid, folders, layout, modalities, require_mask, problems)
    cases = [found[k] for k in sorted(found, key=_natural_key)]
    _attach(cases, problems)
    return DiscoveryResult(cases=cases, problems=problems, layout=layout, root=root)


def _attach(cases: Sequence[CaseFiles], problems: Sequence[Problem]) -> None:
    by_id = {c.case_id: c for c in cases}
    for p in problems:
        if p.case_id in by_id and p.message not in by_id[p.case_id].problems:
            by_id[p.case_id].problems.append(p.message)


def _base_of(case: CaseFiles) -> str:
    p = case.mask or case.ncct or next(iter(case.images.values()), None)
    return str(p.parents[3]) if p is not None and len(p.parents) > 3 else "?"


def discover_case_folder(folder: str | os.PathLike[str], modalities: Sequence[str], *,
                         require_mask: bool = True, problems: list[Problem] | None = None) -> CaseFiles:
    """Files of one case from a folder holding them at any depth.

    The case ID is the subject ID in the file names if there is one, else the folder name. For a
    modality the ``*_space-ncct_<m>`` file wins over a plain ``*_<m>`` / ``<m>`` one. A
    ``derivatives/{sid}`` folder of a release also works: its NCCT is then taken from the sibling
    ``raw_data/{sid}``.
    """
    folder = Path(folder)
    problems = [] if problems is None else problems
    if not folder.is_dir():
        raise DataError(f"case folder {folder} does not exist or is not a folder")
    files = _files_in(folder)
    sids = {m.group(1) for p in files if (m := _SID_RE.search(p.name))}
    case_id = sids.pop() if len(sids) == 1 else folder.name
    if folder.parent.name == "derivatives":
        for raw in _RAW_DIRS:
            sib = folder.parent.parent / raw / folder.name
            if sib.is_dir():
                sib_files = [p for p in _files_in(sib) if "perfusion-maps" not in p.parts]
                files = files + _classify(sib_files, "ncct", space_only=False)  # only the NCCT
    case = CaseFiles(case_id=case_id, layout="case_folder")
    case.ncct = _choose(_classify(files, "ncct", space_only=False), case_id, "ncct", problems)
    for m in modalities:
        path = case.ncct if m == "ncct" else _choose(_classify(files, m, space_only=False), case_id, m, problems)
        if path is None:
            case.missing.append(m)
            problems.append(Problem(case_id, "missing_modality",
                                    f"case {case_id}: missing modality {m} (no *_{m}.nii.gz under {folder})"))
        else:
            case.images[m] = path
    for m in MODALITY_NAMES:
        if m not in modalities and m != "ncct":
            path = _choose(_classify(files, m, space_only=False), case_id, m, problems)
            if path is not None:
                case.extra[m] = path
    masks = _classify(files, MASK, space_only=False)
    case.mask = _choose(masks, case_id, MASK, problems)
    if case.mask is None and require_mask:
        case.missing.append(MASK)
        problems.append(Problem(case_id, "missing_mask",
                                f"case {case_id}: no lesion mask (*lesion-msk.nii.gz) under {folder}"))
    return case


def discover_cases(
    root: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    modalities: Sequence[str],
    *,
    layout: str = "auto",
    require_mask: bool = True,
) -> DiscoveryResult:
    """Find the cases under a dataset root (either release), one case folder, or a list of case folders.

    Args:
        root: dataset root (``train/`` of the Zenodo release or the folder holding ``batch_*``; a
            folder whose only child is ``train/`` also works), a single case folder, or a list of
            case folders.
        modalities: requested modalities (names in ``ncct, cta, ctp, cbf, cbv, mtt, tmax``).
        layout: ``auto``, ``zenodo`` or ``challenge2024`` (dataset roots only).
        require_mask: a case without a lesion mask gets ``"mask"`` in ``missing``.

    Returns:
        DiscoveryResult: every case found (sorted by ID; incomplete ones flagged in
        ``CaseFiles.missing``) and one-line problems naming case and file.

    Raises:
        DataError: the root does not exist, a modality name is unknown, the layout does not match
            the folder, or no case is found.
    """
    for m in modalities:
        if m not in MODALITY_NAMES:
            raise DataError(f"unknown modality {m!r}; allowed: {', '.join(MODALITY_NAMES)}")
    if layout not in ("auto", "zenodo", "challenge2024"):
        raise DataError(f"unknown data layout {layout!r}; allowed: auto, zenodo, challenge2024")
    if not isinstance(root, (str, os.PathLike)):
        problems: list[Problem] = []
        folders = [Path(p) for p in root]
        if not folders:
            raise DataError("no case folders given")
        cases = [discover_case_folder(f, modalities, require_mask=require_mask, problems=problems) for f in folders]
        seen: dict[str, Path] = {}
        for c, f in zip(cases, folders):
            if c.case_id in seen:
                raise DataError(f"case ID {c.case_id} appears in two case folders: {seen[c.case_id]} and {f}")
            seen[c.case_id] = f
        return DiscoveryResult(cases=cases, problems=problems, layout="case_folder", root=None)
    path = Path(root)
    if not path.exists():
        raise DataError(f"data root {path} does not exist; set data.root to an ISLES24 folder")
    if not path.is_dir():
        raise DataError(f"data root {path} is not a folder; give the dataset root or a case folder")
    if detect_layout(path) == "case_folder" and detect_layout(path / "train") != "case_folder":
        path = path / "train"  # the folder holding the extracted train.7z
    found = detect_layout(path)
    if found == "case_folder":
        if layout != "auto":
            raise DataError(f"data root {path} has no {layout} layout (no derivatives/ or batch_*/ folder)")
        problems = []
        case = discover_case_folder(path, modalities, require_mask=require_mask, problems=problems)
        if not case.images and case.mask is None and case.ncct is None:
            raise DataError(f"no ISLES24 case found under {path}: expected raw_data/ and derivatives/ "
                            "(Zenodo), batch_*/ (2024 release) or image files of one case")
        return DiscoveryResult(cases=[case], problems=problems, layout="case_folder", root=path)
    if layout != "auto" and layout != found:
        raise DataError(f"data root {path} looks like the {found} layout, but data.layout is {layout}; "
                        "set data.layout to auto or fix data.root")
    result = _discover_dataset(path, found, modalities, require_mask)
    if not result.cases:
        raise DataError(f"no ISLES24 cases (sub-* folders) found under {path}/derivatives or raw_data")
    return result


__all__ = ["MODALITY_NAMES", "CaseFiles", "DiscoveryResult", "Problem", "detect_layout", "discover_case_folder",
           "discover_cases"]
