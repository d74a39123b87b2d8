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
