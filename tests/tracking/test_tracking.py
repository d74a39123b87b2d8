"""make_tracker: metrics.jsonl always, W&B offline by default, failures warn once and never raise."""

from __future__ import annotations

import json
import logging
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from medsegdiff.config import load_config
from medsegdiff.tracking import make_tracker, read_metrics, wandb_location
from medsegdiff.tracking.base import to_scalar
from medsegdiff.tracking.png import encode_png
from medsegdiff.tracking.wandb_tracker import is_logged_in, resolve_mode


def cfg_with(*overrides: str):
    return load_config(None, list(overrides))


def test_jsonl_records_every_call_with_step_and_time(tmp_path):
    t = make_tracker(cfg_with("tracking.backend=none"), tmp_path)
    t.log({"loss": torch.tensor(0.25), "lr": np.float32(0.5), "n": np.int64(3), "bad": float("nan")}, step=7)
    t.log_table("cases", ["case", "dice"], [["sub-stroke0001", np.float64(0.5)]], step=7)
    t.log_images("overlay", {"a": np.zeros((4, 6, 3), dtype=np.float32)}, step=8)
    t.finish()
    t.finish()  # idempotent
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert recs[0]["step"] == 7 and recs[0]["loss"] == 0.25 and recs[0]["lr"] == 0.5 and recs[0]["n"] == 3
    assert recs[0]["bad"] is None  # JSON has no NaN
    assert isinstance(recs[0]["time"], float)
    assert recs[1] == {**recs[1], "table": "cases", "columns": ["case", "dice"], "rows": [["sub-stroke0001", 0.5]]}
    png = tmp_path / recs[2]["files"]["a"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "wandb").exists()


def test_jsonl_lines_are_flushed_immediately(tmp_path):
    t = make_tracker(cfg_with("tracking.backend=none"), tmp_path)
    t.log({"x": 1}, step=1)
    # read while the tracker is still open (a crash after this line keeps it)
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["x"] == 1
    t.finish()


def test_png_encoding_roundtrip_pixels():
    img = np.array([[0, 255], [128, 64]], dtype=np.uint8)
    data = encode_png(img)
    # IHDR: width 2, height 2, bit depth 8, colour type 0 (grey)
    assert data[16:24] == (2).to_bytes(4, "big") + (2).to_bytes(4, "big")
    assert data[24:26] == bytes([8, 0])
    idat_len = int.from_bytes(data[33:37], "big")
    raw = zlib.decompress(data[41:41 + idat_len])
    assert raw == b"\x00\x00\xff\x00\x80\x40"  # filter byte 0 + row pixels


def test_to_scalar_rejects_vectors():
    with pytest.raises(TypeError, match="2 elements"):
        to_scalar(torch.ones(2))


def test_wandb_fake_offline_default_gets_config_and_metrics(tmp_path, fake_wandb):
    cfg = cfg_with("tracking.project=p", "tracking.group=g", "tracking.tags=[a,b]")
    t = make_tracker(cfg, tmp_path / "run", wandb_module=fake_wandb)
    t.log({"loss": 0.5}, step=3)
    t.log_table("tab", ["c"], [[1]], step=3)
    t.finish()
    init = fake_wandb.inits[0]
    assert init["mode"] == "offline"
    assert init["dir"] == str(tmp_path / "run")
    assert init["project"] == "p" and init["group"] == "g" and init["tags"] == ["a", "b"]
    assert init["name"] == "run"  # the run directory name
    assert init["config"]["tracking"]["project"] == "p"  # the resolved config is logged
    assert init["settings"].kw["init_timeout"] == 60.0
    assert fake_wandb.logged[0] == ({"loss": 0.5}, 3)
    assert fake_wandb.runs[0].finished
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[0]["loss"] == 0.5


def test_wandb_resume_reuses_run_id(tmp_path, fake_wandb):
    cfg = cfg_with()
    make_tracker(cfg, tmp_path, wandb_module=fake_wandb).finish()
    make_tracker(cfg, tmp_path, wandb_module=fake_wandb).finish()
    assert fake_wandb.inits[0]["id"] == fake_wandb.inits[1]["id"]
    assert fake_wandb.inits[1]["resume"] == "allow"


