"""The run-directory lock: exclusive across processes, re-entrant in one, released by the OS on a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from medsegdiff.errors import CheckpointError
from medsegdiff.pipeline import lock

ROOT = Path(__file__).resolve().parents[2]


def _holder(path: Path) -> subprocess.Popen:
    code = ("import sys, time; from medsegdiff.pipeline import lock; "
            "lock.acquire(sys.argv[1], ['medsegdiff', 'train', 'x.yaml']); print('locked', flush=True); time.sleep(120)")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_with_the_holder_named(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(CheckpointError) as err:
            lock.acquire(tmp_path)
        msg = str(err.value)
        assert msg.startswith(f"{tmp_path.resolve()}: run directory in use by pid {proc.pid} on ")
        assert "(`medsegdiff train x.yaml`)" in msg and "\n" not in msg
        assert lock.holder(tmp_path)["pid"] == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    with lock.locked(tmp_path, ["me"]):  # released by the OS although the holder was killed
        assert lock.holder(tmp_path)["pid"] == os.getpid() and lock.holder(tmp_path)["command"] == "me"


def test_the_lock_is_reentrant_in_one_process_and_released_with_the_last_hold(tmp_path):
    lock.acquire(tmp_path)
    lock.acquire(tmp_path)
    lock.release(tmp_path)
    assert lock._key(tmp_path) in lock._HELD  # still held once
    lock.release(tmp_path)
    assert lock._key(tmp_path) not in lock._HELD
    lock.release(tmp_path)  # releasing what is not held is a no-op


def test_writing_into_locks_only_run_directories(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with lock.writing_into(run / "predictions") as key:
        assert key is None and not (run / lock.LOCK_FILE).exists()
    (run / "meta.json").write_text("{}")
    (run / "config.yaml").write_text("{}")
    with lock.writing_into(run / "predictions") as key:
        assert key == run.resolve() and lock.holder(run)["pid"] == os.getpid()
    assert key not in lock._HELD
