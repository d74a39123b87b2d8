"""Every registered network goes train -> checkpoint -> predict -> evaluate through `medsegdiff run`.

Tiny synthetic data (6 cases at 16 x 16), 4 steps, DDIM 5, the EMA weights used for prediction:
the point is that each model's checkpoint loads back for prediction (the DynUNet EMA aliasing bug
made `predict` say the weights did not fit) and the scored results exist, not the numbers.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from medsegdiff.cli import main
from medsegdiff.nets.registry import MODELS

QUICKSTART = Path(__file__).resolve().parents[2] / "experiments" / "quickstart.yaml"
REDUCED = [
    "data.synthetic.cases=6", "data.image_size=16", "model.dynunet_filters=[8,16,32]",
    "train.steps=4", "train.batch_size=4", "train.time_budget_s=0", "train.log_every=2",
    "train.checkpoint_every=2", "train.validation.every=2", "train.validation.respacing=ddim5",
    "train.validation.max_cases=1", "inference.respacing=ddim5", "inference.ensemble=1",
    "inference.calibrate=false", "inference.overlays=false", "tracking.backend=none",
]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_run_end_to_end(work: Path, name: str) -> None:
    run_dir = work / "runs" / name
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["run", str(QUICKSTART), *REDUCED, f"model.name={name}", f"run_dir={run_dir}", "--no-progress"])
    assert code == 0, buf.getvalue()[-2000:]
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["cases"]
    for case in results["cases"]:
        assert (run_dir / "predictions" / f"{case}.nii.gz").is_file()
    assert 0.0 <= results["model"]["dice"] <= 1.0
    assert len(results["per_case"]["model"]) == len(results["cases"])
    # the printed table: the model beside the four references on the same cases
    table = buf.getvalue()
    for label in ("MedSegDiff (this run)", "Tmax > 9 s baseline", "Tmax > 6 s & CBF < 15 rule", "resolution ceiling",
                  "acute-core oracle"):
        assert label in table, label
    assert set(results["references"]) == {"cbf_rule", "ceiling", "acute_core"}  # synthetic data: with the cores
    for name in ("cbf_rule", "ceiling"):
        assert [r["case_id"] for r in results["per_case"][name]] == results["cases"]
    assert 0.0 < results["references"]["ceiling"]["dice"] <= 1.0
    predict = json.loads((run_dir / "predictions" / "predict.json").read_text())
    assert predict["weights"] == "ema" and predict["step"] in (2, 4)  # best.pt: the better validation