@pytest.fixture
def raising_wandb(fake_wandb):
    fake_wandb.log_raises = True
    return fake_wandb


def test_failing_wandb_log_does_not_stop_and_warns_once(tmp_path, raising_wandb, caplog):
    t = make_tracker(cfg_with(), tmp_path, wandb_module=raising_wandb)
    with caplog.at_level(logging.WARNING, logger="medsegdiff.tracking"):
        for step in range(5):
            t.log({"loss": 1.0 / (step + 1)}, step=step)
        t.log_table("x", ["a"], [[1]], step=5)
        t.finish()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "log" in warnings[0].getMessage()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r] == [0, 1, 2, 3, 4]


def test_wandb_that_cannot_start_warns_once_and_jsonl_goes_on(tmp_path, fake_wandb, caplog):
    fake_wandb.init_raises = True
    with caplog.at_level(logging.WARNING, logger="medsegdiff.tracking"):
        t = make_tracker(cfg_with(), tmp_path, wandb_module=fake_wandb)
        t.log({"a": 1}, step=1)
        t.finish()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "could not start" in warnings[0].getMessage()
    assert wandb_location(t) is None
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["a"] == 1


def test_training_goes_on_when_the_tracker_raises(tmp_path, raising_wandb, caplog):
    """A real (tiny) optimisation loop logging through a failing W&B finishes and learns."""
    tracker = make_tracker(cfg_with(), tmp_path, wandb_module=raising_wandb)
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    with caplog.at_level(logging.WARNING, logger="medsegdiff.tracking"):
        for step in range(50):
            loss = (w - 3.0).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            tracker.log({"loss": loss.detach()}, step=step)
        tracker.finish()
    assert abs(w.item() - 3.0) < 1e-3
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 50


def test_auto_mode_online_only_when_logged_in(tmp_path):
    assert resolve_mode("auto", {"NETRC": str(tmp_path / "none")}) == "offline"
    assert resolve_mode("auto", {"WANDB_API_KEY": "k"}) == "online"
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    netrc.chmod(0o600)
    assert is_logged_in({"NETRC": str(netrc)})
    assert resolve_mode("auto", {"NETRC": str(netrc)}) == "online"
    assert resolve_mode("online", {"WANDB_MODE": "offline"}) == "offline"
    assert resolve_mode("offline", {}) == "offline"


def test_nonzero_rank_logs_nothing(tmp_path, monkeypatch, fake_wandb):
    monkeypatch.setenv("RANK", "1")
    t = make_tracker(cfg_with(), tmp_path, wandb_module=fake_wandb)
    t.log({"a": 1}, step=1)
    t.finish()
    assert not (tmp_path / "metrics.jsonl").exists() and not fake_wandb.inits


def test_wandb_environment_is_honoured_and_said(tmp_path, monkeypatch, fake_wandb, caplog):
    """WANDB_MODE wins over tracking.mode and WANDB_DIR moves the files, each with a console warning."""
    from medsegdiff.tracking.wandb_tracker import environment_notes

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    assert environment_notes("offline", tmp_path) == []
    monkeypatch.setenv("WANDB_MODE", "online")
    assert resolve_mode("offline") == "online"
    elsewhere = tmp_path / "scratch"
    monkeypatch.setenv("WANDB_DIR", str(elsewhere))
    with caplog.at_level("WARNING", logger="medsegdiff.tracking"):
        t = make_tracker(cfg_with("tracking.mode=offline"), tmp_path / "run", wandb_module=fake_wandb)
        t.finish()
    init = fake_wandb.inits[0]
    assert init["mode"] == "online" and init["dir"] == str(elsewhere)
    text = caplog.text
    assert "WANDB_MODE=online in the environment overrides tracking.mode=offline" in text
    assert f"WANDB_DIR={elsewhere}" in text and str(tmp_path / "run" / "wandb") in text
    # the same mode as the config: nothing to say; an unknown mode is ignored, and said
    monkeypatch.delenv("WANDB_DIR")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert environment_notes("offline", tmp_path) == []
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    assert resolve_mode("offline") == "offline"
    assert "is not a W&B mode" in environment_notes("offline", tmp_path)[0]


