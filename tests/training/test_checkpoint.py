"""Checkpoint files: atomic writes, clear errors for bad files, latest/prune, inference loading."""

from __future__ import annotations

import os

import pytest
import torch

from medsegdiff.errors import CheckpointError
from medsegdiff.training import checkpoint as ck


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((2,), float(step))}, "step": step, "config": {}}


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = ck.step_path(tmp_path, 1)
    ck.save_checkpoint(path, _state(1))
    import medsegdiff.utils.io as io_mod

    def boom(fd):
        raise OSError("disk died mid-write")

    monkeypatch.setattr(io_mod.os, "fsync", boom)
    with pytest.raises(OSError, match="disk died"):
        ck.save_checkpoint(path, _state(2))
    monkeypatch.undo()
    assert torch.equal(ck.load_checkpoint(path)["model"]["w"], torch.full((2,), 1.0))
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left behind


def test_find_latest_ignores_partial_temporaries(tmp_path):
    for s in (3, 12):
        ck.save_checkpoint(ck.step_path(tmp_path, s), _state(s))
    # what a SIGKILL during a save leaves behind: a temporary with a partial payload
    (ck.checkpoint_dir(tmp_path) / ".step_00000020.pt.abc.tmp").write_bytes(b"PK\x03\x04partial")
    assert ck.find_latest(tmp_path) == ck.step_path(tmp_path, 12)
    assert ck.find_latest(tmp_path / "nothing") is None
    ck.prune_checkpoints(tmp_path, keep_last=1)
    assert [s for s, _ in ck.list_step_checkpoints(tmp_path)] == [12]


def test_truncated_checkpoint_is_one_line_error(tmp_path):
    path = tmp_path / "t.pt"
    ck.save_checkpoint(path, _state(1))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"t\.pt: not a readable checkpoint \(truncated or corrupt") as err:
        ck.load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_foreign_file_is_not_a_medsegdiff_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match=r"other\.pt: not a medsegdiff checkpoint \(expected keys model"):
        ck.load_checkpoint(path)
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        ck.load_checkpoint(text)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        ck.load_checkpoint(tmp_path / "missing.pt")


def test_rng_capture_restore_round_trip():
    import random

    import numpy as np

    state = ck.capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(1))
    ck.restore_rng(state)
    b = (random.random(), np.random.rand(), torch.rand(1))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_load_for_inference_uses_ema_and_embedded_config(stubs, tmp_path, monkeypatch):
    from medsegdiff.config import load_config, to_dict

    cfg = load_config(None, ["device=cpu"])
    net = stubs.TinyNet()
    ema = {k: v + 1.0 for k, v in net.state_dict().items()}
    path = ck.save_checkpoint(tmp_path / "c.pt", {"model": net.state_dict(), "ema": ema, "step": 3,
                                                   "config": to_dict(cfg)})
    monkeypatch.setattr(ck, "build_model", lambda c: stubs.TinyNet())
    model, got_cfg, ckpt = ck.load_for_inference(path, device="cpu")
    assert got_cfg == cfg and ckpt["step"] == 3 and not model.training
    assert torch.equal(model.conv1.weight, ema["conv1.weight"])
    model, _, _ = ck.load_for_inference(path, use_ema=False)
    assert torch.equal(model.conv1.weight, net.conv1.weight)
    os.remove(path)
    with pytest.raises(CheckpointError, match="no checkpoints/best.pt"):
        ck.load_for_inference(tmp_path)
