"""Synthetic ISLES24 look-alike: tree, headers, quirks, clinical tables and the lesion signal."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medsegdiff.cli import main as cli_main
from medsegdiff.data.synthetic import (
    BASELINE_COLUMNS,
    MANIFEST_NAME,
    REAL_TRAIN_IDS,
    TRUTH_DIR,
    acute_core_path,
    generate_dataset,
    parse_shape,
    smooth_field,
)
from medsegdiff.errors import DataError


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    s = pred.sum() + gt.sum()
    return 1.0 if s == 0 else 2.0 * float((pred & gt).sum()) / float(s)


def test_zenodo_tree_and_quirks(synth_root: Path, synth_manifest: dict) -> None:
    cases = synth_manifest["cases"]
    ids = [c["case_id"] for c in cases]
    assert len(ids) == 8 and ids == sorted(ids)
    nums = [int(i[-4:]) for i in ids]
    assert all(n in REAL_TRAIN_IDS for n in nums)
    assert (synth_root / "clinical_data-description.xlsx").is_file()
    for i, sid in enumerate(ids):
        d1 = synth_root / "derivatives" / sid / "ses-01"
        assert (synth_root / "raw_data" / sid / "ses-01" / f"{sid}_ses-01_ncct.nii.gz").is_file()
        for m in ("tmax", "mtt", "cbf", "cbv"):
            assert (d1 / "perfusion-maps" / f"{sid}_ses-01_space-ncct_{m}.nii.gz").is_file()
        assert (d1 / f"{sid}_ses-01_space-ncct_cta.nii.gz").is_file() == (i != 7)  # last case: no CTA
        mask = synth_root / "derivatives" / sid / "ses-02" / f"{sid}_ses-02_space-ncct_lesion-msk.nii.gz"
        assert mask.is_file()
        assert mask.with_name(mask.name[:-3]).is_file() == (i == 0)  # stray uncompressed duplicate
        assert (synth_root / "phenotype" / sid / "ses-01" / f"{sid}_ses-01_demographic_baseline.xlsx").is_file()
        assert (synth_root / "phenotype" / sid / "ses-02" / f"{sid}_ses-02_outcome.xlsx").is_file()
    assert cases[2]["quirks"]["empty_mask"] and cases[2]["lesion_voxels"] == 0
    assert all(c["lesion_voxels"] > 0 for j, c in enumerate(cases) if j != 2)


def test_headers_geometry_and_dtypes(synth_root: Path, synth_manifest: dict) -> None:
    for i, c in enumerate(synth_manifest["cases"]):
        sid = c["case_id"]
        ncct = sitk.ReadImage(str(synth_root / "raw_data" / sid / "ses-01" / f"{sid}_ses-01_ncct.nii.gz"))
        assert ncct.GetPixelID() == sitk.sitkInt16
        assert list(ncct.GetSize()) == c["size"]
        sx, sy, sz = ncct.GetSpacing()
        assert sx == pytest.approx(sy) and sz / sx > 1.5  # anisotropic, thick slices
        x, y, z = ncct.GetSize()
        assert 180 < x * sx < 270 and 120 < z * sz < 160  # head-sized physical extent
        d = np.array(ncct.GetDirection()).reshape(3, 3)
        np.testing.assert_allclose(d @ d.T, np.eye(3), atol=1e-6)
        if i % 4 == 1:
            np.testing.assert_allclose(d, np.diag([-1.0, -1.0, 1.0]), atol=1e-6)
        if i % 4 == 3:  # oblique (gantry tilt about x)
            assert abs(d[1, 2]) > 0.05
        cbf = sitk.ReadImage(str(synth_root / "derivatives" / sid / "ses-01" / "perfusion-maps"
                                 / f"{sid}_ses-01_space-ncct_cbf.nii.gz"))
        assert cbf.GetPixelID() == sitk.sitkFloat32 and cbf.GetSize() == ncct.GetSize()
        do = np.abs(np.subtract(cbf.GetOrigin(), ncct.GetOrigin())).max()
        dd = np.abs(np.subtract(cbf.GetDirection(), ncct.GetDirection())).max()
        assert 0 < max(do, dd) < 1e-3  # perturbed, but below the default snapping tolerance


def test_scaled_uint16_mask_header(synth_root: Path, synth_manifest: dict) -> None:
    c = synth_manifest["cases"][1]
    assert c["quirks"]["mask_scaled_uint16"]
    sid = c["case_id"]
    path = synth_root / "derivatives" / sid / "ses-02" / f"{sid}_ses-02_space-ncct_lesion-msk.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    assert struct.unpack("<h", raw[70:72])[0] == 512  # datatype uint16
    slope, inter = struct.unpack("<ff", raw[112:120])
    assert slope == pytest.approx(1 / 65535) and inter == 0.0
    stored = np.frombuffer(raw[352:], dtype="<u2")
    assert set(np.unique(stored).tolist()) == {0, 65535}
    scaled = _read(path)  # SimpleITK applies the slope
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(np.unique(scaled), [0.0, 1.0], atol=1e-6)
    assert int((scaled > 0).sum()) == c["lesion_voxels"]


def test_perfusion_maps_zero_outside_slab_and_lesion_mostly_inside(synth_root: Path, synth_manifest: dict) -> None:
    for c in synth_manifest["cases"]:
        sid = c["case_id"]
        tmax = _read(synth_root / "derivatives" / sid / "ses-01" / "perfusion-maps" / f"{sid}_ses-01_space-ncct_tmax.nii.gz")
        lo, hi = c["slab"]
        assert not tmax[:lo].any() and not tmax[hi:].any()
        assert (tmax[lo:hi] != 0).mean() > 0.1  # brain inside the slab
        if c["lesion_voxels"]:
            assert c["lesion_in_slab_fraction"] >= 0.7


def test_clinical_tables(synth_root: Path, synth_root_2024: Path, synth_manifest: dict) -> None:
    sid = synth_manifest["cases"][0]["case_id"]
    xlsx = synth_root / "phenotype" / sid / "ses-01" / f"{sid}_ses-01_demographic_baseline.xlsx"
    with zipfile.ZipFile(xlsx) as zf:
        assert zf.testzip() is None
        assert {"[Content_Types].xml", "xl/workbook.xml", "xl/worksheets/sheet1.xml"} <= set(zf.namelist())
        sheet = zf.read("xl/worksheets/sheet1.xml").decode()
    assert "<t>NIHSS at admission</t>" in sheet and "<t>Onset to door</t>" in sheet
    csvs = sorted(synth_root_2024.glob("batch_*/phenotype/*/ses-01/*_demographic_baseline.csv"))
    assert len(csvs) == 6
    rows = list(csv.reader(csvs[0].open()))
    assert tuple(rows[0]) == BASELINE_COLUMNS and len(rows) == 2
    onset = rows[1][BASELINE_COLUMNS.index("Onset to door")]
    assert onset == "" or (len(onset) == 8 and onset[2] == ":" and onset[5] == ":")
    outcomes = sorted(synth_root_2024.glob("batch_*/phenotype/*/ses-02/*_ses-01_outcome.csv"))
    assert len(outcomes) == 6


def test_2024_layout(synth_root_2024: Path) -> None:
    batches = sorted(p.name for p in synth_root_2024.glob("batch_*"))
    assert batches == ["batch_1", "batch_2", "batch_3"]
    masks = sorted(synth_root_2024.glob("batch_*/derivatives/*/ses-02/*_ses-02_lesion-msk.nii.gz"))
    assert len(masks) == 6 and not any("space-ncct" in m.name for m in masks)
    assert len(list(synth_root_2024.glob("batch_*/raw_data/*/ses-01/*_ncct.nii.gz"))) == 6


def test_determinism_reuse_and_refusal(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", cases=2, seed=5, shape=(16, 20, 8))
    b = generate_dataset(tmp_path / "b", cases=2, seed=5, shape=(16, 20, 8))
    assert a == b
    for rel in ("derivatives/{s}/ses-01/perfusion-maps/{s}_ses-01_space-ncct_cbf.nii.gz",
                "raw_data/{s}/ses-01/{s}_ses-01_ncct.nii.gz"):
        np.testing.assert_array_equal(_read(tmp_path / "a" / rel.format(s=a[1])), _read(tmp_path / "b" / rel.format(s=a[1])))
    assert sitk.ReadImage(str(tmp_path / "a" / "raw_data" / a[0] / "ses-01" / f"{a[0]}_ses-01_ncct.nii.gz")).GetSize() == (16, 20, 8)
    mtime = (tmp_path / "a" / MANIFEST_NAME).stat().st_mtime_ns
    assert generate_dataset(tmp_path / "a", cases=2, seed=5, shape=(16, 20, 8)) == a  # reused
    assert (tmp_path / "a" / MANIFEST_NAME).stat().st_mtime_ns == mtime
    with pytest.raises(DataError, match=r"synthetic output folder .*a is not empty"):
        generate_dataset(tmp_path / "a", cases=3, seed=5, shape=(16, 20, 8))


def test_parse_shape_errors() -> None:
    assert parse_shape("64x72x12") == (64, 72, 12)
    assert parse_shape("tiny") == "tiny"
    with pytest.raises(DataError, match="synthetic shape 'huge' is not understood"):
        parse_shape("huge")
    with pytest.raises(DataError, match="must be three integers"):
        parse_shape((64, 72))


def test_smooth_field_unit_variance() -> None:
    f = smooth_field(np.random.default_rng(0), (20, 64, 64), (2.0, 1.0, 1.0), 6.0)
    assert f.dtype == np.float32 and f.shape == (20, 64, 64)
    assert 0.6 < float(f.std()) < 1.4 and abs(float(f.mean())) < 0.4
    # correlation length ~6 mm: neighbours 1 mm apart are strongly correlated, 30 mm apart are not
    assert np.corrcoef(f[:, :, :-1].ravel(), f[:, :, 1:].ravel())[0, 1] > 0.9
    assert abs(np.corrcoef(f[:, :, :-30].ravel(), f[:, :, 30:].ravel())[0, 1]) < 0.3


def test_cli_synth_2024(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    rc = cli_main(["synth", str(out), "--cases", "2", "--seed", "3", "--layout", "challenge2024",
                   "--shape", "12x14x6", "--no-progress"])
    assert rc == 0 and "wrote 2 synthetic cases (challenge2024 layout)" in capsys.readouterr().out
    man = json.loads((out / MANIFEST_NAME).read_text())
    assert man["params"]["layout"] == "challenge2024" and man["params"]["shape"] == [12, 14, 6]
    assert cli_main(["synth", str(tmp_path / "bad"), "--shape", "12x14"]) == 2


def test_tiny_generation_is_fast(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    generate_dataset(tmp_path / "fast", cases=8, seed=11)
    assert time.perf_counter() - t0 < 6.0  # ~1 s on an idle core; generous for a shared machine


def test_signal_baseline_mediocre_cbf_rule_better(synth_root: Path, synth_manifest: dict) -> None:
    """The official Tmax > 9 s baseline is mediocre; a CBF-informed rule is clearly better.

    Dice is computed here with numpy from the files on disk (cases with a non-empty mask).
    """
    base, oracle = [], []
    for c in synth_manifest["cases"]:
        sid = c["case_id"]
        pm = synth_root / "derivatives" / sid / "ses-01" / "perfusion-maps"
        tmax = _read(pm / f"{sid}_ses-01_space-ncct_tmax.nii.gz")
        cbf = _read(pm / f"{sid}_ses-01_space-ncct_cbf.nii.gz")
        gt = _read(synth_root / "derivatives" / sid / "ses-02" / f"{sid}_ses-02_space-ncct_lesion-msk.nii.gz") > 0
        if not gt.any():
            # the empty-mask case still has a hypoperfused region: the baseline predicts a lesion
            assert (tmax > 9).sum() > 0
            continue
        base.append(_dice(tmax > 9, gt))
        oracle.append(_dice((tmax > 6) & (cbf < 15), gt))
    assert len(base) == 7
    assert 0.25 <= float(np.mean(base)) <= 0.5, base
    assert float(np.mean(oracle)) >= float(np.mean(base)) + 0.2, (base, oracle)
    assert float(np.mean(oracle)) < 0.95  # not trivially perfect (infarct growth, noise, slab)


def test_optional_ctp_is_4d_on_the_ncct_grid(tmp_path: Path) -> None:
    from medsegdiff.config.data import DataConfig
    from medsegdiff.data.discovery import discover_cases
    from medsegdiff.data.loading import load_case

    generate_dataset(tmp_path / "ctp", cases=1, seed=2, shape=(12, 14, 8), ctp=True)
    case = discover_cases(tmp_path / "ctp", ["ctp", "tmax"]).cases[0]
    img = sitk.ReadImage(str(case.images["ctp"]))
    assert img.GetDimension() == 4 and img.GetSize() == (12, 14, 8, 32)
    loaded = load_case(case, DataConfig(modalities=["ctp", "tmax"]))
    assert loaded.images["ctp"].shape == (32, 8, 14, 12) and loaded.images["tmax"].shape == (8, 14, 12)


def test_acute_core_inside_the_lesion_and_added_to_older_datasets(synth_root: Path, synth_manifest: dict,
                                                                   tmp_path: Path) -> None:
    for c in synth_manifest["cases"]:
        core = _read(acute_core_path(synth_root, c["case_id"])) > 0
        mask = _read(next((synth_root / "derivatives" / c["case_id"] / "ses-02").glob("*lesion-msk.nii.gz"))) > 0
        assert core.shape == mask.shape and not (core & ~mask).any()  # the core is part of the follow-up lesion
        if c["quirks"]["empty_mask"]:
            assert not core.any()
        else:  # growth is 10-35 % of the core (rounded to whole voxels)
            assert round(mask.sum() / 1.35) <= core.sum() <= max(1, round(mask.sum() / 1.1))
    # a dataset written before the cores were gets them on reuse (with or without CTP, which the
    # re-synthesis skips); nothing else changes
    for ctp in (False, True):
        root = tmp_path / f"old_ctp{ctp}"
        ids = generate_dataset(root, cases=3, seed=2, shape=(16, 20, 8), ctp=ctp)
        before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
        shutil.rmtree(root / TRUTH_DIR)
        (root / TRUTH_DIR).mkdir()  # even a half-written truth folder is completed
        assert generate_dataset(root, cases=3, seed=2, shape=(16, 20, 8), ctp=ctp) == ids
        assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
