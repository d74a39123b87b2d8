"""End-to-end evaluation on tiny NIfTI folders."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import SimpleITK as sitk

from medsegdiff.cli import main
from medsegdiff.errors import DataError
from medsegdiff.evaluation.evaluate import evaluate


def test_csv_and_summary_values(three_cases, tmp_path, caplog):
    pred_dir, gt_dir = three_cases
    out = tmp_path / "eval"
    with caplog.at_level(logging.WARNING):
        result = evaluate(pred_dir, gt_dir, out, hd95=False, progress=False)
    assert "no prediction for 1 case(s), scored as empty masks: sub-stroke0003" in caplog.text

    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["case_id"] for r in rows] == ["sub-stroke0001", "sub-stroke0002", "sub-stroke0003"]
    assert [r["missing_prediction"] for r in rows] == ["0", "0", "1"]
    dice = [float(r["dice"]) for r in rows]
    assert dice == pytest.approx([1.0, 4 / 6, 0.0])
    assert [float(r["avd_ml"]) for r in rows] == pytest.approx([0.0, 0.004, 0.006])
    assert [float(r["gt_volume_ml"]) for r in rows] == pytest.approx([0.016, 0.008, 0.006])
    assert [float(r["lesion_f1"]) for r in rows] == [1.0, 1.0, 0.0]  # 0002: IoU 2/4 = 0.5 matches

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_cases"] == 3
    assert summary["missing_predictions"] == ["sub-stroke0003"]
    assert summary["iou_threshold"] == 0.5
    assert summary["metrics"]["dice"]["mean"] == pytest.approx(np.mean(dice))
    assert summary["metrics"]["dice"]["std"] == pytest.approx(np.std(dice))
    assert summary["metrics"]["dice"]["median"] == pytest.approx(4 / 6)
    assert summary["metrics"]["hd95"]["mean"] is None  # NaN -> null (strict JSON)
    assert result["metrics"]["avd_ml"]["mean"] == pytest.approx(0.01 / 3)
    assert len(result["cases"]) == 3

    png = sitk.ReadImage(str(out / "volume_scatter.png"))
    assert min(png.GetSize()) >= 256 and png.GetNumberOfComponentsPerPixel() == 3


def test_iou_threshold_changes_f1(three_cases, tmp_path):
    pred_dir, gt_dir = three_cases
    result = evaluate(pred_dir, gt_dir, tmp_path / "e", iou_threshold=0.6, hd95=False, progress=False)
    assert [r["lesion_f1"] for r in result["cases"]] == [1.0, 0.0, 0.0]


def test_hd95_in_mm_from_reference_spacing(tmp_path, write_mask):
    g = np.zeros((3, 3, 8))
    g[1, 1, 1] = 1
    p = np.zeros((3, 3, 8))
    p[1, 1, 4] = 1  # 3 voxels apart along x (spacing 0.5 mm) -> 1.5 mm
    sp = (0.5, 1.0, 2.0)
    write_mask(tmp_path / "gt" / "sub-stroke0007.nii.gz", g, spacing=sp)
    write_mask(tmp_path / "pred" / "sub-stroke0007.nii.gz", p, spacing=sp)
    result = evaluate(tmp_path / "pred", tmp_path / "gt", tmp_path / "e", progress=False)
    assert result["cases"][0]["hd95"] == pytest.approx(1.5)


def test_mismatched_grid_message(three_cases, tmp_path, write_mask):
    pred_dir, gt_dir = three_cases
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / "sub-stroke0002.nii.gz")))
    write_mask(pred_dir / "sub-stroke0002.nii.gz", a, spacing=(1.0, 1.0, 2.5))
    with pytest.raises(
        DataError,
        match=r"prediction grid differs from the reference grid for sub-stroke0002: spacing \(1\.0, 1\.0, 2\.5\) "
        r"vs reference \(1\.0, 1\.0, 2\.0\); write predictions on the reference",
    ):
        evaluate(pred_dir, gt_dir, tmp_path / "e", progress=False)
    # within the 1e-3 tolerance the grids count as equal
    write_mask(pred_dir / "sub-stroke0002.nii.gz", a, spacing=(1.0, 1.0, 2.0005))
    evaluate(pred_dir, gt_dir, tmp_path / "e", hd95=False, progress=False)
    write_mask(pred_dir / "sub-stroke0002.nii.gz", a[:, :, :5])
    with pytest.raises(DataError, match=r"sub-stroke0002: size \(5, 5, 4\) vs reference \(6, 5, 4\)"):
        evaluate(pred_dir, gt_dir, tmp_path / "e", progress=False)


def test_unreadable_files(three_cases, tmp_path):
    pred_dir, gt_dir = three_cases
    (pred_dir / "sub-stroke0001.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match=r"prediction: image file .*sub-stroke0001\.nii\.gz cannot be read by SimpleITK"):
        evaluate(pred_dir, gt_dir, tmp_path / "e", progress=False)
    (pred_dir / "sub-stroke0001.nii.gz").unlink()
    (gt_dir / "sub-stroke0003.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(DataError, match=r"reference mask: image file .*sub-stroke0003\.nii\.gz cannot be read"):
        evaluate(pred_dir, gt_dir, tmp_path / "e", progress=False)


def test_truncated_reference_is_an_error_not_zeros(three_cases, tmp_path, write_mask):
    pred_dir, gt_dir = three_cases
    big = np.random.default_rng(0).random((20, 30, 40)) > 0.5  # incompressible enough to truncate
    path = write_mask(gt_dir / "sub-stroke0003.nii.gz", big)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"reference mask: image file .*sub-stroke0003\.nii\.gz is (truncated|a corrupt)"):
        evaluate(pred_dir, gt_dir, tmp_path / "e", progress=False)


def test_empty_or_missing_prediction_folder(three_cases, tmp_path):
    _, gt_dir = three_cases
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files named sub-strokeNNNN.nii.gz"):
        evaluate(tmp_path / "empty", gt_dir, tmp_path / "e", progress=False)
    with pytest.raises(DataError, match="prediction folder .*nope does not exist"):
        evaluate(tmp_path / "nope", gt_dir, tmp_path / "e", progress=False)


def test_cli_prints_table_and_errors_on_one_line(three_cases, tmp_path, capsys):
    pred_dir, gt_dir = three_cases
    out = tmp_path / "cli"
    rc = main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out),
               "--iou-threshold", "0.2", "--no-hd95", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "3 case(s), IoU threshold 0.2, missing predictions: 1" in text
    assert "dice" in text and "0.5556" in text  # mean of 1, 2/3, 0
    assert json.loads((out / "summary.json").read_text())["iou_threshold"] == 0.2
    rc = main(["evaluate", "--pred", str(tmp_path / "nope"), "--gt", str(gt_dir), "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medsegdiff evaluate: error: prediction folder")


def test_volume_scatter_has_labelled_axes_and_legend(tmp_path):
    import SimpleITK as sitk

    from medsegdiff.evaluation.evaluate import volume_scatter_figure, write_volume_scatter

    rows = [{"gt_volume_ml": 1.0, "pred_volume_ml": 2.0}, {"gt_volume_ml": 10.0, "pred_volume_ml": 8.0},
            {"gt_volume_ml": 5.0, "pred_volume_ml": 0.0, "missing_prediction": 1}]
    fig, vmax = volume_scatter_figure(rows)
    ax = fig.axes[0]
    assert vmax == pytest.approx(10.5)
    assert ax.get_xlabel() == "reference lesion volume (mL)" and ax.get_ylabel() == "predicted lesion volume (mL)"
    assert ax.get_xlim() == (0.0, vmax) and ax.get_ylim() == (0.0, vmax)
    assert len(ax.get_xticks()) > 2 and len(ax.get_yticks()) > 2
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["identity (perfect agreement)", "scored case", "missing prediction (scored empty)"]
    png = sitk.ReadImage(str(tmp_path / "s.png")) if write_volume_scatter(tmp_path / "s.png", rows) else None
    assert png.GetNumberOfComponentsPerPixel() == 3 and min(png.GetSize()) >= 256


def test_uncertainty_metrics_from_members_files(three_cases, tmp_path, write_mask):
    """predict's members/prob/uncertainty files add the uncertainty columns; other cases get NaN."""
    import csv
    import math

    import numpy as np

    from medsegdiff.evaluation.evaluate import evaluate
    from medsegdiff.inference.members import members_path, write_members
    from medsegdiff.metrics.uncertainty import UNCERTAINTY_KEYS, uncertainty_metrics

    pred_dir, gt_dir = three_cases
    shape = (4, 5, 6)
    gt = np.zeros(shape, bool)
    gt[1:3, 1:3, 1:3] = True  # case 0001's reference == its prediction
    members = np.stack([gt, gt, np.zeros(shape, bool)])
    members[1, 0, 0, 0] = True
    prob = members.mean(0).astype(np.float32)
    unc = members.std(0).astype(np.float32)
    brain = np.ones(shape, bool)
    brain[3] = False
    write_members(members_path(pred_dir, "sub-stroke0001"), members, brain)
    write_mask(pred_dir / "sub-stroke0001_prob.nii.gz", prob, dtype=np.float32)
    write_mask(pred_dir / "sub-stroke0001_uncertainty.nii.gz", unc, dtype=np.float32)

    out = evaluate(pred_dir, gt_dir, tmp_path / "ev", hd95=False, progress=False)
    rows = {r["case_id"]: r for r in out["cases"]}
    expected = uncertainty_metrics(members, prob, unc, gt, gt, brain)
    for key in UNCERTAINTY_KEYS:
        v = rows["sub-stroke0001"][key]
        assert (math.isnan(v) and math.isnan(expected[key])) or v == pytest.approx(expected[key])
        assert math.isnan(rows["sub-stroke0002"][key])
    # final mask == reference: the ensemble beats its members (one member empty, one with a false positive)
    assert rows["sub-stroke0001"]["ensemble_gain"] == pytest.approx(1.0 - (1.0 + 2 * 8 / 17 + 0.0) / 3)
    with open(tmp_path / "ev" / "metrics.csv") as f:
        header = next(csv.reader(f))
    assert header[-len(UNCERTAINTY_KEYS):] == list(UNCERTAINTY_KEYS)
    assert out["metrics"]["ece"]["n"] == 1


def test_no_uncertainty_columns_without_members_files(three_cases, tmp_path):
    from medsegdiff.evaluation.evaluate import evaluate
    from medsegdiff.metrics.uncertainty import UNCERTAINTY_KEYS

    out = evaluate(*three_cases, tmp_path / "ev", hd95=False, progress=False)
    assert not any(k in out["cases"][0] for k in UNCERTAINTY_KEYS) and "ece" not in out["metrics"]
