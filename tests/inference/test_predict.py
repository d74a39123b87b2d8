from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medsegdiff.errors import CheckpointError, ConfigError, DataError

MODALITIES = ["cbf", "tmax"]


def _make_checkpoint(run_dir: Path, modalities: list[str]) -> Path:
    import torch

    from medsegdiff.config.base import to_dict
    from medsegdiff.config.loader import config_from_dict
    from medsegdiff.nets.registry import build_model
    from medsegdiff.training.checkpoint import save_checkpoint

    cfg = config_from_dict({
        "model": {"base_channels": 8, "channel_mult": [1, 2], "norm_groups": 4, "attention_resolutions": []},
        "data": {"image_size": 16, "modalities": modalities, "prepare_workers": 1},
        "diffusion": {"respacing": "ddim2"},
        "inference": {"ensemble": 2, "batch_size": 16},
    })
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    return save_checkpoint(run_dir / "checkpoints" / "best.pt",
                           {"model": state, "ema": state, "step": 0, "config": to_dict(cfg)})


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory) -> Path:
    from medsegdiff.data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("raw") / "zenodo"
    generate_dataset(root, cases=2, seed=3, layout="zenodo", shape="tiny")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _make_checkpoint(tmp_path_factory.mktemp("run"), MODALITIES)


@pytest.fixture(scope="module")
def predicted(raw_root, checkpoint, tmp_path_factory) -> tuple[Path, list[Path]]:
    from medsegdiff.inference.predict import predict

    out = tmp_path_factory.mktemp("pred")
    written = predict(checkpoint, raw_root, out, overrides=["inference.combine=staple"], progress=False)
    return out, written


def _ncct(raw_root: Path, case_id: str) -> sitk.Image:
    (path,) = sorted(raw_root.glob(f"raw_data/{case_id}/ses-01/*ncct.nii.gz"))
    return sitk.ReadImage(str(path))


def test_predict_end_to_end_writes_native_geometry(predicted, raw_root):
    out, written = predicted
    case_ids = [p.name[: -len(".nii.gz")] for p in written]
    assert len(case_ids) == 2 and all(c.startswith("sub-stroke") for c in case_ids)
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [r["case_id"] for r in rows] == case_ids
    for cid, row in zip(case_ids, rows):
        ref = _ncct(raw_root, cid)
        for suffix, pixel in (("", sitk.sitkUInt8), ("_prob", sitk.sitkFloat32), ("_uncertainty", sitk.sitkFloat32)):
            img = sitk.ReadImage(str(out / f"{cid}{suffix}.nii.gz"))
            assert img.GetPixelID() == pixel
            assert img.GetSize() == ref.GetSize()
            np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-5)
            np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-4)
            np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-5)
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{cid}.nii.gz")))
        prob = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{cid}_prob.nii.gz")))
        assert set(np.unique(mask)) <= {0, 1}
        assert prob.min() >= 0.0 and prob.max() <= 1.0
        np.testing.assert_array_equal(mask, (prob >= 0.5).astype(np.uint8))
        vv = float(np.prod(ref.GetSpacing())) / 1000.0
        assert float(row["lesion_volume_ml"]) == pytest.approx(mask.sum() * vv, abs=1e-3)
        assert row["combine"] == "staple" and row["members"] == "2" and row["respacing"] == "ddim2"
        png = sitk.ReadImage(str(out / f"{cid}_overlay.png"))
        assert png.GetNumberOfComponentsPerPixel() == 3
    meta = json.loads((out / "predict.json").read_text())
    assert meta["weights"] == "ema" and meta["threshold_source"] == "inference.threshold"


def test_predict_from_cache_with_case_filter_and_calibration(predicted, checkpoint, tmp_path):
    from medsegdiff.inference.calibration import save_calibration
    from medsegdiff.inference.predict import Predictor, predict

    out, written = predicted
    (cache,) = sorted((out / "_cache").iterdir())
    case_id = written[1].name[: -len(".nii.gz")]
    # calibrated with the settings predict uses (the overrides below do not change the probability map)
    save_calibration(checkpoint.parent.parent, 0.3, [], settings=Predictor.load(checkpoint).calibration_settings)
    try:
        got = predict(checkpoint, cache, tmp_path, cases=[case_id], progress=False,
                      overrides=["inference.overlays=false", "inference.uncertainty=entropy"])
    finally:
        (checkpoint.parent.parent / "calibration.json").unlink()
    assert [p.name for p in got] == [f"{case_id}.nii.gz"]
    assert not (tmp_path / f"{case_id}_overlay.png").exists()
    meta = json.loads((tmp_path / "predict.json").read_text())
    assert meta["threshold"] == 0.3 and meta["threshold_source"].endswith("calibration.json")
    prob = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{case_id}_prob.nii.gz")))
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{case_id}.nii.gz")))
    np.testing.assert_array_equal(mask, (prob >= 0.3).astype(np.uint8))


