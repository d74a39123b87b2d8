"""Case discovery on both release layouts, case folders and lists of case folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from medsegdiff.data.discovery import detect_layout, discover_cases
from medsegdiff.errors import DataError

MODS = ["ncct", "cta", "cbf", "cbv", "mtt", "tmax"]


def test_zenodo_layout(synth_root: Path, synth_manifest: dict) -> None:
    res = discover_cases(synth_root, MODS)
    ids = [c["case_id"] for c in synth_manifest["cases"]]
    assert res.layout == "zenodo" and res.case_ids == ids
    first = res.cases[0]
    sid = first.case_id
    assert first.ncct == synth_root / "raw_data" / sid / "ses-01" / f"{sid}_ses-01_ncct.nii.gz"
    assert first.images["ncct"] == first.ncct
    assert first.images["cbf"] == (synth_root / "derivatives" / sid / "ses-01" / "perfusion-maps"
                                   / f"{sid}_ses-01_space-ncct_cbf.nii.gz")
    assert first.mask == synth_root / "derivatives" / sid / "ses-02" / f"{sid}_ses-02_space-ncct_lesion-msk.nii.gz"
    assert first.extra["baseline"].name == f"{sid}_ses-01_demographic_baseline.xlsx"
    assert first.extra["outcome"].name == f"{sid}_ses-02_outcome.xlsx"
    # the last case has no CTA: reported precisely, case kept but incomplete
    last = res.cases[-1]
    assert last.missing == ["cta"] and not last.complete
    assert [c.case_id for c in res.incomplete] == [last.case_id]
    kinds = sorted((p.case_id, p.kind) for p in res.problems)
    assert kinds == sorted([(sid, "duplicate"), (last.case_id, "missing_modality")])
    msg = next(p.message for p in res.problems if p.kind == "missing_modality")
    assert msg == (f"case {last.case_id}: missing modality cta (expected ses-01/{last.case_id}_ses-01_space-ncct_cta.nii.gz"
                   f" under {synth_root / 'derivatives' / last.case_id})")
    assert last.missing_message() == msg


def test_stray_uncompressed_mask_is_deduplicated(synth_root: Path) -> None:
    res = discover_cases(synth_root, ["cbf"])
    case = res.cases[0]
    # unrequested modalities are still listed (e.g. Tmax for the official baseline)
    assert case.extra["tmax"].name == f"{case.case_id}_ses-01_space-ncct_tmax.nii.gz" and "cbf" not in case.extra
    assert case.mask.name.endswith("_lesion-msk.nii.gz")
    assert case.extra["stray_mask"] == case.mask.with_name(case.mask.name[:-3])
    dup = [p for p in res.problems if p.kind == "duplicate"]
    assert len(dup) == 1
    assert dup[0].message == f"case {case.case_id}: duplicate mask file {case.extra['stray_mask']} ignored; using {case.mask}"


def test_challenge2024_layout(synth_root_2024: Path) -> None:
    res = discover_cases(synth_root_2024, ["tmax", "cbf"])
    assert res.layout == "challenge2024" and len(res.cases) == 6
    assert res.case_ids == sorted(res.case_ids)
    for c in res.cases:
        assert c.mask is not None and c.mask.name == f"{c.case_id}_ses-02_lesion-msk.nii.gz"
        assert c.mask.parts[-5].startswith("batch_")
        assert c.ncct is not None and c.complete
        assert c.extra["baseline"].suffix == ".csv" and c.extra["outcome"].name == f"{c.case_id}_ses-01_outcome.csv"
    assert discover_cases(synth_root_2024, ["tmax"], layout="challenge2024").case_ids == res.case_ids
    with pytest.raises(DataError, match="looks like the challenge2024 layout, but data.layout is zenodo"):
        discover_cases(synth_root_2024, ["tmax"], layout="zenodo")


def test_single_case_folder_and_list(synth_root: Path, tmp_path: Path) -> None:
    res = discover_cases(synth_root, ["cbf", "tmax"])
    sid = res.cases[1].case_id
    # a derivatives/{sid} folder of a release: NCCT is taken from the sibling raw_data/{sid}
    one = discover_cases(synth_root / "derivatives" / sid, ["ncct", "cbf", "tmax"])
    assert one.layout == "case_folder" and one.case_ids == [sid]
    assert one.cases[0].ncct == res.cases[1].ncct and one.cases[0].images["tmax"] == res.cases[1].images["tmax"]
    # flat user folders with plain names, no mask, given as a list
    folders = []
    for k, c in enumerate(res.cases[:2]):
        f = tmp_path / f"patient{k}"
        f.mkdir()
        shutil.copy(c.images["cbf"], f / "cbf.nii.gz")
        shutil.copy(c.images["tmax"], f / "tmax.nii.gz")
        folders.append(f)
    many = discover_cases(folders, ["cbf", "tmax"], require_mask=False)
    assert many.case_ids == ["patient0", "patient1"]
    assert all(c.complete and c.mask is None for c in many.cases)
    assert many.cases[1].images["tmax"] == folders[1] / "tmax.nii.gz"
    needs_mask = discover_cases(folders[0], ["cbf"])
    assert needs_mask.cases[0].missing == ["mask"]
    assert needs_mask.problems[0].message == f"case patient0: no lesion mask (*lesion-msk.nii.gz) under {folders[0]}"
    with pytest.raises(DataError, match="case ID patient0 appears in two case folders"):
        discover_cases([folders[0], folders[0]], ["cbf"], require_mask=False)


def test_train_parent_folder_and_mask_variants(synth_root: Path, tmp_path: Path) -> None:
    parent = tmp_path / "isles"
    shutil.copytree(synth_root / "derivatives", parent / "train" / "derivatives")
    shutil.copytree(synth_root / "raw_data", parent / "train" / "raw_data")
    sid = sorted(p.name for p in (parent / "train" / "derivatives").iterdir())[3]
    ses2 = parent / "train" / "derivatives" / sid / "ses-02"
    # organiser-style second mask next to the training mask: the plain one wins, the other is reported
    shutil.copy(ses2 / f"{sid}_ses-02_space-ncct_lesion-msk.nii.gz", ses2 / f"{sid}_ses-02_ncct-masked_lesion-msk.nii.gz")
    res = discover_cases(parent, ["tmax"])
    assert res.root == parent / "train" and detect_layout(parent) == "case_folder"
    case = res.by_id()[sid]
    assert case.mask.name == f"{sid}_ses-02_space-ncct_lesion-msk.nii.gz"
    assert any(p.case_id == sid and "ncct-masked" in p.message for p in res.problems)


def test_missing_mask_and_ncct_reported(synth_root: Path, copy_dataset) -> None:
    root = copy_dataset(synth_root)
    sid = sorted(p.name for p in (root / "derivatives").iterdir())[4]
    for m in (root / "derivatives" / sid / "ses-02").glob("*lesion-msk*"):
        m.unlink()
    (root / "raw_data" / sid / "ses-01" / f"{sid}_ses-01_ncct.nii.gz").unlink()
    res = discover_cases(root, ["ncct", "tmax"])
    case = res.by_id()[sid]
    assert case.missing == ["ncct", "mask"] and case.ncct is None and case.mask is None
    msgs = [p.message for p in res.problems if p.case_id == sid]
    assert msgs == [
        f"case {sid}: missing modality ncct (expected {sid}_ses-01_ncct.nii.gz under {root / 'raw_data' / sid})",
        f"case {sid}: no lesion mask (*lesion-msk.nii.gz) under {root / 'derivatives' / sid}",
    ]
    # without a required mask only the NCCT is missing; without NCCT requested the case is complete
    assert discover_cases(root, ["tmax"], require_mask=False).by_id()[sid].complete


def test_bad_roots(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data root .*nope does not exist; set data.root"):
        discover_cases(tmp_path / "nope", ["tmax"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no ISLES24 case found under .*empty"):
        discover_cases(tmp_path / "empty", ["tmax"])
    (tmp_path / "ds" / "derivatives").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no ISLES24 cases \(sub-\* folders\) found under .*ds"):
        discover_cases(tmp_path / "ds", ["tmax"])
    with pytest.raises(DataError, match="unknown modality 'adc'; allowed: ncct, cta"):
        discover_cases(tmp_path / "ds", ["adc"])
    with pytest.raises(DataError, match="has no zenodo layout"):
        discover_cases(tmp_path / "empty", ["tmax"], layout="zenodo")
