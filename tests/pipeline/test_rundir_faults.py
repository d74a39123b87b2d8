"""Fault injection on run directories: nothing lost, nothing silent (issue 14, items 1 and 3).

Each test reproduces one fault a user hit (a reused directory, two writers, kill -9 during training,
duplicate metrics after a resume, a truncated latest checkpoint, a calibration under other settings)
and asserts the message, the exit status, and that nothing was lost: old checkpoints, best.pt and
results byte-identical, metrics.jsonl without duplicate or missing steps.

One finished tiny run (6 synthetic cases at 16 x 16, 4 steps, DDIM 2) is made once; tests that change
a run work on a copy of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medsegdiff.cli import main
from medsegdiff.config import load_config
from medsegdiff.inference.calibration import load_calibrations
from medsegdiff.pipeline import lock
from medsegdiff.pipeline.rundir import init_run_dir, init_shared_run_dir, release_run_dir
from medsegdiff.stages.meta import training_status
from medsegdiff.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "experiments" / "quickstart.yaml"


def reduced(work: Path) -> list[str]:
    return [
        f"run_root={work / 'runs'}", f"data.root={work / 'data'}", "data.synthetic.cases=6", "data.image_size=16",
        "data.prepare_workers=1", "train.steps=4", "train.batch_size=4", "train.time_budget_s=0",
        "train.log_every=1", "train.checkpoint_every=2", "train.keep_last=2", "train.validation.every=2",
        "train.validation.respacing=ddim2", "train.validation.max_cases=1", "inference.respacing=ddim2",
        "inference.ensemble=1", "evaluation.hd95=false", "tracking.backend=none", "device=cpu",
    ]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(run: Path) -> dict[str, str]:
    """sha256 of every checkpoint, the results, the metrics and the calibration of a run."""
    files = [*sorted((run / "checkpoints").glob("*.pt")), run / "results.json", run / "metrics.jsonl",
             run / "calibration.json", run / "config.yaml"]
    return {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def train_steps(run: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """``(work, run_dir)``: one finished run (prepare, train, predict, evaluate)."""
    work = tmp_path_factory.mktemp("faults")
    assert main(["run", str(QUICKSTART), *reduced(work), "--no-progress"]) == 0
    (run,) = [p for p in (work / "runs").iterdir() if p.name.startswith("quickstart")]
    return work, run


@pytest.fixture
def copy(base, tmp_path):
    """A copy of the finished run (its own folder; same cache and data)."""
    work, run = base
    dst = tmp_path / "run"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns(lock.LOCK_FILE))
    return work, dst


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _hold_lock(run: Path, extra: str = "") -> subprocess.Popen:
    """Another process that holds the lock of ``run`` (prints ``locked`` once it does)."""
    code = ("import sys, time; from medsegdiff.pipeline import lock; "
            f"lock.acquire(sys.argv[1], 'medsegdiff run other.yaml'); {extra}print('locked', flush=True); "
            "time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_the_finished_run_records_its_training(base):
    _, run = base
    assert training_status(run)["finished"] is True and training_status(run)["step"] == 4
    assert train_steps(run) == [1, 2, 3, 4]
    log = (run / "logs" / "run.log").read_text()
    assert "step 2/4: loss" in log and "checkpoint" in log and "step_00000004.pt" in log


def test_a_new_run_beside_a_finished_one_gets_a_suffix_and_leaves_it_intact(base):
    work, run = base
    before = snapshot(run)
    # the same experiment again without --resume (what `medsegdiff run` does first)
    rd, cfg = init_run_dir(load_config(QUICKSTART, reduced(work)), load_config(QUICKSTART), command=["again"])
    try:
        assert rd.root == run.parent / (run.name + "-2") and cfg.run_dir == str(rd.root)
        assert snapshot(run) == before and json.loads((run / "meta.json").read_text())["resumed"] == []
    finally:
        release_run_dir(rd)
        shutil.rmtree(rd.root)  # later tests reuse the newest run of this config


def test_an_explicit_run_dir_holding_a_run_is_refused(base, capsys):
    work, run = base
    before = snapshot(run)
    for args in (["run", QUICKSTART, *reduced(work), f"run_dir={run}", "--stages", "prepare,train"],
                 ["train", QUICKSTART, *reduced(work), "--run-dir", run]):
        code, _, err = cli(capsys, *args)
        assert code == 2 and err.count("\n") == 1, err
        assert f"{run}: run directory already holds a run; add --resume to continue it, --overwrite" in err
    assert snapshot(run) == before


def test_overwrite_moves_the_old_run_aside(copy, capsys):
    work, run = copy
    before = snapshot(run)
    code, out, _ = cli(capsys, "run", QUICKSTART, *reduced(work), f"run_dir={run}", "train.steps=2",
                       "--stages", "prepare,train", "--overwrite", "--no-progress")
    assert code == 0
    (old,) = run.parent.glob("run.old-*")
    assert f"moved the old {run} aside to {old}" in out
    assert snapshot(old) == before  # everything is still there, byte for byte
    assert train_steps(run) == [1, 2] and not (run / "results.json").exists()
    code, _, err = cli(capsys, "run", QUICKSTART, *reduced(work), f"run_dir={run}", "--resume", "--overwrite")
    assert code == 2 and "--resume and --overwrite exclude each other" in err


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(copy, capsys):
    work, run = copy
    before = snapshot(run)
    cache = load_config(run / "config.yaml").data.cache_dir
    holder = _hold_lock(run)
    try:
        for args in (
            ["run", QUICKSTART, *reduced(work), f"run_dir={run}", "--resume", "--stages", "train"],
            ["train", "--resume", run, "--no-progress"],
            ["calibrate", "--checkpoint", run / "checkpoints" / "best.pt", "--data", cache, "--no-progress"],
            ["predict", "--checkpoint", run / "checkpoints" / "best.pt", "--data", cache,
             "--out", run / "predictions", "--no-progress"],
        ):
            code, _, err = cli(capsys, *args)
            assert code == 2 and err.count("\n") == 1, (args, err)
            assert f"{run}: run directory in use by pid {holder.pid} on " in err, err
            assert "(`medsegdiff run other.yaml`)" in err
    finally:
        holder.send_signal(signal.SIGKILL)  # a crashed writer: the OS releases its lock
        holder.wait(timeout=30)
    assert snapshot(run) == before
    with lock.locked(run):  # free again although the holder never released it
        pass


def test_torchrun_ranks_above_zero_take_no_lock(copy, monkeypatch):
    _, run = copy
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-7")
    monkeypatch.setenv("RANK", "1")
    # "rank 0" (another process) holds the lock and has marked the folder with the launch id
    holder = _hold_lock(run, extra="import json, pathlib; pathlib.Path(sys.argv[1], '.launch').write_text("
                                   "json.dumps({'launch': 'TORCHELASTIC_RUN_ID=launch-7:'})); ")
    try:
        cfg = load_config(run / "config.yaml", [f"run_dir={run}"])
        rd, _ = init_shared_run_dir(cfg, None, resume=True, timeout_s=10)
        assert rd.root == run
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)


def test_kill_9_during_training_then_predict_is_refused_and_resume_logs_every_step_once(base, tmp_path, capsys):
    work, _ = base
    run = tmp_path / "killed"
    args = [*reduced(work), f"run_dir={run}", "train.steps=400", "train.checkpoint_every=3",
            "train.validation.every=3"]
    proc = subprocess.Popen([sys.executable, "-m", "medsegdiff.cli", "run", str(QUICKSTART), *args,
                             "--stages", "prepare,train", "--no-progress"], env=_env(), cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # kill once a checkpoint exists AND steps after it were logged (they must not survive twice)
        deadline = time.time() + 120
        while time.time() < deadline:
            ckpts = sorted((run / "checkpoints").glob("step_*.pt")) if run.is_dir() else []
            if ckpts and (run / "metrics.jsonl").is_file():
                last = int(ckpts[-1].stem.split("_")[1])
                if train_steps(run) and max(train_steps(run)) >= last + 2:
                    break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert training_status(run)["finished"] is False
    logged = max(train_steps(run))
    resume_from = max(int(p.stem.split("_")[1]) for p in (run / "checkpoints").glob("step_*.pt"))

    # predict/evaluate refuse the unfinished run, touching nothing
    before = snapshot(run)
    code, _, err = cli(capsys, "run", QUICKSTART, *args, "--stages", "predict,evaluate", "--no-progress")
    assert code == 2 and err.count("\n") == 1
    assert f"{run}: training did not finish (step " in err and "--allow-unfinished" in err
    assert not (run / "predictions").exists() and not (run / "results.json").exists()
    cache = load_config(run / "config.yaml").data.cache_dir
    code, _, err = cli(capsys, "predict", "--checkpoint", run / "checkpoints" / f"step_{resume_from:08d}.pt",
                       "--data", cache, "--out", tmp_path / "preds", "--no-progress")
    assert code == 2 and "training did not finish" in err and not (tmp_path / "preds").exists()
    fake = tmp_path / "fake-preds"  # predictions made (somehow) with the unfinished checkpoint
    fake.mkdir()
    (fake / "predict.json").write_text(json.dumps({"checkpoint": str(run / "checkpoints" / "best.pt")}))
    code, _, err = cli(capsys, "evaluate", "--pred", fake, "--gt", work / "data", "--out", tmp_path / "ev",
                       "--no-progress")
    assert code == 2 and "training did not finish" in err and "--allow-unfinished to evaluate" in err
    assert snapshot(run) == before
    # ... and go ahead when asked to
    code, out, _ = cli(capsys, "run", QUICKSTART, *args, "--stages", "predict,evaluate", "--allow-unfinished",
                       "--no-progress")
    assert code == 0 and (run / "results.json").is_file() and "MedSegDiff (this run)" in out

    # resume: says so, from which step; metrics.jsonl then holds every step exactly once
    total = resume_from + 2
    code, out, _ = cli(capsys, "run", QUICKSTART, *args, f"train.steps={total}", "--resume", "--stages", "train",
                       "--no-progress")
    assert code == 0
    assert f"[train] resumed from step_{resume_from:08d}.pt at step {resume_from} of {total}" in out
    if logged > resume_from:  # (killed between a checkpoint and the next step's log line: nothing to drop)
        dropped = re.search(r"dropped (\d+) metrics.jsonl line\(s\) logged after it", out)
        assert dropped and int(dropped.group(1)) >= logged - resume_from  # train lines (+ val/test ones)
    else:
        assert "dropped" not in out
    assert train_steps(run) == list(range(1, total + 1))
    val_steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "val/dice" in r]
    assert len(val_steps) == len(set(val_steps))
    assert training_status(run)["finished"] is True


def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(copy, capsys, caplog):
    work, run = copy
    bad = run / "checkpoints" / "step_00000004.pt"
    bad.write_bytes(bad.read_bytes()[:2000])  # a disk that filled up mid-write, say
    with caplog.at_level("WARNING"):
        code, out, err = cli(capsys, "run", QUICKSTART, *reduced(work), f"run_dir={run}", "train.steps=5",
                             "--resume", "--stages", "train", "--no-progress")
    assert code == 0, err
    assert f"{bad}: not a readable checkpoint (truncated or corrupt" in caplog.text
    assert "[train] resumed from step_00000002.pt at step 2 of 5 (skipped unreadable step_00000004.pt)" in out
    assert train_steps(run) == [1, 2, 3, 4, 5]
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "results.json").is_file()
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*.pt"))
    assert kept == ["step_00000004.pt", "step_00000005.pt"]  # step 4 rewritten (readable again), then pruned


def test_standalone_calibrate_under_other_settings_keeps_the_run_calibration(copy, capsys, caplog):
    _, run = copy
    (original,) = load_calibrations(run / "calibration.json")
    cache = load_config(run / "config.yaml").data.cache_dir
    best = run / "checkpoints" / "best.pt"
    code, out, _ = cli(capsys, "calibrate", "--checkpoint", best, "--data", cache, "--no-progress",
                       "inference.respacing=ddim3", "inference.ensemble=2", "inference.combine=vote")
    assert code == 0 and "kept 1 calibration(s) made under other settings" in out
    first, second = load_calibrations(run / "calibration.json")
    assert first == original  # not replaced
    assert second["settings"]["respacing"] == "ddim3" and second["settings"]["members"] == 2

    case = load_config(run / "config.yaml").data.split.file
    test_case = json.loads(Path(case).read_text())["test"][0]
    # the run's own settings: its threshold
    code, _, _ = cli(capsys, "predict", "--checkpoint", best, "--data", cache, "--out", run / "predict-same",
                     "--cases", test_case, "--no-progress", "inference.respacing=ddim2", "inference.ensemble=1",
                     "inference.overlays=false")
    assert code == 0
    meta = json.loads((run / "predict-same" / "predict.json").read_text())
    assert meta["threshold"] == original["threshold"] and meta["threshold_source"].endswith("calibration.json")
    # settings nobody calibrated: a loud warning and inference.threshold, not someone else's threshold
    with caplog.at_level("WARNING", logger="medsegdiff.inference"):
        code, _, _ = cli(capsys, "predict", "--checkpoint", best, "--data", cache, "--out", run / "predict-other",
                         "--cases", test_case, "--no-progress", "inference.respacing=ddim3", "inference.ensemble=3",
                         "inference.overlays=false", "inference.threshold=0.45")
    assert code == 0
    assert "no calibration for these settings" in caplog.text and "members=2 vs now 3" in caplog.text
    meta = json.loads((run / "predict-other" / "predict.json").read_text())
    assert meta["threshold"] == 0.45 and meta["threshold_source"] == "inference.threshold"


def test_resume_with_a_named_split_file_of_the_same_subjects_continues(copy, capsys, tmp_path):
    # bench learn hands every run the seed's shared split file; the run keeps its own copy of it
    work, run = copy
    shared = tmp_path / "shared_splits.json"
    shutil.copy(run / "splits.json", shared)
    code, out, err = cli(capsys, "run", QUICKSTART, *reduced(work), f"run_dir={run}", f"data.split.file={shared}",
                         "train.steps=5", "--resume", "--stages", "train", "--no-progress")
    assert code == 0, err
    assert "resumed from step_00000004.pt at step 4 of 5" in out
    assert train_steps(run) == [1, 2, 3, 4, 5]

    other = json.loads(shared.read_text())
    other["train"], other["test"] = other["train"][1:], sorted(other["test"] + other["train"][:1])
    shared.write_text(json.dumps(other))
    code, _, err = cli(capsys, "run", QUICKSTART, *reduced(work), f"run_dir={run}", f"data.split.file={shared}",
                       "train.steps=6", "--resume", "--stages", "train", "--no-progress")
    assert code != 0
    assert f"cannot resume, the model/data/diffusion settings differ (data.split.file={shared})" in err
