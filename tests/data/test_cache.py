"""The prepared cache: exact geometry round-trip, resume after interruption, invalidation, errors."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import medsegdiff.data.preprocess as preprocess
from medsegdiff.config.data import DataConfig
from medsegdiff.data.cache import Manifest
from medsegdiff.data.discovery import discover_cases
from medsegdiff.data.loading import Geometry
from medsegdiff.data.preprocess import prepare_dataset
from medsegdiff.errors import DataError

MODS = ["cbf", "cbv", "mtt", "tmax", "cta"]


def _cfg(**kw) -> DataConfig:
    return DataConfig(image_size=kw.pop("image_size", 16), **kw)


def _files(cache):
    return {p.relative_to(cache): p.stat().st_mtime_ns for p in sorted(cache.rglob("*")) if p.is_file()}


def _arrays(cache, cid):
    case = Manifest.open(cache).case(cid)
    return np.asarray(case.image), np.asarray(case.mask), case.native_mask(), case.native_tmax()


@pytest.fixture(scope="module")
def prepared(synth_root, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache") / "c"
    return prepare_dataset(synth_root, cache, _cfg(), workers=1, progress=False)


def test_cache_round_trips_the_native_geometry_exactly(prepared, synth_root):
    cases = discover_cases(synth_root, MODS).by_id()
    assert len(prepared) == 7
    assert [s["case_id"] for s in prepared.skipped] == [c for c in cases if cases[c].missing]  # no-CTA case
    assert "missing modality cta" in prepared.skipped[0]["reason"]
    for cid in prepared.case_ids:
        case = prepared.case(cid)
        ncct = sitk.ReadImage(str(cases[cid].ncct))
        assert case.native_geometry == Geometry.from_image(ncct)  # exact, through JSON
        grid = case.cache_geometry
        assert grid.origin == case.native_geometry.origin and grid.direction == case.native_geometry.direction
        nx, ny, nz = case.native_geometry.size
        assert grid.size == (16, 16, nz)
        np.testing.assert_allclose(ncct.TransformIndexToPhysicalPoint((nx - 1, ny - 1, nz - 1)),
                                   grid.reference_image().TransformIndexToPhysicalPoint((15, 15, nz - 1)), atol=1e-6)
        # arrays: float16 (C, Z, H, W) in [0, 1]; masks binary; native copies identical to the files
        assert case.image.dtype == np.float16 and case.image.shape == (5, nz, 16, 16)
        assert isinstance(case.image, np.memmap) and 0 <= case.image.min() and case.image.max() <= 1
        assert case.mask.dtype == np.uint8 and set(np.unique(case.mask)) <= {0, 1}
        mask_file = sitk.GetArrayFromImage(sitk.ReadImage(str(cases[cid].mask)))
        assert np.array_equal(case.native_mask(), (mask_file > 0).astype(np.uint8))
        tmax = sitk.GetArrayFromImage(sitk.ReadImage(str(cases[cid].images["tmax"]))).astype(np.float32)
        assert np.array_equal(case.native_tmax(), tmax)
        assert case.lesion["voxels"] == int((mask_file > 0).sum())
        assert case.lesion["ml"] == pytest.approx(case.lesion["voxels"] * np.prod(ncct.GetSpacing()) / 1000)
        assert case.lesion_slices.tolist() == [bool(s.any()) for s in np.asarray(case.mask)]
    empty = [c for c in prepared.case_ids if prepared.case(c).lesion["voxels"] == 0]
    assert len(empty) == 1  # the synthetic set has one empty mask
    clone = pickle.loads(pickle.dumps(prepared.case(prepared.case_ids[0])))
    assert np.array_equal(np.asarray(clone.image), np.asarray(prepared.case(prepared.case_ids[0]).image))


def test_interrupted_prepare_resumes(synth_root, tmp_path, monkeypatch, prepared):
    cache = tmp_path / "cache"
    calls = {"n": 0}
    real = preprocess._save_npz

    def crash_on_third(path, **arrays):  # image.npy and mask.npy of case 3 are written, then: crash
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        real(path, **arrays)

    monkeypatch.setattr(preprocess, "_save_npz", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(synth_root, cache, _cfg(), workers=1, progress=False)
    monkeypatch.setattr(preprocess, "_save_npz", real)
    ids = prepared.case_ids
    assert [(cache / c / "done").exists() for c in ids[:3]] == [True, True, False]
    assert (cache / ids[2] / "image.npy").exists()  # partial case: files but no marker
    assert not (cache / ids[3]).exists()
    with pytest.raises(DataError, match=r"no prepared cache here"):
        Manifest.open(cache)  # a half-built cache never looks complete
    before = _files(cache)
    resumed = prepare_dataset(synth_root, cache, _cfg(), workers=1, progress=False)
    after = _files(cache)
    for cid in ids[:2]:  # completed cases untouched
        for rel, mtime in before.items():
            if rel.parts[0] == cid:
                assert after[rel] == mtime, rel
    assert after[Path(ids[2], "image.npy")] != before[Path(ids[2], "image.npy")]  # partial case rebuilt
    assert resumed.last_run["reused"] == 2 and resumed.last_run["prepared"] == 5
    # identical to the uninterrupted run
    assert resumed.data["cases"] == prepared.data["cases"]
    for cid in ids:
        for x, y in zip(_arrays(cache, cid), _arrays(prepared.cache_dir, cid)):
            assert np.array_equal(x, y)


def test_changed_setting_rebuilds_and_unchanged_reuses(synth_root, tmp_path):
    cache = tmp_path / "cache"
    first = prepare_dataset(synth_root, cache, _cfg(), workers=1, progress=False)
    stamp = _files(cache)
    again = prepare_dataset(synth_root, cache, _cfg(), workers=1, progress=False)
    assert again.hash == first.hash and _files(cache) == stamp  # nothing rewritten, manifest included
    cid = first.case_ids[0]
    old_cbf, old_cbv = np.array(first.case(cid).image[0]), np.array(first.case(cid).image[1])
    changed = _cfg(windows={"cbf": [0.0, 140.0]})  # other modalities keep their default windows
    with pytest.raises(DataError, match=r"the cache is stale.*medsegdiff prepare"):
        Manifest.open(cache, data_cfg=changed)
    rebuilt = prepare_dataset(synth_root, cache, changed, workers=1, progress=False)
    assert rebuilt.hash != first.hash and rebuilt.settings["windows"]["cbf"] == [0.0, 140.0]
    after = _files(cache)
    assert all(after[k] != v for k, v in stamp.items() if k.name == "image.npy")  # every case rebuilt
    new_cbf = np.asarray(rebuilt.case(cid).image[0], dtype=np.float32)
    assert not np.array_equal(new_cbf, old_cbf)
    old_cbf = old_cbf.astype(np.float32)
    # min(r / 140, 1) <= min(r / 70, 1) voxel-wise, and resampling has non-negative weights
    assert np.all(new_cbf <= old_cbf + 1e-2) and new_cbf.sum() < 0.9 * old_cbf.sum()
    assert np.array_equal(np.asarray(rebuilt.case(cid).image[1]), old_cbv)  # CBV window unchanged
    Manifest.open(cache, data_cfg=changed)  # up to date now
    resized = prepare_dataset(synth_root, cache, _cfg(image_size=12), workers=1, progress=False)
    assert resized.case(cid).image.shape[-2:] == (12, 12)


def test_worker_processes_give_the_same_cache(synth_root, tmp_path, prepared):
    pooled = prepare_dataset(synth_root, tmp_path / "cache", _cfg(), workers=2, progress=False)
    assert pooled.data["cases"] == prepared.data["cases"]
    for cid in pooled.case_ids[:3]:
        for x, y in zip(_arrays(pooled.cache_dir, cid), _arrays(prepared.cache_dir, cid)):
            assert np.array_equal(x, y)


def test_bad_case_is_skipped_or_stops(synth_root, copy_dataset, tmp_path):
    root = copy_dataset(synth_root)
    cases = discover_cases(root, MODS).by_id()
    victim = sorted(c for c in cases if not cases[c].missing)[1]
    path = cases[victim].images["cbv"]
    path.write_bytes(path.read_bytes()[:200])  # truncated gzip
    skipped = prepare_dataset(root, tmp_path / "a", _cfg(), workers=1, progress=False)
    assert victim not in skipped.case_ids
    reasons = {s["case_id"]: s["reason"] for s in skipped.skipped}
    assert victim in reasons and "cbv" in reasons[victim]
    with pytest.raises(DataError, match=rf"case '{victim}'.*data.on_error=fail"):
        prepare_dataset(root, tmp_path / "b", _cfg(on_error="fail"), workers=1, progress=False)
    with pytest.raises(DataError, match=r"missing modality cta.*data.missing_modality=fail"):
        prepare_dataset(root, tmp_path / "c", _cfg(missing_modality="fail"), workers=1, progress=False)


def test_missing_root_and_manifest_errors(tmp_path, prepared):
    with pytest.raises(DataError, match=r"data root not found"):
        prepare_dataset(tmp_path / "nope", tmp_path / "cache", _cfg(), progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(prepared.cache_dir, broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"unreadable manifest.*medsegdiff prepare"):
        Manifest.open(broken)
    data = json.loads((prepared.cache_dir / "manifest.json").read_text())
    data["format_version"] = 0
    (broken / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"cache format 0 is not the current format"):
        Manifest.open(broken)
    with pytest.raises(DataError, match=r"case 'sub-x' is not in the cache"):
        prepared.case("sub-x")


def test_prepare_command(synth_root, tmp_path, capsys):
    from medsegdiff.cli import main

    out = tmp_path / "cache"
    # overrides may follow the options (argparse alone would reject them there)
    assert main(["prepare", str(synth_root), "--out", str(out), "data.image_size=12", "--workers", "1",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "7 cases" in text and "7 prepared, 0 reused" in text and "missing modality cta" in text
    assert Manifest.open(out).case(Manifest.open(out).case_ids[0]).image.shape[-1] == 12
    assert main(["prepare", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "data root not found" in capsys.readouterr().err


def test_cases_without_mask_for_prediction(synth_root, copy_dataset, tmp_path):
    root = copy_dataset(synth_root)
    cases = discover_cases(root, MODS).by_id()
    victim = sorted(c for c in cases if not cases[c].missing)[1]  # [0] has a stray second mask file
    cases[victim].mask.unlink()
    training = prepare_dataset(root, tmp_path / "train", _cfg(), workers=1, progress=False)
    assert victim not in training.case_ids
    assert any(s["case_id"] == victim and "mask" in s["reason"] for s in training.skipped)
    pred = prepare_dataset(root, tmp_path / "pred", _cfg(), workers=1, progress=False, require_mask=False)
    case = pred.case(victim)
    assert not case.has_mask and int(np.asarray(case.mask).sum()) == 0
    assert case.native_tmax() is not None
    with pytest.raises(DataError, match=r"no native mask"):
        case.native_mask()
    assert all(pred.case(c).has_mask for c in pred.case_ids if c != victim)
