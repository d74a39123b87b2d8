"""Learning benchmark: bad methods stop early, a --quick run end to end, --jobs, 3-D (statistics: tests/metrics/test_bootstrap.py)."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from medsegdiff.bench.learn import LearnBenchSettings, run_learn_bench
from medsegdiff.cli import main
from medsegdiff.errors import ConfigError


def test_an_invalid_method_stops_before_anything_runs(tmp_path):
    settings = LearnBenchSettings(out_dir=tmp_path / "out", methods={"v1_x0": [], "typo": ["optim.lrr=1e-3"]},
                                  references=["cbf_rule"])
    with pytest.raises(ConfigError, match=r"method 'typo' \(optim.lrr=1e-3\): .*optim.lrr"):
        run_learn_bench(settings, progress=False)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match=r"--reference: unknown name 'oracle'"):
        run_learn_bench(LearnBenchSettings(out_dir=tmp_path / "o2", references=["oracle"]), progress=False)


# ------------------------------------------------------------------------------- --quick, end to end


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_learn") / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        code = main(["bench", "learn", "--quick", "--out", str(out), "--no-progress"])
    return out, code, buf.getvalue()


def test_quick_run_reports_every_method_and_reference(quick):
    out, code, stdout = quick
    assert code == 0
    summary = json.loads(stdout)
    report = json.loads((out / "report.json").read_text())
    assert summary["report"] == str(out / "report.json") and summary["wall_seconds"] > 0
    assert list(report["methods"]) == ["v1_x0", "dynunet"]
    assert list(report["references"]) == ["tmax", "cbf_rule", "ceiling", "acute_core"]
    for name, entry in {**report["methods"], **report["references"]}.items():
        m = entry["metrics"]
        assert m["dice"]["n"] == 4, name  # 2 seeds x 2 test cases
        for key in ("dice", "lesion_f1", "avd_ml", "precision", "recall"):  # evaluate's keys passed through
            assert key in m, (name, key)
        assert 0.0 <= m["dice"]["ci95"][0] <= m["dice"]["mean"] <= m["dice"]["ci95"][1] <= 1.0
        assert "cbf_rule" in entry["paired"] or name == "cbf_rule"
    v1 = report["methods"]["v1_x0"]
    assert v1["steps"] == [4, 4] and v1["train_seconds"]["mean"] > 0 and v1["sample_seconds"]["mean"] > 0
    assert [h[0] for h in v1["history"]["0"]] == [4.0]  # validation history for the Dice-vs-steps plot
    # the paired difference is the per-case difference on the same cases
    rows = {s: json.loads((out / "runs" / "v1_x0" / f"seed{s}" / "bench_result.json").read_text())["cases"]
            for s in (0, 1)}
    refs = {s: json.loads((out / "references" / f"seed{s}" / "bench_result.json").read_text())["cases"]["cbf_rule"]
            for s in (0, 1)}
    diff = np.mean([a["dice"] - b["dice"] for s in (0, 1) for a, b in zip(rows[s], refs[s])])
    assert v1["paired"]["cbf_rule"]["mean"] == pytest.approx(diff)
    assert report["references"]["ceiling"]["metrics"]["dice"]["mean"] >= 0.9
    core = report["references"]["acute_core"]["metrics"]  # what the acute images show: part of the lesion
    assert core["precision"]["mean"] == pytest.approx(1.0) and core["dice"]["mean"] < 1.0
    for name in ("dice_vs_steps.png", "paired_differences.png", "report.txt"):
        assert (out / name).stat().st_size > 0
    table = (out / "report.txt").read_text()
    assert "Dice [95% CI]" in table and "cbf_rule (Tmax > 6 s & CBF < 15 rule)" in table
    assert "acute_core (acute-core oracle)" in table


def test_a_second_run_reuses_finished_runs(quick):
    out = quick[0]
    stamp = (out / "runs" / "v1_x0" / "seed0" / "bench_result.json").stat().st_mtime_ns
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        assert main(["bench", "learn", "--quick", "--out", str(out), "--no-progress"]) == 0
    assert (out / "runs" / "v1_x0" / "seed0" / "bench_result.json").stat().st_mtime_ns == stamp
    assert json.loads(buf.getvalue())["wall_seconds"] < 30


def test_a_run_made_with_other_settings_is_kept_aside_and_run_again(tmp_path):
    # same method overrides, but the base experiment changed: the old result must not be reused
    out = tmp_path / "out"
    quickstart = Path(__file__).resolve().parents[2] / "experiments" / "quickstart.yaml"
    base = tmp_path / "base.yaml"
    base.write_text(quickstart.read_text().replace("  lr: 1.0e-3", "  lr: 2.0e-3"))
    assert "lr: 2.0e-3" in base.read_text()
    args = ["bench", "learn", "--quick", "--methods", "dynunet", "--seeds", "0,1", "--out", str(out)]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main([*args, "--no-progress"]) == 0
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert main([*args, "--base", str(base)]) == 0, err.getvalue()
    for seed in (0, 1):
        assert f"dynunet seed {seed}: its settings changed since it ran (optim.lr=0.002)" in err.getvalue()
        (moved,) = (out / "runs" / "dynunet").glob(f"seed{seed}.stale-*")
        assert (moved / "bench_result.json").is_file()  # the old run is kept
        fresh = yaml.safe_load((out / "runs" / "dynunet" / f"seed{seed}" / "config.yaml").read_text())
        assert fresh["optim"]["lr"] == 0.002
    assert "done before, reused" not in err.getvalue()

    # only a sampling setting changes: the trained model stands and is sampled again
    trained = {s: (out / "runs" / "dynunet" / f"seed{s}" / "bench_train.json").read_text() for s in (0, 1)}
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert main([*args, "--base", str(base), "--override", "inference.threshold=0.4"]) == 0, err.getvalue()
    for seed in (0, 1):
        run = out / "runs" / "dynunet" / f"seed{seed}"
        assert (f"dynunet seed {seed}: its sampling settings changed since it ran (inference.threshold=0.4); "
                "predicting again with the trained model") in err.getvalue()
        assert (run / "bench_train.json").read_text() == trained[seed]  # not trained again
        assert len(list(run.glob("bench_result.stale-*.json"))) == 1  # the old result is kept
        assert len(list((out / "runs" / "dynunet").glob(f"seed{seed}.stale-*"))) == 1  # no new folder moved
        assert json.loads((run / "predictions" / "predict.json").read_text())["threshold"] == 0.4


def test_jobs_2_runs_each_method_seed_in_its_own_process_with_the_same_results(quick, tmp_path):
    out = tmp_path / "parallel"
    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        code = main(["bench", "learn", "--quick", "--jobs", "2", "--out", str(out)])
    assert code == 0, err.getvalue()
    threads = max(1, (os.cpu_count() or 1) // 2)
    assert f"4 runs, 2 at a time ({threads} CPU thread(s) each)" in err.getvalue()
    report = json.loads((out / "report.json").read_text())
    sequential = json.loads((quick[0] / "report.json").read_text())
    assert report["settings"]["jobs"] == 2 and sequential["settings"]["jobs"] == 1
    for name in ("v1_x0", "dynunet"):
        for seed in (0, 1):
            got = json.loads((out / "runs" / name / f"seed{seed}" / "bench_result.json").read_text())["cases"]
            want = json.loads((quick[0] / "runs" / name / f"seed{seed}" / "bench_result.json").read_text())["cases"]
            assert [c["case_id"] for c in got] == [c["case_id"] for c in want]
            assert [c["dice"] for c in got] == pytest.approx([c["dice"] for c in want], abs=1e-6), (name, seed)


def test_a_3d_patch_method_runs_with_sliding_window_validation(tmp_path):
    methods = tmp_path / "m3d.yaml"
    methods.write_text('methods:\n  v1_3d: [data.dims=3, "data.patch_size=[4,24,24]"]\nonly: [v1_3d]\n')
    out = tmp_path / "out"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["bench", "learn", "--quick", "--methods-file", str(methods), "--out", str(out),
                     "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    entry = report["methods"]["v1_3d"]
    assert entry["metrics"]["dice"]["n"] == 4 and "cbf_rule" in entry["paired"]
    cfg = yaml.safe_load((out / "runs" / "v1_3d" / "seed0" / "config.yaml").read_text())
    assert cfg["data"]["dims"] == 3 and cfg["data"]["patch_size"] == [4, 24, 24]
    assert [h[0] for h in entry["history"]["0"]] == [4.0]  # validated during training (volume Dice)
