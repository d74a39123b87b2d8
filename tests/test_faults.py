"""Fault injection (issue #14): every expected fault is one line and exit 2, and nothing is lost.

File-system faults are injected for one folder only (``FaultyFolder``): creating, opening for
writing, renaming into it or fsyncing a file there raises the ``OSError`` the kernel would give
(``EROFS`` for a read-only mount, ``ENOSPC`` for a full disk, ``EACCES`` for missing
permissions). This works for any user (root ignores ``chmod``) and on any file system; the CLI is
called in-process (``medsegdiff.cli.main``) so the injection reaches every command.
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medsegdiff.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


class FaultyFolder:
    """Make writes under ``root`` fail with ``code`` (fsync only for files matching ``fsync_glob``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path, code: int, fsync_glob: str | None = None) -> None:
        self.root, self.code = str(root.resolve()), code
        real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
        real_replace, real_fsync = os.replace, os.fsync

        def inside(path) -> bool:
            try:
                p = os.path.abspath(os.fspath(path))
            except TypeError:  # a file descriptor
                return False
            return p == self.root or p.startswith(self.root + os.sep)

        def fail(path):
            raise OSError(code, os.strerror(code), os.fspath(path))

        def fake_open(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+") and inside(file):
                fail(file)
            return real_open(file, mode, *args, **kwargs)

        def fake_os_open(path, flags, *args, **kwargs):
            if flags & WRITE_FLAGS and inside(path):
                fail(path)
            return real_os_open(path, flags, *args, **kwargs)

        def fake_mkdir(path, *args, **kwargs):
            if inside(path) and not os.path.isdir(path):
                fail(path)
            return real_mkdir(path, *args, **kwargs)

        def fake_replace(src, dst, *args, **kwargs):
            if inside(dst):
                fail(dst)
            return real_replace(src, dst, *args, **kwargs)

        def fake_fsync(fd):
            name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else ""
            if inside(name) and fnmatch.fnmatch(os.path.basename(name), fsync_glob or "*"):
                raise OSError(code, os.strerror(code))  # a delayed write error: no file name
            return real_fsync(fd)

        if fsync_glob is None:
            monkeypatch.setattr(builtins, "open", fake_open)
            monkeypatch.setattr(io, "open", fake_open)
            monkeypatch.setattr(os, "open", fake_os_open)
            monkeypatch.setattr(os, "mkdir", fake_mkdir)
            monkeypatch.setattr(os, "replace", fake_replace)
        else:
            monkeypatch.setattr(os, "fsync", fake_fsync)


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"medsegdiff {command}: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture(scope="module")
def data_root(synthetic_dataset) -> Path:
    return synthetic_dataset("faults", cases=4, seed=5, layout="zenodo", shape="tiny")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_checkpoint_factory) -> Path:
    return tiny_checkpoint_factory(tmp_path_factory.mktemp("ckpt_run"), ["cbf", "tmax"], data={"layout": "zenodo"},
                                   inference={"ensemble": 1})


# ------------------------------------------------------------------------ read-only outputs


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only file system"),
                                         (errno.EACCES, "permission denied")])
def test_synth_prepare_baseline_on_an_unwritable_folder(data_root, tmp_path, monkeypatch, capsys, code, words):
    out = tmp_path / "ro"
    out.mkdir()
    before = files_under(data_root)
    FaultyFolder(monkeypatch, out, code)
    runs = {
        "synth": ["synth", str(out / "data"), "--cases", "2", "--no-progress"],
        "prepare": ["prepare", str(data_root), "--out", str(out / "cache"), "data.image_size=16", "--no-progress"],
        "baseline": ["baseline", "tmax", str(data_root), "--out", str(out / "tmax"), "--no-progress"],
    }
    for command, argv in runs.items():
        assert main(argv) == 2, command
        line = one_error_line(capsys, command)
        assert str(out) in line and words in line and f"[{errno.errorcode[code]}]" in line, line
    assert files_under(out) == [] and files_under(data_root) == before  # nothing half-written, input intact


def test_predict_evaluate_train_on_a_read_only_folder(data_root, checkpoint, tmp_path, monkeypatch, capsys):
    # a real prediction folder to score first (the Tmax baseline writes masks named like predictions)
    preds = tmp_path / "preds"
    assert main(["baseline", "tmax", str(data_root), "--out", str(preds), "--no-progress"]) == 0
    capsys.readouterr()
    ro = tmp_path / "ro"
    ro.mkdir()
    FaultyFolder(monkeypatch, ro, errno.EROFS)
    runs = {
        "predict": ["predict", "--checkpoint", str(checkpoint), "--data", str(data_root), "--out", str(ro / "p"),
                    "--no-progress", "inference.overlays=false"],
        "evaluate": ["evaluate", "--pred", str(preds), "--gt", str(data_root), "--out", str(ro / "e"),
                     "--no-progress"],
        "train": ["train", str(QUICKSTART), f"data.root={data_root}", "tracking.backend=none",
                  "--run-dir", str(ro / "run")],
    }
    for command, argv in runs.items():
        assert main(argv) == 2, command
        line = one_error_line(capsys, command)
        assert "read-only file system" in line and str(ro) in line, line
    assert files_under(ro) == []


# ------------------------------------------------------------------------- full disk in training


