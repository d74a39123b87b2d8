"""The final comparison table of ``medsegdiff run``."""

from __future__ import annotations

from medsegdiff.pipeline.report import format_table
from medsegdiff.stages.evaluate import summary_of


def test_summary_and_table():
    report = {"metrics": {"dice": {"mean": 0.5, "std": 0.1}, "avd_ml": {"mean": 2.25}, "lesion_f1": {"mean": 0.25},
                          "lesion_count_diff": {"mean": 1.0}}, "n_cases": 3}
    summ = summary_of(report)
    assert summ == {"dice": 0.5, "avd_ml": 2.25, "lesion_f1": 0.25, "lesion_count_diff": 1.0}
    table = format_table({"model": summ, "baseline_tmax": {"dice": 0.125}})
    lines = table.splitlines()
    assert lines[0].split() == ["method", "Dice", "AVD", "(mL)", "Lesion", "F1", "Count", "diff"]
    assert "0.500" in lines[2] and "2.25" in lines[2] and "0.250" in lines[2]
    assert "0.125" in lines[3] and lines[3].rstrip().endswith("-")  # missing values shown as '-'
