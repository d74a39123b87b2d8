"""`medsegdiff run` on the quickstart experiment, end to end, reduced to seconds.

Tiny synthetic data (6 cases at 16 x 16), 4 training steps, DDIM 5 sampling, no W&B: the point is
that every stage runs and the run directory holds everything, not the numbers.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from medsegdiff.cli import main
from medsegdiff.config import load_config
from medsegdiff.data.splits import Splits
from medsegdiff.tracking import read_metrics

QUICKSTART = Path(__file__).resolve().parents[2] / "experiments" / "quickstart.yaml"
REDUCED = [
    "data.synthetic.cases=6", "data.image_size=16",
    "train.steps=4", "train.batch_size=4", "train.time_budget_s=0", "train.log_every=2",
    "train.checkpoint_every=2", "train.validation.every=0", "train.validation.respacing=ddim5",
    "train.validation.max_cases=1", "inference.respacing=ddim5", "inference.ensemble=1",
    "inference.calibrate=true", "tracking.backend=none",
]


@pytest.fixture(scope="module")
def run(work):
    """``(work, exit code, stdout, [run dir])`` of one reduced quickstart run (``work`` is the cwd)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["run", str(QUICKSTART), *REDUCED, "--no-progress"])
    dirs = [p for p in (work / "runs").iterdir() if p.name.startswith("quickstart")]
    return work, code, buf.getvalue(), dirs


def test_run_succeeds_and_prints_the_comparison(run):
    _, code, out, dirs = run
    assert code == 0
    assert len(dirs) == 1
    assert "MedSegDiff (this run)" in out and "Tmax > 9 s baseline" in out
    assert f"run directory : runs/{dirs[0].name}" in out


def test_synthetic_data_was_generated_where_the_config_says(run):
    work = run[0]
    assert (work / "data" / "isles24_synthetic" / "derivatives").is_dir()


def test_run_directory_holds_everything(run):
    rd = run[3][0]
    for rel in ("config.yaml", "meta.json", "splits.json", "metrics.jsonl", "results.json", "logs/run.log",
                "checkpoints", "predictions", "evaluation/summary.json", "evaluation/metrics.csv",
                "baseline/predictions", "baseline/evaluation/summary.json"):
        assert (rd / rel).exists(), rel
    cfg = load_config(rd / "config.yaml")
    assert cfg.run_dir == str(Path("runs") / rd.name) and cfg.train.steps == 4
    assert Path(cfg.data.cache_dir).is_dir() and cfg.data.split.file.endswith("splits.json")
    meta = json.loads((rd / "meta.json").read_text())
    assert meta["status"] == "done" and meta["stages"] == ["prepare", "train", "predict", "evaluate"]
    assert list((rd / "checkpoints").glob("*.pt"))
    splits = Splits.load(rd / "splits.json")
    assert splits.test and not set(splits.test) & set(splits.train)
    for case in splits.test:  # every held-out case is predicted and the baseline scored on the same cases
        assert (rd / "predictions" / f"{case}.nii.gz").is_file()
        assert (rd / "baseline" / "predictions" / f"{case}.nii.gz").is_file()
    results = json.loads((rd / "results.json").read_text())
    assert results["cases"] == splits.test
    for key in ("model", "baseline_tmax"):
        assert 0.0 <= results[key]["dice"] <= 1.0 and results[key]["avd_ml"] >= 0.0
    recs = read_metrics(rd / "metrics.jsonl")
    assert any("train/loss" in r for r in recs)
    final = [r for r in recs if "test/dice" in r]
    assert final and final[-1]["test/dice"] == pytest.approx(results["model"]["dice"])
    assert any(r.get("table") == "test/summary" for r in recs)
    assert "[train]" in (rd / "logs" / "run.log").read_text()


def test_a_single_stage_reuses_the_run_directory(run):
    work, _, _, dirs = run  # the working directory (fixture `work`)
    before = (dirs[0] / "results.json").stat().st_mtime_ns
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["run", str(QUICKSTART), *REDUCED, "--stages", "evaluate", "--no-progress"]) == 0
    assert [p for p in (work / "runs").iterdir() if p.name.startswith("quickstart")] == dirs
    assert (dirs[0] / "results.json").stat().st_mtime_ns >= before
    meta = json.loads((dirs[0] / "meta.json").read_text())
    assert meta["stages"] == ["evaluate"] and len(meta["resumed"]) == 1


def test_resume_from_the_saved_config_continues_training(run):
    work, _, _, dirs = run  # the working directory (fixture `work`)
    rd = dirs[0]
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["run", str(rd / "config.yaml"), "train.steps=6", "--resume", "--stages", "train",
                     "--no-progress"])
    assert code == 0
    steps = [r["step"] for r in read_metrics(rd / "metrics.jsonl") if "train/loss" in r]
    assert steps[-1] == 6 and steps.count(2) == 1  # continued after step 4, not restarted
    assert load_config(rd / "config.yaml").train.steps == 6
    assert [p for p in (work / "runs").iterdir() if p.name.startswith("quickstart")] == dirs


def test_calibrated_threshold_is_stored_and_applied(run):
    import csv

    rd = run[3][0]
    (calib,) = json.loads((rd / "calibration.json").read_text())["calibrations"]
    assert 0.0 < calib["threshold"] < 1.0
    assert calib["settings"]["respacing"] == "ddim5" and calib["settings"]["members"] == 1
    rows = list(csv.DictReader((rd / "predictions" / "predictions.csv").open()))
    assert rows and all(abs(float(r["threshold"]) - calib["threshold"]) < 1e-6 for r in rows)


def test_calibrate_command_writes_calibration_for_validation_cases(run, tmp_path, capsys):
    rd = run[3][0]
    cfg = load_config(rd / "config.yaml")
    ckpt = next((rd / "checkpoints").glob("*.pt"))
    code = main(["calibrate", "--checkpoint", str(ckpt), "--data", cfg.data.cache_dir, "--run-dir", str(tmp_path),
                 "--no-progress", "inference.ensemble=1", "inference.respacing=ddim5"])
    assert code == 0
    assert "best threshold" in capsys.readouterr().out
    (calib,) = json.loads((tmp_path / "calibration.json").read_text())["calibrations"]
    assert 0.0 < calib["threshold"] < 1.0
