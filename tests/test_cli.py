"""The CLI shell: --help, --version, and one-line errors without a traceback."""

from __future__ import annotations

import subprocess
import sys

from medsegdiff import __version__
from medsegdiff.cli import main


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert capsys.readouterr().out.strip() == f"medsegdiff {__version__}"


def test_help_lists_existing_commands(capsys):
    from medsegdiff.cli import available_commands

    try:
        main(["--help"])
    except SystemExit:
        pass
    out = capsys.readouterr().out
    for name in available_commands():
        assert name in out
    assert "config" in available_commands()


def test_user_error_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "medsegdiff.cli", "config", str(tmp_path / "nope.yaml")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert "config file not found" in proc.stderr


def test_config_command_prints_resolved_yaml(tmp_path, capsys):
    import yaml

    from medsegdiff.config import config_from_dict

    exp = tmp_path / "e.yaml"
    exp.write_text("train:\n  steps: 4\n")
    assert main(["config", str(exp), "optim.lr=0.01"]) == 0
    cfg = config_from_dict(yaml.safe_load(capsys.readouterr().out))
    assert cfg.train.steps == 4 and cfg.optim.lr == 0.01
    assert main(["config", "--keys"]) == 0
    assert "train.steps" in capsys.readouterr().out


def test_case_ids_accept_spaces_and_commas():
    from medsegdiff.commands import split_case_ids

    assert split_case_ids(None) is None
    assert split_case_ids([]) is None
    assert split_case_ids("a,b") == ["a", "b"]
    assert split_case_ids(["a,b", "c", " d , "]) == ["a", "b", "c", "d"]
