"""User-facing error types.

Anything derived from :class:`MedSegDiffError` is an *expected* mistake (bad config, missing file,
corrupt input). The CLI prints its message on one line and exits with status 2, without a traceback.
Messages say which file or key, what is wrong, and what to do.

File-system faults from the environment (read-only folder, full disk, no permission) are plain
``OSError``s wherever they happen; :func:`describe_os_error` turns them into the same kind of one
line, in one place, for the CLI.
"""

from __future__ import annotations

import errno


class MedSegDiffError(Exception):
    """Base class for expected, user-facing errors."""


class ConfigError(MedSegDiffError, ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


class DataError(MedSegDiffError, ValueError):
    """Input data is missing, unreadable or inconsistent."""


class CheckpointError(MedSegDiffError, ValueError):
    """A checkpoint or run directory is missing, incomplete or incompatible."""


class TrainingError(MedSegDiffError, RuntimeError):
    """Training cannot continue (e.g. too many non-finite steps in a row)."""


# File-system faults that are the environment's, not the program's: one line each, naming the path.
_OS_ERROR_HINTS: dict[int, str] = {
    errno.EROFS: "read-only file system; write the outputs to a writable folder (e.g. another --out or run_root)",
    errno.ENOSPC: "no space left on device; free space or write to another disk, then rerun "
                  "(files are replaced atomically, so what was written before is intact; --resume continues training)",
    errno.EDQUOT: "disk quota exceeded; free space or write to another disk, then rerun "
                  "(files are replaced atomically, so what was written before is intact; --resume continues training)",
    errno.EACCES: "permission denied; check the permissions of this path or choose another folder",
    errno.EPERM: "operation not permitted; check the permissions of this path or choose another folder",
    errno.ENOTDIR: "a part of this path is a file, not a folder; check the path",
    errno.EISDIR: "is a folder, but a file is needed here; check the path",
    errno.ENAMETOOLONG: "file name too long; choose a shorter path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) or use fewer data.num_workers",
    errno.ENFILE: "too many open files in the system; raise the limit or use fewer data.num_workers",
    errno.EIO: "input/output error from the disk or network file system; check the storage",
}


def describe_os_error(err: OSError) -> str | None:
    """One line for an expected file-system fault (read-only, full disk, permissions, ...).

    Args:
        err: the exception; ``err.filename`` (and ``filename2``) name the path when known.

    Returns:
        ``"<path>: <what is wrong>; <what to do>"``, or None for an errno that is not an
        environment fault (those stay tracebacks: they are bugs).
    """
    hint = _OS_ERROR_HINTS.get(err.errno) if err.errno is not None else None
    if hint is None:
        return None
    where = err.filename if err.filename is not None else None
    if err.filename2 is not None:
        where = f"{err.filename} -> {err.filename2}"
    prefix = f"{where}: " if where is not None else ""
    return f"{prefix}{hint} [{errno.errorcode.get(err.errno, err.errno)}]"
