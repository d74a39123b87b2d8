"""The run pipeline: stage parsing, data checks before a run directory is made (end to end in test_run_e2e.py)."""

from __future__ import annotations

import pytest

from medsegdiff.config import load_config
from medsegdiff.errors import ConfigError, DataError
from medsegdiff.pipeline.run import parse_stages, run_experiment


def test_parse_stages_keeps_pipeline_order():
    assert parse_stages(None) == ["prepare", "train", "predict", "evaluate"]
    assert parse_stages("evaluate,predict") == ["predict", "evaluate"]
    with pytest.raises(ConfigError, match=r"--stages: unknown stage 'trian'; allowed: prepare, train, predict, evaluate"):
        parse_stages("prepare,trian")


def test_a_missing_data_root_fails_before_a_run_directory_is_made(tmp_path):
    cfg = load_config(None, [f"data.root={tmp_path / 'missing'}", f"run_root={tmp_path / 'runs'}"])
    with pytest.raises(DataError, match="data.root does not exist"):
        run_experiment(cfg, stages="prepare")
    assert not (tmp_path / "runs").exists()
