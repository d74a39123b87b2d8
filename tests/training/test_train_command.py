"""``medsegdiff train`` argument handling: mistakes are one line on stderr, exit status 2."""

from __future__ import annotations

from medsegdiff.cli import main


def test_train_without_config_or_run_dir(capsys):
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medsegdiff train: error: medsegdiff train needs a config file")
    assert err.count("\n") == 1


def test_resume_from_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/config.yaml: not a run directory (no config.yaml)" in err


def test_override_in_place_of_config_is_an_override(tmp_path, capsys):
    # `medsegdiff train --resume DIR train.steps=5`: the override is not taken for a config file
    assert main(["train", "train.steps=5", "--resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
