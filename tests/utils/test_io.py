"""Atomic writes: readers never see partial files; a failure leaves the old file and no temp files."""

from __future__ import annotations

import json

import pytest

from medsegdiff.utils.io import atomic_open, atomic_write_json, atomic_write_text, atomic_write_with


def test_round_trips_and_creates_parents(tmp_path):
    atomic_write_text(tmp_path / "a" / "b.txt", "hello")
    assert (tmp_path / "a" / "b.txt").read_text() == "hello"
    atomic_write_json(tmp_path / "c.json", {"x": 1})
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": 1}


def test_failure_keeps_previous_version_and_leaves_no_temp(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_open(target) as fh:
        fh.write(b"half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"

    def broken(name: str) -> None:
        open(name, "w").write("partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write_with(target, broken, suffix=".nii.gz")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_writer_sees_the_suffix(tmp_path):
    seen = []
    atomic_write_with(tmp_path / "m.nii.gz", lambda name: (seen.append(name), open(name, "w").write("x")), suffix=".nii.gz")
    assert seen[0].endswith(".nii.gz") and (tmp_path / "m.nii.gz").read_text() == "x"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_files_respect_the_umask(tmp_path, umask, mode):
    import os
    import stat

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_with(tmp_path / "b.nii.gz", lambda name: open(name, "w").write("y"), suffix=".nii.gz")
        with atomic_open(tmp_path / "c.bin") as fh:
            fh.write(b"z")
        with open(tmp_path / "plain.txt", "w") as fh:  # what a plain write gives: the reference
            fh.write("p")
    finally:
        os.umask(old)
    for name in ("a.txt", "b.nii.gz", "c.bin", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_os_errors_name_the_target_not_the_temporary_file(tmp_path, monkeypatch):
    import errno
    import os

    target = tmp_path / "ckpt.pt"
    atomic_write_text(target, "old")
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        atomic_write_text(target, "new")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
