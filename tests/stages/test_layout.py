"""The run-directory layout the stages write into."""

from __future__ import annotations

from pathlib import Path

from medsegdiff.stages.layout import RunDir, as_run_dir


def test_paths_and_conversion(tmp_path):
    rd = as_run_dir(str(tmp_path / "r"))
    assert rd == RunDir(tmp_path / "r") and as_run_dir(rd) is rd
    assert rd.splits == tmp_path / "r" / "splits.json"
    assert rd.baseline_predictions == Path(tmp_path, "r", "baseline", "predictions")
    rd.make()
    assert rd.logs.is_dir() and rd.checkpoints.is_dir() and not rd.predictions.exists()
