"""A run killed with SIGKILL resumes from its last checkpoint to bit-identical weights (CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from medsegdiff.training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_sigkill_then_resume_is_bit_identical(stub_script, tmp_path):
    args = ["--noise", "0.3", "--dropout", "0.2", "train.steps=10", "train.checkpoint_every=2", "train.grad_accum=2"]
    full = tmp_path / "full"
    subprocess.run([sys.executable, str(stub_script), str(full), *args], check=True, env=_env(), timeout=120)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(stub_script), str(killed), "--sleep", "0.15", *args], env=_env())
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not list((killed / "checkpoints").glob("step_*.pt")):
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = sorted((killed / "checkpoints").glob("step_*.pt"))
    assert done and "step_00000010.pt" not in [p.name for p in done]  # killed mid-run
    subprocess.run([sys.executable, str(stub_script), str(killed), "--resume", *args], check=True, env=_env(),
                   timeout=120)
    a = load_checkpoint(full / "checkpoints/step_00000010.pt")
    b = load_checkpoint(killed / "checkpoints/step_00000010.pt")
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
