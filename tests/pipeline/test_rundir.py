"""Run directories: readable deterministic names, uniqueness, provenance, resume, distributed ranks."""

from __future__ import annotations

import json
import re

import pytest
import torch

from medsegdiff.config import load_config
from medsegdiff.errors import CheckpointError
from medsegdiff.pipeline.rundir import (
    MAX_NAME,
    RunDir,
    changed_settings,
    init_run_dir,
    init_shared_run_dir,
    run_name,
)

SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


@pytest.fixture
def ref():
    return load_config(None, ["name=quickstart"])


def test_name_shows_changed_settings_and_a_hash(ref):
    cfg = load_config(None, ["name=quickstart", "model.name=medsegdiff_v2", "optim.lr=3e-4"])
    name = run_name(cfg, ref)
    assert re.fullmatch(r"quickstart-model\.name=medsegdiff_v2-optim\.lr=0\.0003-[0-9a-f]{6}", name), name
    assert re.fullmatch(r"quickstart-[0-9a-f]{6}", run_name(ref, ref))


def test_name_is_deterministic_and_differs_by_settings(ref):
    a = load_config(None, ["name=quickstart", "optim.lr=3e-4"])
    b = load_config(None, ["name=quickstart", "optim.lr=3e-4"])
    c = load_config(None, ["name=quickstart", "optim.lr=1e-4"])
    assert run_name(a, ref) == run_name(b, ref)
    assert run_name(a, ref) != run_name(c, ref)
    # tracking and where runs go do not change what is computed: same name
    d = load_config(None, ["name=quickstart", "optim.lr=3e-4", "tracking.mode=online", "run_root=/elsewhere"])
    assert run_name(d, ref) == run_name(a, ref)


def test_name_is_filesystem_safe_and_short(ref):
    cfg = load_config(None, ["name=my exp/1", "data.root=/data with space/ISLES24 (v7)/train",
                             "model.channel_mult=[1,2,4,8]", "data.modalities=[cbf,tmax]",
                             "train.steps=12345", "optim.weight_decay=0.05", "loss.dice_weight=2.5",
                             "train.batch_size=3", "seed=17"])
    name = run_name(cfg, ref)
    assert SAFE.match(name), name
    assert len(name) <= MAX_NAME
    assert "/" not in name and " " not in name
    assert re.search(r"-[0-9a-f]{6}$", name)  # the hash survives shortening


def test_changed_settings_against_reference(ref):
    cfg = load_config(None, ["name=quickstart", "train.steps=5"])
    assert changed_settings(cfg, ref) == [("train.steps", 5)]


def test_unique_suffix_unless_resumed(tmp_path, ref):
    cfg = load_config(None, ["name=quickstart", f"run_root={tmp_path}"])
    ref = load_config(None, ["name=quickstart", f"run_root={tmp_path}"])
    rd1, _ = init_run_dir(cfg, ref)
    rd2, _ = init_run_dir(cfg, ref)
    assert rd2.root.name == rd1.root.name + "-2"
    rd3, _ = init_run_dir(cfg, ref, resume=True)
    assert rd3.root == rd2.root  # resume picks the newest folder of that name


def test_run_directory_holds_config_and_provenance(tmp_path, ref):
    cfg = load_config(None, ["name=quickstart", f"run_root={tmp_path}", "train.steps=3"])
    rd, cfg2 = init_run_dir(cfg, ref, command=["medsegdiff", "run", "x.yaml"])
    assert rd.root.parent == tmp_path and rd.checkpoints.is_dir() and rd.logs.is_dir()
    saved = load_config(rd.config)
    assert saved == cfg2 and saved.run_dir == str(rd.root) and saved.train.steps == 3
    meta = json.loads(rd.meta.read_text())
    assert meta["command"] == "medsegdiff run x.yaml"
    assert meta["packages"]["torch"] == torch.__version__
    assert set(meta["packages"]) >= {"torch", "monai", "SimpleITK", "numpy", "wandb", "medsegdiff"}
    commit = meta["git"]["commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    assert meta["git"]["dirty"] in (None, True, False)
    assert meta["python"].count(".") == 2 and meta["platform"] and meta["started"].endswith("+00:00")


def test_git_state_is_null_without_git(tmp_path, monkeypatch):
    from medsegdiff.pipeline import rundir

    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable
    assert rundir.git_state(tmp_path) == {"commit": None, "dirty": None}


def test_resume_records_the_new_start_and_refuses_a_different_model(tmp_path):
    cfg = load_config(None, [f"run_root={tmp_path}"])
    rd, cfg = init_run_dir(cfg, None)
    rd2, _ = init_run_dir(cfg, None, resume=True, command=["again"])
    assert rd2.root == rd.root
    meta = json.loads(rd.meta.read_text())
    assert meta["resumed"][0]["command"] == "again"
    other = load_config(None, [f"run_root={tmp_path}", f"run_dir={rd.root}", "model.base_channels=8"])
    with pytest.raises(CheckpointError, match=r"cannot resume, the model/data/diffusion settings differ "
                                              r"\(model.base_channels=8\)"):
        init_run_dir(other, None, resume=True)


def test_all_ranks_of_a_launch_share_one_folder(tmp_path, monkeypatch):
    cfg = load_config(None, ["name=ddp", f"run_root={tmp_path}"])
    init_run_dir(cfg, None)  # an older run of the same config exists: the launch gets "-2"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-42")
    monkeypatch.setenv("RANK", "0")
    rd0, _ = init_shared_run_dir(cfg, None)
    monkeypatch.setenv("RANK", "1")
    rd1, cfg1 = init_shared_run_dir(cfg, None, timeout_s=5)
    assert rd0.root == rd1.root and rd0.root.name.endswith("-2") and cfg1.run_dir == str(rd0.root)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "another-launch")
    with pytest.raises(CheckpointError, match="did not find the run directory made by rank 0"):
        init_shared_run_dir(cfg, None, timeout_s=0.2)


def test_rundir_paths():
    rd = RunDir(__import__("pathlib").Path("/r/x"))
    assert rd.metrics.name == "metrics.jsonl" and rd.splits.name == "splits.json"
    assert rd.baseline_predictions.as_posix() == "/r/x/baseline/predictions"
