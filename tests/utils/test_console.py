"""Progress lines go to stdout on rank 0 only and always to the log file."""

from __future__ import annotations

import logging

from medsegdiff.utils.console import env_rank, log_to_file, say, setup_console_logging


def test_say_prints_on_rank_0_and_logs_on_every_rank(tmp_path, capsys, monkeypatch):
    log = tmp_path / "logs" / "run.log"
    with log_to_file(log):
        monkeypatch.setenv("RANK", "0")
        say("[prepare] zero")
        monkeypatch.setenv("RANK", "1")
        assert env_rank() == 1
        say("[prepare] one")
    assert capsys.readouterr().out == "[prepare] zero\n"
    text = log.read_text()
    assert "[prepare] zero" in text and "[prepare] one" in text
    say("[prepare] after")  # the handler is gone after the block
    assert "after" not in log.read_text()
    assert not any(isinstance(h, logging.FileHandler) for h in logging.getLogger("medsegdiff").handlers)


def test_verbose_console_logging_does_not_repeat_say_lines(capsys, monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # a fresh process's root logger (pytest's own handlers aside)
    level = root.level
    try:
        setup_console_logging(verbose=True)
        monkeypatch.setenv("RANK", "0")
        say("[train] step 1")
        logging.getLogger("medsegdiff.train").info("an info record")
        monkeypatch.setenv("RANK", "1")
        say("[train] rank one")  # not printed on rank 1, so the console log shows it
    finally:
        root.setLevel(level)
    captured = capsys.readouterr()
    assert captured.out == "[train] step 1\n"
    assert "step 1" not in captured.err and "an info record" in captured.err and "rank one" in captured.err
