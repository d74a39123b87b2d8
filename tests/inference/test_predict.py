from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medsegdiff.errors import CheckpointError, ConfigError, DataError

MODALITIES = ["cbf", "tmax"]


@pytest.fixture(scope="module")
def raw_root(synthetic_dataset) -> Path:
    return synthetic_dataset("raw", cases=2, seed=3, layout="zenodo", shape="tiny")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_checkpoint_factory) -> Path:
    return tiny_checkpoint_factory(tmp_path_factory.mktemp("run"), MODALITIES)


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


def test_bad_inputs_have_one_line_messages(predicted, checkpoint, raw_root, tmp_path, capsys, tiny_checkpoint_factory):
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
    other = tiny_checkpoint_factory(tmp_path / "run2", ["cbf", "cbv"])
    with pytest.raises(DataError, match=r"has modalities \['cbf', 'tmax'\] but the checkpoint was trained on "
                                        r"\['cbf', 'cbv'\]"):
        predict(other, cache, tmp_path / "o", progress=False)
    ctp = tiny_checkpoint_factory(tmp_path / "run3", ["ctp"])  # the synthetic data has no CTP
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


def test_predict_arguments_as_documented(raw_root, tmp_path, capsys, tiny_checkpoint_factory):
    """A zenodo-trained checkpoint predicts a single case folder, data.layout=auto is accepted, the
    default is the run's test split (else every case, said), and --cases takes spaces and commas."""
    from medsegdiff.cli import main
    from medsegdiff.inference.predict import predict

    run = tmp_path / "run"
    ckpt = tiny_checkpoint_factory(run, MODALITIES, data={"layout": "zenodo"},
                                   inference={"ensemble": 1, "overlays": False})
    ids = sorted(p.name for p in (raw_root / "derivatives").glob("sub-stroke*"))
    folder = raw_root / "derivatives" / ids[1]
    assert [p.name for p in predict(ckpt, folder, tmp_path / "one", progress=False)] == [f"{ids[1]}.nii.gz"]
    got = predict(ckpt, folder, tmp_path / "auto", overrides=["data.layout=auto"], progress=False)
    assert [p.name for p in got] == [f"{ids[1]}.nii.gz"]
    capsys.readouterr()
    # no splits.json: every case, with a warning that training cases may be among them
    assert len(predict(ckpt, raw_root, tmp_path / "all", progress=False)) == 2
    assert "predicting all 2 cases" in capsys.readouterr().err
    (run / "splits.json").write_text(json.dumps({"train": [ids[1]], "val": [], "test": [ids[0]]}))
    got = predict(ckpt, raw_root, tmp_path / "test", progress=False)
    assert [p.name for p in got] == [f"{ids[0]}.nii.gz"]
    assert "predicting the 1 test case(s) of the checkpoint's split (of 2 in the data)" in capsys.readouterr().err
    assert len(predict(ckpt, raw_root, tmp_path / "every", cases=["all"], progress=False)) == 2
    # --cases with spaces, commas and an override after them
    out = tmp_path / "cli"
    assert main(["predict", "--checkpoint", str(ckpt), "--data", str(raw_root), "--out", str(out),
                 "--no-progress", "--cases", f"{ids[0]},", ids[1], "inference.overlays=true"]) == 0
    assert sorted(p.name for p in out.glob("*_overlay.png")) == [f"{i}_overlay.png" for i in ids]


def test_a_skipped_case_is_reported_once_with_the_stage_name(raw_root, checkpoint, tmp_path, capsys):
    import shutil

    from medsegdiff.inference.predict import Predictor, resolve_sources

    root = tmp_path / "data"
    shutil.copytree(raw_root, root)
    ids = sorted(p.name for p in (root / "derivatives").glob("sub-stroke*"))
    for f in (root / "derivatives" / ids[0]).rglob("*cbf*"):
        f.unlink()  # this case misses a modality the checkpoint needs
    cfg = Predictor.load(checkpoint).cfg
    sources = resolve_sources(root, tmp_path / "out", cfg, progress=False)
    assert [c for s in sources for c in s.case_ids] == [ids[1]]
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"medsegdiff predict: 1 case(s) of {root} were skipped")
    assert ids[0] in err and "cbf" in err
    resolve_sources(root, tmp_path / "out", cfg, progress=False)  # the same cache reused: said already
    resolve_sources(root, tmp_path / "out", cfg, [ids[1]], progress=False)  # cases asked for: all usable
    assert capsys.readouterr().err == ""
    cache = next((tmp_path / "out" / "_cache").iterdir())
    resolve_sources(cache, tmp_path / "out2", cfg, progress=False, stage="calibrate")
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"medsegdiff calibrate: 1 case(s) of {cache} were skipped")


def test_predict_writes_members_that_evaluate_scores(predicted, raw_root, tmp_path):
    from medsegdiff.evaluation.evaluate import evaluate
    from medsegdiff.inference.members import members_path, read_members
    from medsegdiff.metrics.uncertainty import UNCERTAINTY_KEYS

    out, written = predicted
    for path in written:
        cid = path.name[: -len(".nii.gz")]
        members, brain = read_members(members_path(out, cid))
        ref = _ncct(raw_root, cid)
        assert members.shape == (2, *ref.GetSize()[::-1]) and brain.shape == members.shape[1:]
        assert 0 < brain.sum() < brain.size  # the imaged tissue, not the whole grid
        assert members.any()  # an untrained model marks plenty of voxels at threshold 0.5
    result = evaluate(out, raw_root, tmp_path / "ev", hd95=False, progress=False)
    for row in result["cases"]:
        assert all(k in row for k in UNCERTAINTY_KEYS)
        assert 0.0 <= row["brier"] <= 1.0 and 0.0 <= row["ece"] <= 1.0
