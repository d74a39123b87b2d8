"""Atomic file writes: a temporary file in the same folder, fsync, then ``os.replace``.

A reader never sees a half-written file, and a process killed mid-write leaves the previous
version (or nothing) in place. The result has the permissions a plain ``open(path, "w")`` would
give (``0o666`` minus the umask, so ``0644`` under umask 022), not ``mkstemp``'s private ``0600``:
colleagues can read results and a shared cache stays shared. An ``OSError`` names the target
file, not the hidden temporary one.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO


def _create_temp(path: Path, suffix: str) -> str:
    """Create an empty hidden file next to ``path`` with mode ``0o666`` (the kernel applies the umask).

    ``tempfile.mkstemp`` would create it ``0600`` whatever the umask, and ``os.replace`` keeps that.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        name = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp{suffix}"
        try:
            os.close(os.open(name, flags, 0o666))
        except FileExistsError:  # pragma: no cover - a 32-bit random name taken: draw another
            continue
        return str(name)


def _named(err: OSError, path: Path) -> OSError:
    """``err`` addressed to ``path`` when it names a hidden temporary file of ``path`` (or nothing)."""
    hidden = str(path.parent / f".{path.name}.")
    if err.errno is not None and (err.filename is None or str(err.filename).startswith(hidden)):
        return type(err)(err.errno, err.strerror, str(path))
    return err


@contextlib.contextmanager
def _replacing(path: str | os.PathLike[str], suffix: str = "") -> Iterator[str]:
    """Yield a temporary file name next to ``path``; on success fsync it and replace ``path``.

    Raises:
        OSError: from the file system (read-only, full, no permission), naming ``path`` rather
            than the temporary file; the previous ``path`` is left as it was.
    """
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _create_temp(path, suffix)
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(err, OSError):
            raise _named(err, path) from None
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` atomically."""
    with _replacing(path) as tmp, open(tmp, mode) as fh:
        yield fh  # type: ignore[misc]


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n")


def atomic_write_with(path: str | os.PathLike[str], writer: Callable[[str], None], suffix: str = "") -> None:
    """Atomically produce ``path`` with a writer that only accepts a file name (e.g. SimpleITK).

    ``suffix`` keeps the extension the writer needs to pick a format (``.nii.gz``, ``.png``).
    """
    with _replacing(path, suffix) as tmp:
        writer(tmp)
