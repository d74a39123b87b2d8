"""torchrun with 2 CPU processes (gloo) equals one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from medsegdiff.training.checkpoint import load_checkpoint
from medsegdiff.training.distributed import DistContext, all_reduce_max_flag, init_distributed

ROOT = Path(__file__).resolve().parents[2]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def test_single_process_has_no_process_group(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    ctx = init_distributed("cpu")
    assert ctx == DistContext(0, 1, 0, torch.device("cpu"), False)
    assert not torch.distributed.is_initialized()
    assert all_reduce_max_flag(ctx, True) is True and all_reduce_max_flag(ctx, False) is False


def test_torchrun_two_ranks_match_one_process(stub_script, stubs, tmp_path):
    # Deterministic stub objective (no noise) and SGD: the averaged DDP gradient of 2 ranks x 2
    # samples equals the gradient of one process over the same 4 samples.
    common = ["train.steps=3", "train.batch_size=4", "train.checkpoint_every=3", "optim.warmup_steps=0"]
    one = tmp_path / "one"
    two = tmp_path / "two"
    subprocess.run([sys.executable, str(stub_script), str(one), *common], check=True, env=_env(), timeout=120)
    proc = stubs.run_two_ranks(two, [*common, "--report-threads"], env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_checkpoint(one / "checkpoints/step_00000003.pt")
    b = load_checkpoint(two / "checkpoints/step_00000003.pt")
    assert b["world_size"] == 2 and len(b["rng"]["per_rank"]) == 2
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-5), k
    # Only rank 0 wrote: one metrics file, no stray files from rank 1.
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step_00000003.pt"]
    stubs.assert_ranks_left_cleanly(two, 2)


def test_torchrun_accumulation_and_nan_on_one_rank(stub_script, tmp_path):
    # 2 ranks x 2 micro-steps (no_sync on the first) with a NaN loss on rank 1 only at step 1:
    # both ranks must agree to skip that step (no hang) and end equal to one process that skips it.
    common = ["train.steps=3", "train.batch_size=8", "train.grad_accum=2", "train.checkpoint_every=3",
              "optim.warmup_steps=0", "--nan-step", "1"]
    one = tmp_path / "one"
    two = tmp_path / "two"
    subprocess.run([sys.executable, str(stub_script), str(one), *common], check=True, env=_env(), timeout=120)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         str(stub_script), str(two), *common, "--nan-rank", "1"],
        env=_env(), timeout=180, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_checkpoint(one / "checkpoints/step_00000003.pt")
    b = load_checkpoint(two / "checkpoints/step_00000003.pt")
    assert a["bad_total"] == b["bad_total"] == 1
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-5, rtol=1e-5), k
