"""The learning benchmark's table and plots from a hand-made report."""

from __future__ import annotations

from medsegdiff.bench.learn_report import format_table, write_plots


def _report():
    dice = {"mean": 0.7, "ci95": [0.6, 0.8], "n": 24}
    return {
        "settings": {"references": ["cbf_rule"], "seeds": [0, 1], "test_cases": 12, "steps": 300},
        "methods": {"v1_x0": {"metrics": {"dice": dice, "lesion_f1": {"mean": 0.5}, "avd_ml": {"mean": 4.25}},
                              "paired": {"cbf_rule": {"mean": 0.05, "ci95": [0.01, 0.09]}},
                              "train_seconds": {"mean": 120.0}, "sample_seconds": {"mean": 30.0},
                              "history": {"0": [[150.0, 0.5], [300.0, 0.8]], "1": [[150.0, 0.3], [300.0, 0.6]]}}},
        "references": {"cbf_rule": {"metrics": {"dice": {"mean": 0.65, "ci95": [0.55, 0.75], "n": 24}},
                                    "paired": {}}},
    }


def test_table_rows_columns_and_signed_paired_ci():
    lines = format_table(_report()).splitlines()
    assert lines[0].startswith("bench learn: 2 data seeds x 12 test cases (24 case scores), 300 steps")
    header = lines[1].split()
    assert header[:3] == ["method", "Dice", "[95%"] and "vs" in header
    row = next(ln for ln in lines if ln.startswith("v1_x0"))
    assert "0.700 [0.600, 0.800]" in row and "+0.050 [+0.010, +0.090]" in row and "4.2" in row
    ref = next(ln for ln in lines if ln.startswith("cbf_rule"))
    assert "0.650 [0.550, 0.750]" in ref and ref.rstrip().endswith("-")  # no times for a reference


def test_plots_are_written(tmp_path):
    paths = write_plots(_report(), tmp_path)
    assert [p.name for p in paths] == ["dice_vs_steps.png", "paired_differences.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
