"""Loading and checking cases: geometry, grid snapping/rejection, bad files, policies."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medsegdiff.config.data import DataConfig
from medsegdiff.data.discovery import discover_cases
from medsegdiff.data.loading import (
    CaseError,
    Geometry,
    load_case,
    load_cases,
    read_image,
    skipped_summary,
)
from medsegdiff.errors import DataError

MODS = ["cbf", "cbv", "mtt", "tmax", "cta"]


def _cfg(**kw) -> DataConfig:
    return dataclasses.replace(DataConfig(), modalities=list(kw.pop("modalities", MODS)), **kw)


def _rewrite(path: Path, fn) -> None:
    """Read ``path``, let ``fn(array, image) -> (array, origin)`` change it, write it back."""
    img = sitk.ReadImage(str(path))
    arr, origin = fn(sitk.GetArrayFromImage(img), img)
    out = sitk.GetImageFromArray(arr)
    out.SetSpacing(img.GetSpacing())
    out.SetOrigin(origin)
    out.SetDirection(img.GetDirection())
    sitk.WriteImage(out, str(path), True)


@pytest.fixture()
def damaged(synth_root: Path, copy_dataset):
    """A writable copy of the Zenodo fixture and its discovery result."""
    root = copy_dataset(synth_root)
    return root, discover_cases(root, MODS)


def test_load_all_good_cases(synth_root: Path, synth_manifest: dict) -> None:
    res = discover_cases(synth_root, ["ncct", *MODS])
    loaded, skipped = load_cases(res.cases, _cfg(modalities=["ncct", *MODS]))
    last = synth_manifest["cases"][-1]["case_id"]
    assert [c.case_id for c in loaded] == res.case_ids[:-1]
    assert len(skipped) == 1 and skipped[0][0] == last and "missing modality cta" in skipped[0][1]
    for case, info in zip(loaded, synth_manifest["cases"]):
        assert case.geometry.size == tuple(info["size"])
        assert list(case.images) == ["ncct", *MODS]
        for arr in case.images.values():
            assert arr.dtype == np.float32 and arr.shape == case.geometry.shape_zyx
        assert case.mask.dtype == np.uint8 and set(np.unique(case.mask)) <= {0, 1}
        assert int(case.mask.sum()) == info["lesion_voxels"]  # incl. the 0/65535 masks and the empty one
        assert all(v == 0 for v in case.nonfinite.values())
        # derivatives carry ~1e-4 mm / 1e-5 affine noise: snapped, noted, not an error
        assert any("snapped to the reference grid" in n for n in case.notes)
    assert loaded[2].mask.sum() == 0  # empty mask loads as empty


def test_scaled_uint16_mask_binarises(synth_root: Path, synth_manifest: dict) -> None:
    info = synth_manifest["cases"][1]
    assert info["quirks"]["mask_scaled_uint16"]
    case = discover_cases(synth_root, ["tmax"]).by_id()[info["case_id"]]
    raw = sitk.ReadImage(str(case.mask))
    assert raw.GetPixelID() == sitk.sitkFloat32  # SimpleITK applied scl_slope = 1/65535
    loaded = load_case(case, _cfg(modalities=["tmax"]))
    assert set(np.unique(loaded.mask).tolist()) == {0, 1} and int(loaded.mask.sum()) == info["lesion_voxels"]


def test_geometry_round_trip_and_volume() -> None:
    img = sitk.Image([5, 6, 7], sitk.sitkFloat32)
    img.SetSpacing((0.5, 0.4, 2.0))
    img.SetOrigin((10.0, -20.0, -300.5))
    c, s = np.cos(0.2), np.sin(0.2)
    img.SetDirection((1, 0, 0, 0, c, -s, 0, s, c))
    g = Geometry.from_image(img)
    assert g.size == (5, 6, 7) and g.shape_zyx == (7, 6, 5)
    assert g.voxel_volume_ml == pytest.approx(0.5 * 0.4 * 2.0 / 1000)
    ref = g.reference_image()
    assert ref.GetSize() == (5, 6, 7) and ref.GetPixelID() == sitk.sitkUInt8
    assert Geometry.from_image(ref) == g
    np.testing.assert_allclose(ref.TransformIndexToPhysicalPoint((1, 2, 3)), img.TransformIndexToPhysicalPoint((1, 2, 3)))
    assert Geometry.from_dict(g.to_dict()) == g
    with pytest.raises(DataError, match="geometry record .* is invalid"):
        Geometry.from_dict({"size": [1, 2, 3]})


def test_deleted_file(damaged) -> None:
    root, res = damaged
    case = res.cases[3]
    case.images["mtt"].unlink()
    with pytest.raises(CaseError, match=rf"^case {case.case_id}: image file .*_mtt\.nii\.gz does not exist$") as ei:
        load_case(case, _cfg())
    assert ei.value.kind == "missing_file" and ei.value.path == case.images["mtt"]
    loaded, skipped = load_cases([case, res.cases[0]], _cfg(on_error="skip"))
    assert [c.case_id for c in loaded] == [res.cases[0].case_id]
    assert skipped == [(case.case_id, str(ei.value))]
    assert skipped_summary(skipped).startswith("1 case(s) skipped:\n  " + case.case_id)
    with pytest.raises(DataError, match=r"does not exist; stopping because data.on_error=fail \(set data.on_error=skip"):
        load_cases([res.cases[0], case], _cfg(on_error="fail"))


def test_truncated_gzip(damaged) -> None:
    root, res = damaged
    case = res.cases[4]
    path = case.images["cbf"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert sitk.ReadImage(str(path)).GetSize()  # SimpleITK itself reads it silently
    with pytest.raises(DataError, match=r"is truncated \(gzip stream ends early"):
        read_image(path)
    with pytest.raises(CaseError, match=rf"^case {case.case_id}: image file .*_cbf\.nii\.gz is truncated") as ei:
        load_case(case, _cfg())
    assert ei.value.kind == "unreadable"
    path.write_bytes(b"not a gzip file at all" * 30)
    with pytest.raises(DataError, match="is not a valid gzip file"):
        read_image(path)


def test_empty_files_and_images(damaged) -> None:
    root, res = damaged
    case = res.cases[5]
    case.images["cbv"].write_bytes(b"")
    with pytest.raises(CaseError, match=r"_cbv\.nii\.gz is empty \(0 bytes\)"):
        load_case(case, _cfg())
    case2 = res.cases[6]
    _rewrite(case2.images["cbv"], lambda a, img: (np.zeros_like(a), img.GetOrigin()))
    with pytest.raises(CaseError, match=rf"case {case2.case_id}: cbv file .*_cbv\.nii\.gz is an empty image \(all voxels are 0\)") as ei:
        load_case(case2, _cfg())
    assert ei.value.kind == "empty"
    # an empty mask is a valid (lesion-free) case
    _rewrite(case2.mask, lambda a, img: (np.zeros_like(a), img.GetOrigin()))
    assert load_case(case2, _cfg(modalities=["tmax"])).mask.sum() == 0


def test_origin_shift_rejected(damaged) -> None:
    root, res = damaged
    case = res.cases[1]
    _rewrite(case.images["tmax"], lambda a, img: (a, tuple(np.add(img.GetOrigin(), (1.0, 0.0, 0.0)))))
    with pytest.raises(CaseError) as ei:
        load_case(case, _cfg())
    msg = str(ei.value)
    assert msg.startswith(f"case {case.case_id}: tmax file {case.images['tmax']} is not on the reference grid of "
                          f"{case.case_id}_ses-01_ncct.nii.gz: origin (")
    assert "max difference 1 mm > tolerance 0.001" in msg and "resample it onto the NCCT grid" in msg
    assert ei.value.kind == "grid_mismatch"
    # a looser tolerance accepts it
    assert load_case(case, _cfg(grid_tolerance=2.0)).case_id == case.case_id


def test_size_mismatch_and_tolerance_applies(damaged) -> None:
    root, res = damaged
    case = res.cases[0]
    _rewrite(case.images["cbv"], lambda a, img: (a[:, :, :-1].copy(), img.GetOrigin()))
    with pytest.raises(CaseError, match=r"cbv file .* is not on the reference grid .*: size \(\d+, \d+, \d+\) != reference"):
        load_case(case, _cfg())
    # the ~1e-4 mm origin noise of the derivatives is rejected by a much stricter tolerance
    with pytest.raises(CaseError, match="origin .* > tolerance 1e-07"):
        load_case(res.cases[3], _cfg(grid_tolerance=1e-7))


def test_nonfinite_replaced_and_counted(damaged) -> None:
    root, res = damaged
    case = res.cases[3]

    def poison(a: np.ndarray, img):
        a = a.copy()
        a.reshape(-1)[:5] = np.nan
        a.reshape(-1)[5:7] = np.inf
        a.reshape(-1)[7] = -np.inf
        return a, img.GetOrigin()

    _rewrite(case.images["cbf"], poison)
    loaded = load_case(case, _cfg())
    assert loaded.nonfinite["cbf"] == 8 and loaded.nonfinite["tmax"] == 0
    assert np.isfinite(loaded.images["cbf"]).all() and not loaded.images["cbf"].reshape(-1)[:8].any()
    assert "cbf: 8 non-finite voxels replaced by 0" in loaded.notes


def test_missing_modality_policy_and_reference_without_ncct(damaged) -> None:
    root, res = damaged
    incomplete = res.cases[-1]
    loaded, skipped = load_cases([incomplete], _cfg(missing_modality="skip_case"))
    assert loaded == [] and skipped[0][1] == incomplete.missing_message()
    with pytest.raises(DataError, match="missing modality cta .*stopping because data.missing_modality=fail"):
        load_cases([incomplete], _cfg(missing_modality="fail"))
    with pytest.raises(CaseError, match=f"case {incomplete.case_id}: missing modality cta"):
        load_case(incomplete, _cfg())
    # lazy loading fills `skipped` while iterating
    it, skipped = load_cases(res.cases[-2:], _cfg(), lazy=True)
    assert skipped == [] and [c.case_id for c in it] == [res.cases[-2].case_id] and len(skipped) == 1
    # no NCCT on disk and not an input: the first modality gives the grid
    case = res.cases[2]
    ncct_geom = Geometry.from_image(sitk.ReadImage(str(case.ncct)))
    case.ncct.unlink()
    case.ncct = None
    loaded_case = load_case(case, _cfg(modalities=["tmax", "cbf"]))
    assert loaded_case.geometry.size == ncct_geom.size
    assert np.allclose(loaded_case.geometry.origin, ncct_geom.origin, atol=1e-3)


def test_nonfinite_in_mha_case_folder(synth_root: Path, tmp_path: Path) -> None:
    """Grand-Challenge style .mha inputs keep NaN in SimpleITK; they are replaced and counted too."""
    src = discover_cases(synth_root, ["tmax", "cbf"]).cases[0]
    folder = tmp_path / "gc_case"
    folder.mkdir()
    for m in ("tmax", "cbf"):
        img = sitk.ReadImage(str(src.images[m]))
        if m == "cbf":
            arr = sitk.GetArrayFromImage(img)
            arr[0, 0, :3] = np.nan
            out = sitk.GetImageFromArray(arr)
            out.CopyInformation(img)
            img = out
        sitk.WriteImage(img, str(folder / f"{m}.mha"))
    case = discover_cases(folder, ["tmax", "cbf"], require_mask=False).cases[0]
    assert case.images["cbf"].suffix == ".mha"
    loaded = load_case(case, _cfg(modalities=["tmax", "cbf"]))
    assert loaded.mask is None and loaded.nonfinite == {"tmax": 0, "cbf": 3}
    assert not loaded.images["cbf"][0, 0, :3].any()
