"""The acute-core oracle: the generator's acute core scored as a prediction of the follow-up lesion."""

from __future__ import annotations

import json
import shutil

import pytest

from medsegdiff.baselines.acute_core import acute_core_baseline, has_acute_core
from medsegdiff.baselines.references import available_references
from medsegdiff.data.synthetic import MANIFEST_NAME, TRUTH_DIR
from medsegdiff.errors import DataError
from medsegdiff.evaluation.evaluate import evaluate


def test_acute_core_scores_the_dice_its_growth_implies(synth6, tmp_path):
    written = acute_core_baseline(synth6, tmp_path / "core", progress=False)
    stats = {c["case_id"]: c for c in json.loads((synth6 / MANIFEST_NAME).read_text())["cases"]}
    assert [p.name for p in written] == [f"{cid}.nii.gz" for cid in sorted(stats)]
    report = evaluate(tmp_path / "core", synth6, tmp_path / "eval", progress=False)
    for row in report["cases"]:
        s = stats[row["case_id"]]
        n = s["lesion_voxels"]
        if n == 0:  # the empty-mask case has no core: both empty scores 1
            assert row["dice"] == 1.0 and row["pred_volume_ml"] == 0.0
            continue
        c = round(s["core_ml"] / s["lesion_ml"] * n)  # core voxels, from the manifest's volumes
        assert round(n / 1.35) <= c <= max(1, round(n / 1.1))  # the lesion is the core plus 10-35 % growth
        assert row["precision"] == pytest.approx(1.0)  # the core lies inside the lesion
        assert row["dice"] == pytest.approx(2 * c / (c + n), abs=1e-9)
    assert 0.8 < report["metrics"]["dice"]["mean"] < 0.97


def test_real_data_has_no_acute_core(synth6, tmp_path):
    real = tmp_path / "real"
    shutil.copytree(synth6, real, ignore=shutil.ignore_patterns(TRUTH_DIR))
    assert has_acute_core(synth6) and not has_acute_core(real)
    assert available_references(real) == ["tmax", "cbf_rule", "ceiling"]
    assert available_references(synth6, ["ceiling", "acute_core"]) == ["ceiling", "acute_core"]
    with pytest.raises(DataError, match=r"no synthetic_truth/ folder; the acute-core oracle exists only for synthetic"):
        acute_core_baseline(real, tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="requested case"):
        acute_core_baseline(synth6, tmp_path / "out", cases=["sub-stroke9999"], progress=False)
