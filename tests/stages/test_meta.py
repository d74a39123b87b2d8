"""meta.json: training status and the refusal of unfinished runs."""

from __future__ import annotations

import json

import pytest

from medsegdiff.errors import CheckpointError
from medsegdiff.stages.meta import (
    read_meta,
    record_training,
    require_finished,
    run_of_checkpoint,
    run_of_predictions,
    training_status,
    update_meta,
)


def test_update_keeps_other_fields_and_training_status_round_trips(tmp_path):
    assert read_meta(tmp_path) == {}
    update_meta(tmp_path, command="medsegdiff run x.yaml")
    record_training(tmp_path, finished=False, step=10, steps=400)
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["command"] == "medsegdiff run x.yaml"
    assert training_status(tmp_path) | {"updated": None} == {
        "finished": False, "step": 10, "steps": 400, "stopped_by": None, "updated": None}


def test_an_unfinished_run_is_refused_unless_allowed(tmp_path):
    assert require_finished(tmp_path) is None  # no status recorded (older run): allowed
    record_training(tmp_path, finished=False, step=10, steps=400)
    with pytest.raises(CheckpointError, match=r"training did not finish \(step 10 of 400.*--allow-unfinished to "
                                              r"evaluate"):
        require_finished(tmp_path, what="evaluate")
    assert require_finished(tmp_path, allow_unfinished=True)["step"] == 10
    record_training(tmp_path, finished=True, step=400, steps=400, stopped_by="steps")
    assert require_finished(tmp_path)["finished"] is True


def test_the_run_of_a_checkpoint_and_of_predictions(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    ckpt = tmp_path / "checkpoints" / "best.pt"
    assert run_of_checkpoint(ckpt) is None  # not a run directory (no meta.json)
    update_meta(tmp_path)
    assert run_of_checkpoint(ckpt) == tmp_path and run_of_checkpoint(tmp_path) == tmp_path
    preds = tmp_path / "preds"
    preds.mkdir()
    assert run_of_predictions(preds) is None
    (preds / "predict.json").write_text(json.dumps({"checkpoint": str(ckpt)}))
    assert run_of_predictions(preds) == tmp_path
