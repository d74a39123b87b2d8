from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medsegdiff.bench import sample as bench_sample
from medsegdiff.bench.sample import _parse_shape
from medsegdiff.cli import main
from medsegdiff.config.base import to_dict
from medsegdiff.config.loader import config_from_dict
from medsegdiff.data.splits import Splits
from medsegdiff.data.synthetic import generate_dataset
from medsegdiff.errors import ConfigError
from medsegdiff.nets.registry import build_model
from medsegdiff.training.checkpoint import save_checkpoint


def test_bench_sample_smoke(capsys):
    rc = main(["bench", "sample", "--preset", "tiny", "--shape", "16x16x2", "--respacing", "ddim2",
               "--members", "2", "--batch-size", "2", "--naive-pairs", "1"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 2 and out["shape_hwz"] == [16, 16, 2]
    assert out["network_calls_per_volume_naive"] == 2 * 2 * 2
    assert out["network_calls_per_volume_fast"] == 2 * 2  # 2 steps x 2 chunks of (1 slice x 2 members)
    assert out["fast"]["fp32"]["seconds_per_volume"] > 0
    assert out["naive"]["pairs_timed"] == 1 and out["speedup_fp32"] > 0
    assert out["gflop_per_volume"] > 0


def test_bench_sample_bad_shape():
    with pytest.raises(ConfigError, match="expected HxWxZ"):
        _parse_shape("64x64")
    with pytest.raises(ConfigError, match="H and W must be equal"):
        _parse_shape("64x32x8")


def test_bench_sample_quality_vs_nfe_on_the_test_split(tmp_path, capsys):
    raw = tmp_path / "raw"
    ids = generate_dataset(raw, cases=3, seed=0)
    cfg = config_from_dict({
        "model": {"base_channels": 8, "channel_mult": [1, 2], "norm_groups": 4, "attention_resolutions": []},
        "data": {"image_size": 16, "modalities": ["cbf", "tmax"], "prepare_workers": 1},
        "inference": {"batch_size": 16},
    })
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    run = tmp_path / "run"
    ckpt = save_checkpoint(run / "checkpoints" / "best.pt", {"model": state, "ema": state, "step": 0,
                                                             "config": to_dict(cfg)})
    usable = sorted(ids)[:3]
    Splits([usable[0]], [], usable[1:], {}).save(run / "splits.json")
    out = tmp_path / "bench"
    rc = main(["bench", "sample", "--checkpoint", str(ckpt), "--data", str(raw), "--samplers", "ddim,x0",
               "--nfe", "1", "--ensembles", "1,2", "--out", str(out)])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    test_cases = set(res["cases"])
    assert test_cases and test_cases <= set(usable[1:])
    got = {(e["sampler"], e["nfe"], e["members"]) for e in res["settings"]}
    assert got == {("ddim", 1, 1), ("ddim", 1, 2), ("x0", 1, 1), ("x0", 1, 2)}
    for e in res["settings"]:
        assert 0.0 <= e["dice"] <= 1.0 and e["seconds_per_volume"] > 0 and len(e["per_case"]) == len(test_cases)
        assert ("ensemble_gain" in e) == (e["members"] == 2)
    # ddim at 1 trailing step is one call at t = T - 1, exactly the one-step x0 sampler
    by = {(e["sampler"], e["nfe"], e["members"]): e for e in res["settings"]}
    assert by[("ddim", 1, 2)]["dice"] == pytest.approx(by[("x0", 1, 2)]["dice"], abs=1e-9)
    assert all(v < 1e-5 for v in res["reference_check"].values())
    for name in ("bench_sample.json", "bench_sample.txt", "dice_vs_nfe.png"):
        assert (out / name).stat().st_size > 0
    assert "dpmpp" not in res["table"] and "ddim" in res["table"]
    assert all(e["dice_minus_reference"] == pytest.approx(0.0) for e in res["settings"] if e["sampler"] == "ddim")


def test_paired_differences_to_the_reference_have_a_bootstrap_ci():
    def setting(sampler, nfe, members, dice):
        return {"sampler": sampler, "nfe": nfe, "members": members,
                "per_case": [{"case_id": f"c{i}", "dice": d} for i, d in enumerate(dice)]}

    ref = setting("ddim", 250, 3, [0.5, 0.6, 0.7, 0.8])
    shifted = setting("ddim", 10, 3, [0.6, 0.7, 0.8, 0.9])  # every case +0.1: the CI is that point
    mixed = setting("dpmpp_2m", 10, 3, [0.4, 0.7, 0.7, 0.8])  # -0.1, +0.1, 0, 0: mean 0, CI around 0
    alone = setting("ddim", 10, 5, [0.9, 0.9, 0.9, 0.9])  # no DDIM-250 with 5 members
    settings = [ref, shifted, mixed, alone]
    bench_sample.add_paired_differences(settings, reference=("ddim", 250), resamples=500)
    assert ref["dice_minus_reference"] == 0.0 and ref["dice_minus_reference_ci95"] == [0.0, 0.0]
    assert shifted["dice_minus_reference"] == pytest.approx(0.1)
    assert shifted["dice_minus_reference_ci95"] == pytest.approx([0.1, 0.1])
    lo, hi = mixed["dice_minus_reference_ci95"]
    assert mixed["dice_minus_reference"] == pytest.approx(0.0) and -0.1 <= lo < 0 < hi <= 0.1
    assert alone["dice_minus_reference"] is None and alone["dice_minus_reference_ci95"] is None
    for e in settings:
        e.update(dice=float(np.mean([r["dice"] for r in e["per_case"]])), seconds_per_volume=1.0)
    table = bench_sample.format_quality_table(settings)
    assert "vs ddim at NFE 250 [95% CI]" in table.splitlines()[0]
    assert "+0.1000 [+0.1000, +0.1000]" in table
