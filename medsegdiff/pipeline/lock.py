"""One writer per run directory: an exclusive OS file lock on ``<run>/.lock``.

Every command that writes a run directory (``run``, ``train``, ``calibrate`` into a run, ``predict`` /
``evaluate`` into a run) holds the lock while it runs. It is an ``fcntl.flock`` lock, so the OS
releases it when the process ends in any way (exit, exception, ``kill -9``); a stale ``.lock`` file
left behind blocks nobody. The file records who holds it (pid, host, command, start time), which a
second writer names in its one-line error.

Locks are per process and re-entrant: the same process may take the lock of a folder it already
holds (the pipeline and a stage inside it), and the folder is released when the outermost holder
releases it. Under torchrun only rank 0 writes the run directory, so only rank 0 takes the lock
(:func:`medsegdiff.pipeline.rundir.init_shared_run_dir`); the other ranks never wait on it.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import platform
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medsegdiff.errors import CheckpointError
from medsegdiff.stages.meta import run_containing

LOCK_FILE = ".lock"


class _Held:
    """A lock this process holds: the open file and how many holders share it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.count = 1


_HELD: dict[Path, _Held] = {}


def _key(root: str | os.PathLike[str]) -> Path:
    return Path(root).resolve()


def holder(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """What ``<root>/.lock`` says about its (last) holder: ``pid``, ``host``, ``command``, ``since``."""
    try:
        data = json.loads((Path(root) / LOCK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def describe(info: dict[str, Any] | None) -> str:
    """``"pid 123 on host, since ..., running `medsegdiff run ...`"`` (or ``"another process"``)."""
    if not info:
        return "another process"
    text = f"pid {info.get('pid', '?')} on {info.get('host', '?')}"
    if info.get("since"):
        text += f" since {info['since']}"
    if info.get("command"):
        text += f" (`{info['command']}`)"
    return text


def acquire(root: str | os.PathLike[str], command: Sequence[str] | str | None = None) -> Path:
    """Take the exclusive lock of run directory ``root`` (created if missing) for this process.

    Args:
        root: the run directory.
        command: what this process runs (recorded for a second writer's error message).

    Returns:
        ``root`` resolved (the key to :func:`release`).

    Raises:
        CheckpointError: another process holds the lock (the message names it).
    """
    key = _key(root)
    held = _HELD.get(key)
    if held is not None:
        held.count += 1
        return key
    key.mkdir(parents=True, exist_ok=True)
    fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CheckpointError(
            f"{key}: run directory in use by {describe(holder(key))}; wait for it to finish, stop it, "
            "or choose another run_dir (the lock is released automatically when that process ends)"
        ) from None
    if command is None:
        command = sys.argv
    info = {
        "pid": os.getpid(),
        "host": platform.node(),
        "command": command if isinstance(command, str) else shlex.join(command),
        "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _HELD[key] = _Held(fd)
    return key


def release(root: str | os.PathLike[str]) -> None:
    """Give back one hold of ``root``'s lock; the lock is released with the last one (no-op if not held)."""
    key = _key(root)
    held = _HELD.get(key)
    if held is None:
        return
    held.count -= 1
    if held.count <= 0:
        del _HELD[key]
        os.close(held.fd)  # closing the descriptor releases the flock


@contextmanager
def locked(root: str | os.PathLike[str], command: Sequence[str] | str | None = None) -> Iterator[Path]:
    """``with locked(run_dir):`` hold the lock of ``run_dir`` for the block (see :func:`acquire`)."""
    key = acquire(root, command)
    try:
        yield key
    finally:
        release(key)


@contextmanager
def writing_into(path: str | os.PathLike[str], command: Sequence[str] | str | None = None) -> Iterator[Path | None]:
    """Hold the lock of the run directory ``path`` is (or is directly inside) for the block.

    For commands that write where the user says (``predict --out``, ``evaluate --out``, ``calibrate
    --run-dir``): a folder outside any run directory is not locked (yields None).
    """
    run = run_containing(path)
    if run is None:
        yield None
        return
    with locked(run, command) as key:
        yield key
