"""The run pipeline: stage parsing, data checks, the results table (end to end in test_run_e2e.py)."""

from __future__ import annotations

import pytest

from medsegdiff.config import load_config
from medsegdiff.errors import ConfigError, DataError
from medsegdiff.experiments.pipeline import ensure_dataset, format_table, parse_stages, summary_of


def test_parse_stages_keeps_pipeline_order():
    assert parse_stages(None) == ["prepare", "train", "predict", "evaluate"]
    assert parse_stages("evaluate,predict") == ["predict", "evaluate"]
    with pytest.raises(ConfigError, match=r"--stages: unknown stage 'trian'; allowed: prepare, train, predict, evaluate"):
        parse_stages("prepare,trian")


def test_data_root_errors_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'data.root' is empty; point it at the extracted ISLES24"):
        ensure_dataset(load_config(None, []))
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=r"nope: data.root does not exist; .*data.synthetic.generate=true"):
        ensure_dataset(load_config(None, [f"data.root={missing}"]))
    assert not missing.exists()


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


def test_a_missing_data_root_fails_before_a_run_directory_is_made(tmp_path):
    from medsegdiff.experiments.pipeline import run_experiment

    cfg = load_config(None, [f"data.root={tmp_path / 'missing'}", f"run_root={tmp_path / 'runs'}"])
    with pytest.raises(DataError, match="data.root does not exist"):
        run_experiment(cfg, stages="prepare")
    assert not (tmp_path / "runs").exists()
