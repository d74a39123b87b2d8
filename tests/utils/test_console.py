"""Progress lines go to stdout on rank 0 only and always to the log file."""

from __future__ import annotations

import logging

from medsegdiff.utils.console import env_rank, log_to_file, say


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