def test_importing_tracking_does_not_import_wandb():
    import subprocess

    code = "import sys, medsegdiff.tracking, medsegdiff.tracking.wandb_tracker; print('wandb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_real_wandb_offline_run_lives_in_run_dir(tmp_path, monkeypatch):
    """The real wandb package, offline: the run folder is under run_dir/wandb and holds the metrics."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    t = make_tracker(cfg_with("tracking.mode=offline"), tmp_path)
    t.log({"quickstart_metric_xyz": 0.125}, step=2)
    mode, where = wandb_location(t)
    offline = Path(where)
    t.finish()
    assert mode == "offline"
    assert offline.parent == tmp_path / "wandb" and offline.name.startswith("offline-run-")
    # wandb-core writes the offline file asynchronously: wait for it (teardown flushes everything)
    import time

    import wandb

    deadline = time.monotonic() + 20
    data = b""
    while b"quickstart_metric_xyz" not in data and time.monotonic() < deadline:
        time.sleep(0.2)
        data = b"".join(p.read_bytes() for p in offline.glob("run-*.wandb"))
    if b"quickstart_metric_xyz" not in data:
        wandb.teardown()
        data = b"".join(p.read_bytes() for p in offline.glob("run-*.wandb"))
    assert b"quickstart_metric_xyz" in data and b"0.125" in data


def test_progress_tracker_advances_to_the_logged_step_and_forwards(tmp_path):
    from medsegdiff.tracking.progress import ProgressTracker

    inner = make_tracker(cfg_with("tracking.backend=none"), tmp_path)
    bar = ProgressTracker(inner, total=100, enabled=False)
    bar.log({"train/loss": 0.5}, step=20)
    bar.log({"val/dice": 0.25}, step=20)
    bar.log({"train/loss": 0.25}, step=40)
    assert bar.step == 40
    bar.close()
    inner.log({"after": 1}, step=41)  # closing the bar leaves the tracker open
    inner.finish()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [20, 20, 40, 41]


def test_learning_curves_written_at_finish_with_labelled_axes(tmp_path):
    from medsegdiff.tracking.curves import CURVES_FILE, learning_curves_figure
    from medsegdiff.tracking.jsonl import read_metrics

    t = make_tracker(cfg_with("tracking.backend=none"), tmp_path)
    for step in (1, 2, 3):
        t.log({"train/loss": 1.0 / step, "train/dice": 0.5, "train/lr": 0.1}, step=step)
    t.log({"val/dice": 0.4}, step=3)
    t.finish()
    assert (tmp_path / CURVES_FILE).is_file()
    fig = learning_curves_figure(read_metrics(tmp_path / "metrics.jsonl"))
    train_ax, val_ax = fig.axes
    assert train_ax.get_xlabel() == val_ax.get_xlabel() == "optimisation step"
    assert train_ax.get_ylabel() == "loss (per term)" and val_ax.get_ylabel() == "metric"
    assert sorted(t.get_text() for t in train_ax.get_legend().get_texts()) == ["train/dice", "train/loss"]  # no lr
    line = next(ln for ln in train_ax.get_lines() if ln.get_label() == "train/loss")
    assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == [1.0, 0.5, 1.0 / 3]
    # nothing to draw: no file
    other = tmp_path / "empty"
    t2 = make_tracker(cfg_with("tracking.backend=none"), other)
    t2.finish()
    assert not (other / CURVES_FILE).exists()


def test_truncate_metrics_drops_later_steps_and_torn_lines_in_place(tmp_path):
    from medsegdiff.tracking.jsonl import JsonlTracker, read_metrics, truncate_metrics

    assert truncate_metrics(tmp_path / "missing.jsonl", 3) == 0
    tracker = JsonlTracker(tmp_path)
    for step in (1, 2, 3, 4, 5):
        tracker.log({"train/loss": 1.0 / step}, step=step)
    tracker._fh.write('{"step": 6, "train/lo')  # a line torn by kill -9
    tracker._fh.flush()
    assert truncate_metrics(tracker.path, 3) == 3
    assert [r["step"] for r in read_metrics(tracker.path)] == [1, 2, 3]
    tracker.log({"train/loss": 0.25}, step=4)  # the open (append) handle keeps writing to the same file
    tracker.finish()
    assert [r["step"] for r in read_metrics(tracker.path)] == [1, 2, 3, 4]
    assert truncate_metrics(tracker.path, 10) == 0
