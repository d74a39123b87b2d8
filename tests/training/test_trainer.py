"""Trainer mechanics on a tiny stand-in model: accumulation, resume, NaN guard, precision."""

from __future__ import annotations

import json

import pytest
import torch

from medsegdiff.config import load_config
from medsegdiff.errors import ConfigError, TrainingError
from medsegdiff.training.checkpoint import find_latest, load_checkpoint
from medsegdiff.training.trainer import train


def _cfg(stubs, *extra):
    return load_config(None, [*stubs.BASE_OVERRIDES, *extra])


def _weights(run_dir, key="model"):
    return load_checkpoint(find_latest(run_dir))[key]


def test_grad_accumulation_equals_large_batch(stubs, tmp_path):
    # SGD without momentum or clipping: the update is lr x gradient, so summed micro-batch
    # gradients (upstream improved-diffusion) would give a step k times too large.
    common = ["train.steps=1", "optim.name=sgd", "optim.momentum=0.0", "optim.grad_clip=0.0",
              "optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=0.5", "train.batch_size=8"]
    results = {}
    for accum in (1, 4):
        run = tmp_path / f"a{accum}"
        train(_cfg(stubs, *common, f"train.grad_accum={accum}"), run, components=stubs.make_components())
        results[accum] = _weights(run)
    torch.manual_seed(1234)
    init = stubs.TinyNet().state_dict()
    moved = False
    for k in init:
        assert torch.allclose(results[1][k], results[4][k], atol=1e-6, rtol=0), k
        moved = moved or not torch.allclose(init[k], results[1][k], atol=1e-4)
    assert moved  # the step really changed the weights


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bit_identical(stubs, tmp_path, workers):
    # workers > 0: the DataLoader prefetches, so the sampler runs ahead of training; the checkpoint
    # must still record the position of the last CONSUMED batch.
    extra = ["train.steps=8", "train.checkpoint_every=3", "train.grad_accum=2", "train.validation.every=0",
             f"data.num_workers={workers}"]
    comps = stubs.make_components(noise=0.3, dropout=0.2, learn_weight=True, n=10)  # epochs wrap at 10
    full = tmp_path / "full"
    res = train(_cfg(stubs, *extra), full, components=comps)
    assert res.steps == 8 and res.stopped_by == "steps"
    part = tmp_path / "part"
    first = train(_cfg(stubs, *extra), part, components=comps, stop_at=5)
    assert first.steps == 5 and first.stopped_by == "stop_at"
    second = train(_cfg(stubs, *extra), part, components=comps, resume=True)
    assert second.steps == 8
    a, b = load_checkpoint(full / "checkpoints/step_00000008.pt"), load_checkpoint(part / "checkpoints/step_00000008.pt")
    for key in ("model", "ema", "objective"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert a["sampler"] == b["sampler"]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, st in a["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])


def test_resume_without_checkpoint_is_a_clear_error(stubs, tmp_path):
    from medsegdiff.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no checkpoints/step_"):
        train(_cfg(stubs), tmp_path / "empty", components=stubs.make_components(), resume=True)


def test_nan_steps_are_skipped_and_counted(stubs, tmp_path):
    run = tmp_path / "nan"
    res = train(_cfg(stubs, "train.steps=5", "train.max_bad_steps=3"), run,
                components=stubs.make_components(nan_steps=(1, 3)))
    assert res.steps == 5 and res.bad_steps == 2
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = sorted({r["step"] for r in lines if r.get("train/skipped_step") == 1.0})
    assert skipped == [2, 4]  # objective steps 1 and 3 are optimizer steps 2 and 4
    ckpt = load_checkpoint(find_latest(run))
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_nan_steps_stop_the_run_after_k_in_a_row(stubs, tmp_path):
    with pytest.raises(TrainingError, match=r"^3 non-finite losses in a row at step 4; lower optim.lr"):
        train(_cfg(stubs, "train.steps=10", "train.max_bad_steps=3"), tmp_path / "x",
              components=stubs.make_components(nan_steps=(1, 2, 3, 4)))


def test_nan_skip_leaves_weights_unchanged(stubs, tmp_path):
    # With every step NaN except none applied, weights stay at their initial values.
    run = tmp_path / "w"
    train(_cfg(stubs, "train.steps=2", "train.max_bad_steps=5", "train.checkpoint_every=1"), run,
          components=stubs.make_components(nan_steps=(0, 1)))
    torch.manual_seed(1234)
    init = stubs.TinyNet().state_dict()
    got = _weights(run)
    assert all(torch.equal(init[k], got[k]) for k in init)


def test_bf16_autocast_trains_on_cpu(stubs, tmp_path):
    run = tmp_path / "bf16"
    res = train(_cfg(stubs, "train.precision=bf16", "train.steps=3"), run, components=stubs.make_components())
    assert res.steps == 3 and res.bad_steps == 0
    assert all(torch.isfinite(v).all() for v in _weights(run).values())


def test_fp16_on_cpu_is_a_config_error(stubs, tmp_path):
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        train(_cfg(stubs, "train.precision=fp16"), tmp_path / "f", components=stubs.make_components())


def test_batch_not_divisible_names_the_key(stubs, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    from medsegdiff.training.distributed import micro_batch_size

    with pytest.raises(ConfigError, match=r"'train.batch_size': got 4; it is the GLOBAL batch.* = 3 x 1 = 3"):
        micro_batch_size(4, 3, 1)
    assert micro_batch_size(12, 3, 2) == 2


def test_time_budget_stops_with_a_checkpoint(stubs, tmp_path):
    run = tmp_path / "t"
    res = train(_cfg(stubs, "train.steps=100000", "train.time_budget_s=0.5", "train.checkpoint_every=100000"), run,
                components=stubs.make_components())
    assert res.stopped_by == "time" and 0 < res.steps < 100000
    assert res.last_checkpoint == find_latest(run)
    assert load_checkpoint(res.last_checkpoint)["step"] == res.steps


def test_checkpoint_contents_and_keep_last(stubs, tmp_path):
    run = tmp_path / "k"
    train(_cfg(stubs, "train.steps=6", "train.checkpoint_every=1", "train.keep_last=2"), run,
          components=stubs.make_components())
    names = sorted(p.name for p in (run / "checkpoints").glob("step_*.pt"))
    assert names == ["step_00000005.pt", "step_00000006.pt"]
    ck = load_checkpoint(run / "checkpoints/step_00000006.pt")
    for key in ("model", "ema", "optimizer", "lr_scheduler", "scaler", "objective", "step", "rng", "sampler",
                "best", "config", "calibration", "format_version"):
        assert key in ck, key
    assert set(ck["rng"]) >= {"python", "numpy", "torch"}
    assert ck["config"]["train"]["steps"] == 6
    assert (run / "config.yaml").is_file()


def test_lr_schedule_warmup_then_cosine():
    from medsegdiff.config import OptimConfig
    from medsegdiff.training.optim import lr_factor

    cfg = OptimConfig(warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, 104, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(54, 104, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way: cos(pi/2) = 0
    assert lr_factor(104, 104, cfg) == pytest.approx(0.1)
    assert lr_factor(50, 104, OptimConfig(schedule="constant")) == 1.0


def test_ema_lerp_matches_formula():
    from torch import nn

    from medsegdiff.training.ema import EMA

    m = nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema = EMA(m, rate=0.75)
    with torch.no_grad():
        m.weight.fill_(3.0)
    ema.update(m)  # 0.75 * 1 + 0.25 * 3 = 1.5
    assert torch.allclose(ema.state_dict()["weight"], torch.full((1, 2), 1.5))
    with ema.swapped_in(m):
        assert torch.allclose(m.weight, torch.full((1, 2), 1.5))
    assert torch.allclose(m.weight, torch.full((1, 2), 3.0))


class _ScriptedValidator:
    """Returns a fixed Dice per step (and records that it saw the EMA weights)."""

    def __init__(self, dice_by_step):
        self.dice_by_step = dice_by_step

    def __call__(self, model, step):
        return {"dice": self.dice_by_step[step]}

    def baseline(self):
        return {"dice": 0.1}


def _with_validator(stubs, validator):
    inner = stubs.make_components()

    def factory(cfg, run_dir, dist_ctx):
        comps = inner(cfg, run_dir, dist_ctx)
        comps.validator = validator
        return comps

    return factory


def test_best_checkpoint_survives_resume(stubs, tmp_path):
    # Dice peaks at step 2; a resume after step 3 must not forget it (the researcher's code reset it).
    val = _ScriptedValidator({2: 0.6, 4: 0.3, 6: 0.5})
    extra = ["train.steps=6", "train.validation.every=2", "train.checkpoint_every=3"]
    run = tmp_path / "b"
    first = train(_cfg(stubs, *extra), run, components=_with_validator(stubs, val), stop_at=3)
    assert first.best_checkpoint == run / "checkpoints/best.pt"
    best_bytes = first.best_checkpoint.read_bytes()
    res = train(_cfg(stubs, *extra), run, components=_with_validator(stubs, val), resume=True)
    assert load_checkpoint(res.last_checkpoint)["best"] == {"metric": "val/dice", "value": 0.6, "step": 2}
    assert res.best_checkpoint.read_bytes() == best_bytes  # not overwritten by the worse later steps
    best = load_checkpoint(res.best_checkpoint)
    assert best["step"] == 2
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["val/dice"] for r in lines if "val/dice" in r] == [0.6, 0.3, 0.5]
    assert [r["baseline/dice"] for r in lines if "baseline/dice" in r] == [0.1]


def test_validation_uses_ema_weights(stubs, tmp_path):
    seen = {}

    class _Spy(_ScriptedValidator):
        def __call__(self, model, step):
            seen[step] = {k: v.clone() for k, v in model.state_dict().items()}
            return {"dice": 0.5}

    run = tmp_path / "e"
    train(_cfg(stubs, "train.steps=2", "train.validation.every=0", "train.checkpoint_every=2"), run,
          components=_with_validator(stubs, _Spy({})))
    ck = load_checkpoint(run / "checkpoints/step_00000002.pt")
    assert all(torch.equal(seen[2][k], ck["ema"][k]) for k in ck["ema"])
    assert not all(torch.equal(ck["ema"][k], ck["model"][k]) for k in ck["model"])  # EMA != raw weights


@pytest.mark.slow
def test_compiled_model_trains_like_eager(stubs, tmp_path):
    # torch.compile wraps the network only; checkpoints keep plain keys (no "_orig_mod.").
    eager, comp = tmp_path / "eager", tmp_path / "comp"
    train(_cfg(stubs, "train.steps=4"), eager, components=stubs.make_components())
    train(_cfg(stubs, "train.steps=4", "model.compile=true"), comp, components=stubs.make_components())
    a, b = _weights(eager), _weights(comp)
    assert list(a) == list(b)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
