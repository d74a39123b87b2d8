"""``medsegdiff bench train`` times the trainer's own step (``Trainer.run_step``)."""

from __future__ import annotations

import json

import torch

from medsegdiff.bench import train as bench_train
from medsegdiff.cli import main
from medsegdiff.training.trainer import Trainer


def test_bench_train_times_the_trainer_step(capsys, monkeypatch):
    calls = []
    real = Trainer.run_step

    def counted(self):
        calls.append(self.step)
        return real(self)

    monkeypatch.setattr(Trainer, "run_step", counted)
    rc = main(["bench", "train", "--preset", "tiny", "--size", "16", "--batch-size", "2", "--steps", "2",
               "--warmup", "1", "--threads", "1"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    # two variants (fp32, bf16 eager), each 1 warm-up + 2 timed optimizer steps of a fresh trainer
    assert calls == [0, 1, 2, 0, 1, 2]
    assert out["fp32_eager"]["step_ms"] > 0 and out["bf16_eager"]["samples_per_s"] > 0
    assert out["gflop_per_step"] > 0 and out["batch_size"] == 2


def test_bench_batches_serve_the_same_random_batch_forever():
    batch = {"image": torch.arange(6.0).reshape(3, 2), "mask": torch.zeros(3, 1)}
    data = bench_train._OneBatch(batch)
    keys = iter(bench_train._Endless(len(data)))
    got = [next(keys) for _ in range(7)]
    assert got == [(0, 0), (1, 0), (2, 0), (0, 0), (1, 0), (2, 0), (0, 0)]
    assert data[(1, 0)]["image"].tolist() == [2.0, 3.0]