def test_full_disk_during_training_keeps_the_previous_checkpoint(data_root, tmp_path, monkeypatch, capsys):
    from medsegdiff.tracking.jsonl import read_metrics
    from medsegdiff.training.checkpoint import load_checkpoint

    run_dir = tmp_path / "run"
    FaultyFolder(monkeypatch, run_dir, errno.ENOSPC, fsync_glob=".step_00000004.pt.*")
    argv = ["train", str(QUICKSTART), f"data.root={data_root}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.image_size=16", "data.prepare_workers=1", "train.steps=4", "train.batch_size=4",
            "train.checkpoint_every=2", "train.keep_last=5", "train.log_every=1", "train.time_budget_s=0",
            "train.validation.every=0", "train.validation.respacing=ddim2", "train.validation.max_cases=1",
            "tracking.backend=none", "device=cpu", "--run-dir", str(run_dir)]
    assert main(argv) == 2
    line = one_error_line(capsys, "train")
    assert line.endswith("step_00000004.pt: no space left on device; free space or write to another disk, then "
                         "rerun (files are replaced atomically, so what was written before is intact; --resume "
                         "continues training) [ENOSPC]"), line
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert "step_00000002.pt" in ckpts and "step_00000004.pt" not in ckpts
    assert not [n for n in ckpts if n.startswith(".")]  # no temporary file left behind
    assert load_checkpoint(run_dir / "checkpoints" / "step_00000002.pt")["step"] == 2  # intact
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3, 4]  # no step lost or repeated


# ------------------------------------------------------------------------------- other faults


def test_broken_pipe_is_a_quiet_exit():
    proc = subprocess.Popen([sys.executable, "-m", "medsegdiff.cli", "config", "--keys"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc.stdout.close()  # the reader goes away at once, like `| head -0`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141
    assert err == ""


def test_config_runs_the_checks_training_runs(capsys):
    cases = {
        ("device=tpu",): "config key 'device': got 'tpu'; allowed: auto, cpu, cuda, cuda:N",
        ("data.image_size=30",): "image size 30 (in (30, 30)) is not a multiple of 2^2 = 4",
        ("data.split.test_fraction=0.6", "data.split.val_fraction=0.5"):
            "config key 'data.split.val_fraction': got 0.5; allowed: test_fraction + val_fraction < 1",
    }
    for overrides, message in cases.items():
        assert main(["config", str(QUICKSTART), *overrides]) == 2
        assert message in one_error_line(capsys, "config")
    assert main(["config", str(QUICKSTART), "data.image_size=32"]) == 0


def test_evaluate_refuses_a_probability_map_unless_thresholded(data_root, tmp_path, capsys):
    from medsegdiff.data.discovery import discover_cases

    case = discover_cases(data_root, ["tmax"]).cases[0]
    ref = sitk.ReadImage(str(case.mask))
    gt = sitk.GetArrayFromImage(ref) > 0
    prob = np.where(gt, 0.8, 0.01).astype(np.float32)  # a probability map: > 0 everywhere
    img = sitk.GetImageFromArray(prob)
    img.CopyInformation(ref)
    preds = tmp_path / "preds"
    preds.mkdir()
    sitk.WriteImage(img, str(preds / f"{case.case_id}.nii.gz"))
    out = tmp_path / "eval"
    argv = ["evaluate", "--pred", str(preds), "--gt", str(data_root), "--out", str(out), "--no-progress",
            "--cases", case.case_id, "--no-hd95"]
    assert main(argv) == 2
    line = one_error_line(capsys, "evaluate")
    assert "not a binary mask (non-zero values from 0.01 to 0.8" in line and "--threshold" in line
    assert not out.exists()
    assert main([*argv, "--threshold", "0.5"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"]["dice"]["mean"] == pytest.approx(1.0) and summary["prediction_threshold"] == 0.5


def test_nan_maps_are_counted_on_the_console_and_an_all_nan_map_is_named(data_root, tmp_path, caplog):
    import shutil

    from medsegdiff.config import load_config
    from medsegdiff.data.discovery import discover_cases
    from medsegdiff.data.loading import CaseError, load_case

    root = tmp_path / "nan"
    shutil.copytree(data_root, root)
    cfg = load_config(None, ["data.modalities=[cbf,tmax]"]).data
    case = discover_cases(root, cfg.modalities).cases[0]
    cbf = sitk.ReadImage(str(case.images["cbf"]), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(cbf)
    arr[: arr.shape[0] // 2] = np.nan
    half = sitk.GetImageFromArray(arr)
    half.CopyInformation(cbf)
    sitk.WriteImage(half, str(case.images["cbf"]))
    with caplog.at_level("WARNING", logger="medsegdiff.data.loading"):
        loaded = load_case(case, cfg)
    n_nan = int(np.isnan(arr).sum())
    assert loaded.nonfinite["cbf"] == n_nan > 0
    assert f"{n_nan} of {arr.size} voxels" in caplog.text and "NaN or inf" in caplog.text
    tmax = sitk.ReadImage(str(case.images["tmax"]), sitk.sitkFloat32)
    nan = sitk.GetImageFromArray(np.full(sitk.GetArrayFromImage(tmax).shape, np.nan, np.float32))
    nan.CopyInformation(tmax)
    sitk.WriteImage(nan, str(case.images["tmax"]))
    with pytest.raises(CaseError, match=r"tmax file .* holds no number: all \d+ voxels are NaN or inf") as info:
        load_case(case, cfg)
    assert "all voxels are 0" not in str(info.value)