def test_predict_command_line(predicted, checkpoint, tmp_path, capsys):
    from medsegdiff.cli import main

    out, written = predicted
    (cache,) = sorted((out / "_cache").iterdir())
    case_id = written[0].name[: -len(".nii.gz")]
    rc = main(["predict", "--checkpoint", str(checkpoint), "--data", str(cache), "--out", str(tmp_path),
               "--cases", case_id, "--no-progress", "inference.ensemble=1", "inference.overlays=false"])
    assert rc == 0
    assert (tmp_path / f"{case_id}.nii.gz").is_file()
    assert "wrote 1 case(s)" in capsys.readouterr().out


def test_bad_inputs_have_one_line_messages(predicted, checkpoint, raw_root, tmp_path, capsys):
    from medsegdiff.cli import main
    from medsegdiff.inference.predict import predict

    out, _ = predicted
    (cache,) = sorted((out / "_cache").iterdir())
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        predict(tmp_path / "nope.pt", cache, tmp_path / "o")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        predict(truncated, cache, tmp_path / "o")
    other = _make_checkpoint(tmp_path / "run2", ["cbf", "cbv"])
    with pytest.raises(DataError, match=r"has modalities \['cbf', 'tmax'\] but the checkpoint was trained on "
                                        r"\['cbf', 'cbv'\]"):
        predict(other, cache, tmp_path / "o", progress=False)
    ctp = _make_checkpoint(tmp_path / "run3", ["ctp"])  # the synthetic data has no CTP
    with pytest.raises(DataError, match=r"no usable case.*missing.*ctp.*trained on modalities \['ctp'\]"):
        predict(ctp, raw_root, tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="data path not found"):
        predict(checkpoint, tmp_path / "missing", tmp_path / "o")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no ISLES24 case found"):
        predict(checkpoint, empty, tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="case 'sub-stroke9999' is not in the data"):
        predict(checkpoint, cache, tmp_path / "o", cases=["sub-stroke9999"])
    with pytest.raises(ConfigError, match="only inference"):
        predict(checkpoint, cache, tmp_path / "o", overrides=["model.base_channels=4"])
    rc = main(["predict", "--checkpoint", str(truncated), "--data", str(cache), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "truncated or corrupt" in err


def test_calibrate_checkpoint_saves_the_best_threshold(predicted, checkpoint, tmp_path):
    from medsegdiff.inference.calibration import find_calibration
    from medsegdiff.stages.calibrate import calibrate_checkpoint

    out, _ = predicted
    (cache,) = sorted((out / "_cache").iterdir())
    for combine in ("mean", "vote"):
        best, table, path = calibrate_checkpoint(checkpoint, cache, run_dir=tmp_path, progress=False,
                                                 overrides=[f"inference.combine={combine}", "inference.ensemble=3"])
        assert len(table) == 19
        assert max(r["mean_dice"] for r in table) == next(r["mean_dice"] for r in table if r["threshold"] == best)
        saved = json.loads(path.read_text())["calibrations"]
        assert saved[-1]["threshold"] == best and saved[-1]["combine"] == combine and len(saved[-1]["cases"]) == 2
        assert saved[-1]["settings"]["inference.combine"] == combine and saved[-1]["settings"]["members"] == 3
        assert len(saved) == (1 if combine == "mean" else 2)  # the mean calibration is kept beside the vote one
        assert find_calibration(tmp_path) == (best, str(path))


def test_predict_list_of_case_folders(raw_root, checkpoint, predicted, tmp_path):
    from medsegdiff.inference.predict import predict

    out, written = predicted
    folders = sorted((raw_root / "derivatives").glob("sub-stroke*"))
    got = predict(checkpoint, folders, tmp_path, progress=False,
                  overrides=["inference.overlays=false", "inference.combine=staple"])
    assert sorted(p.name for p in got) == sorted(p.name for p in written)
    assert len(list((tmp_path / "_cache").iterdir())) == 2  # one prepared cache per folder
    # same checkpoint, same preprocessing, same per-case seed: the same masks as from the dataset root
    for p in got:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(out / p.name)))
        np.testing.assert_array_equal(a, b)


def test_predict_3d_patch_model_uses_sliding_windows(raw_root, tmp_path):
    import torch

    from medsegdiff.config.base import to_dict
    from medsegdiff.config.loader import config_from_dict
    from medsegdiff.inference.predict import predict
    from medsegdiff.nets.registry import build_model
    from medsegdiff.training.checkpoint import save_checkpoint

    cfg = config_from_dict({
        "model": {"base_channels": 8, "channel_mult": [1, 2], "norm_groups": 4, "attention_resolutions": []},
        "data": {"dims": 3, "patch_size": [8, 16, 16], "image_size": 16, "modalities": MODALITIES,
                 "prepare_workers": 1},
        "diffusion": {"respacing": "ddim2"},
        "inference": {"ensemble": 2, "overlays": False},
    })
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt",
                           {"model": state, "ema": None, "step": 0, "config": to_dict(cfg)})
    got = predict(ckpt, raw_root, tmp_path / "out", progress=False)
    assert len(got) == 2
    for p in got:
        cid = p.name[: -len(".nii.gz")]
        assert sitk.ReadImage(str(p)).GetSize() == _ncct(raw_root, cid).GetSize()
        unc = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / f"{cid}_uncertainty.nii.gz")))
        assert unc.max() > 0  # two members really differ
