"""Sweeps: grid expansion, naming, validation up front, launch scripts, index, local runs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from medsegdiff.errors import ConfigError
from medsegdiff.pipeline.sweep import expand_sweep, index_entries, run_local, write_index, write_scripts


def make_sweep(tmp_path: Path, grid: str, extra: str = "") -> Path:
    (tmp_path / "exp.yaml").write_text("name: toy\ntrain: {steps: 3}\n")
    path = tmp_path / "sw.yaml"
    path.write_text(f"base: exp.yaml\noverrides: [train.batch_size=2]\ngrid:\n{grid}{extra}")
    return path


GRID = "  optim.lr: [1.0e-4, 3e-4]\n  model.name: [medsegdiff_v1, medsegdiff_v2, dynunet]\n"


def test_grid_is_the_product_in_file_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = expand_sweep(make_sweep(tmp_path, GRID))
    assert len(sweep.runs) == 6
    got = [(r.cfg.optim.lr, r.cfg.model.name) for r in sweep.runs]
    assert got == [(1e-4, "medsegdiff_v1"), (1e-4, "medsegdiff_v2"), (1e-4, "dynunet"),
                   (3e-4, "medsegdiff_v1"), (3e-4, "medsegdiff_v2"), (3e-4, "dynunet")]
    assert all(r.cfg.train.batch_size == 2 for r in sweep.runs)  # common overrides
    assert all(r.cfg.tracking.group == "sw" for r in sweep.runs)  # W&B group = sweep name
    names = [r.name for r in sweep.runs]
    assert len(set(names)) == 6
    assert names[0].startswith("toy-optim.lr=0.0001-model.name=medsegdiff_v1-")
    assert sweep.out == Path("runs/sweeps/sw")


def test_a_bad_grid_value_fails_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"run 1 \(optim.lr=-1\): .*config key 'optim.lr': got -1"):
        expand_sweep(make_sweep(tmp_path, "  optim.lr: [1.0e-4, -1]\n"))
    with pytest.raises(ConfigError, match=r"unknown config key 'gird'"):
        (tmp_path / "bad.yaml").write_text("base: exp.yaml\ngird: {}\n")
        expand_sweep(tmp_path / "bad.yaml")


def test_torchrun_scripts_are_executable_and_valid_bash(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = expand_sweep(make_sweep(tmp_path, GRID, "torchrun: {nproc_per_node: 4}\n"), out=tmp_path / "o")
    scripts = write_scripts(sweep, "torchrun")
    assert len(scripts) == 6 and all(os.access(p, os.X_OK) for p in scripts)
    text = scripts[1].read_text()
    assert "--standalone" in text and 'NPROC=${NPROC_PER_NODE:-4}' in text
    assert "model.name=medsegdiff_v2" in text and "optim.lr=0.0001" in text
    assert f"run_dir={tmp_path / 'runs' / sweep.runs[1].name}" in text and "--resume" in text
    for p in [*scripts, scripts[0].parent / "run_all.sh"]:
        subprocess.run(["bash", "-n", str(p)], check=True)
    assert not list(scripts[0].parent.glob(".*tmp*"))  # atomic writes leave no temporary files


def test_multinode_torchrun_uses_c10d_rendezvous(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = expand_sweep(make_sweep(tmp_path, "  seed: [1]\n", "torchrun: {nnodes: 2, nproc_per_node: 8}\n"))
    text = write_scripts(sweep, "torchrun")[0].read_text()
    assert "--nnodes=2" in text and "--rdzv_backend=c10d" in text and "MASTER_ADDR" in text and "NODE_RANK" in text


def test_slurm_scripts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = "slurm: {partition: gpu, gpus_per_node: 4, nodes: 2, time: '12:00:00', extra: ['--qos=high']}\n"
    sweep = expand_sweep(make_sweep(tmp_path, GRID, extra), out=tmp_path / "o")
    scripts = write_scripts(sweep, "slurm")
    text = scripts[0].read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu",
                 "#SBATCH --time=12:00:00", "#SBATCH --qos=high", "#SBATCH --requeue"):
        assert line in text
    assert "srun" in text and "--nproc_per_node=4" in text and '--rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT"' in text
    subprocess.run(["bash", "-n", str(scripts[0])], check=True)
    run_all = (scripts[0].parent / "run_all.sh").read_text()
    assert run_all.count("sbatch ") == 6
    index = write_index(sweep, index_entries(sweep, scripts), "slurm")
    data = json.loads(index.read_text())
    assert data["launcher"] == "slurm" and len(data["runs"]) == 6
    assert data["runs"][5]["script"] == str(scripts[5]) and data["runs"][5]["values"]["model.name"] == "dynunet"


def test_local_runs_go_on_after_a_failure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = expand_sweep(make_sweep(tmp_path, "  seed: [1, 2, 3]\n"), out=tmp_path / "o")
    seen = []

    def runner(run):
        seen.append(run.cfg.seed)
        if run.cfg.seed == 2:
            raise RuntimeError("boom")

    entries = run_local(sweep, runner=runner)
    assert seen == [1, 2, 3]
    assert [e["status"] for e in entries] == ["done", "failed", "done"]
    assert "boom" in entries[1]["error"]
    assert json.loads((tmp_path / "o" / "index.json").read_text())["runs"][1]["status"] == "failed"


def test_cli_dry_run_lists_runs(tmp_path, monkeypatch, capsys):
    from medsegdiff.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(make_sweep(tmp_path, GRID)), "--dry-run", "--out", "o"]) == 0
    out = capsys.readouterr().out
    assert "6 runs" in out and "dry run" in out
    assert (tmp_path / "o" / "index.json").is_file() and not (tmp_path / "runs").exists()
