"""``medsegdiff train`` argument handling: mistakes are one line on stderr, exit status 2."""

from __future__ import annotations

from medsegdiff.cli import main


def test_train_without_config_or_run_dir(capsys):
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medsegdiff train: error: medsegdiff train needs a config file")
    assert err.count("\n") == 1


def test_resume_from_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}/config.yaml: not a run directory (no config.yaml)" in err


def test_override_in_place_of_config_is_an_override(tmp_path, capsys):
    # `medsegdiff train --resume DIR train.steps=5`: the override is not taken for a config file
    assert main(["train", "train.steps=5", "--resume", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_train_shows_progress_logs_steps_and_says_when_it_resumes(tiny_data, tmp_path, capsys, caplog):
    from pathlib import Path

    from medsegdiff.stages.meta import training_status
    from medsegdiff.tracking import read_metrics

    data, cache = tiny_data
    quickstart = Path(__file__).resolve().parents[2] / "experiments" / "quickstart.yaml"
    run = tmp_path / "run"
    args = ["train", str(quickstart), "device=cpu", "tracking.backend=none", f"data.root={data}",
            f"data.cache_dir={cache}", "data.image_size=16", "data.split.test_fraction=0.0",
            "data.split.val_fraction=0.3", "model.base_channels=8", "model.channel_mult=[1,2]",
            "model.attention_resolutions=[2]", "model.norm_groups=4", "train.steps=4", "train.batch_size=4",
            "train.log_every=1", "train.checkpoint_every=2", "train.validation.every=0", "train.time_budget_s=0",
            "--run-dir", str(run)]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert f"[train] {run}: medsegdiff_v1 (tiny) for 4 steps" in out and '"steps": 4' in out
    assert "train: 100%" in err and "4/4" in err  # the progress bar (stderr)
    log = (run / "logs" / "run.log").read_text()
    for line in ("step 1/4: loss", "step 4/4: loss", "step 2: checkpoint", "step_00000004.pt", "4 of 4 steps done"):
        assert line in log, line
    assert training_status(run)["finished"] is True

    with caplog.at_level("INFO", logger="medsegdiff"):
        assert main(["train", "--resume", str(run), "train.steps=6", "-v", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "[train] resumed from step_00000004.pt at step 4 of 6" in out
    assert "train:" not in err  # --no-progress
    assert "step 5/6: loss" in caplog.text  # -v: the per-step lines reach the console handler
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert "resumed from step_00000004.pt" in (run / "logs" / "run.log").read_text()
