"""Tiny stand-ins for the trained parts (model, objective, data, sampler) used by trainer tests.

Also runnable as a script (``python _train_stubs.py RUN_DIR key=value ...``) so tests can train in a
subprocess (SIGKILL) or under torchrun (``--nproc_per_node 2``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent


class Out(NamedTuple):
    loss: torch.Tensor
    terms: dict[str, torch.Tensor]


class TinyNet(nn.Module):
    is_diffusion = False

    def __init__(self, c_in: int = 2, width: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 3, padding=1)
        self.norm = nn.GroupNorm(2, width)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(width, 1, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.drop(torch.relu(self.norm(self.conv1(image)))))


class StubObjective(nn.Module):
    """MSE of logits vs mask; ``noise`` adds global-RNG input noise (like diffusion); learnable weight."""

    def __init__(self, noise: float = 0.0, nan_steps: tuple[int, ...] = (), learn_weight: bool = False) -> None:
        super().__init__()
        self.noise = noise
        self.nan_steps = set(nan_steps)
        self.log_w = nn.Parameter(torch.zeros(())) if learn_weight else None

    def forward(self, model: nn.Module, batch: dict[str, Any], step: int) -> Out:
        image = batch["image"]
        if self.noise:
            image = image + self.noise * torch.randn_like(image)
        pred = model(image)
        loss = ((pred.float() - batch["mask"]) ** 2).mean()
        if self.log_w is not None:
            loss = torch.exp(-self.log_w) * loss + self.log_w
        if step in self.nan_steps:
            loss = loss * float("nan")
        return Out(loss, {"mse": loss.detach()})


class StubDataset:
    def __init__(self, n: int = 32, size: int = 8, c_in: int = 2, seed: int = 0) -> None:
        g = np.random.default_rng(seed)
        self.images = g.standard_normal((n, c_in, size, size)).astype(np.float32)
        self.masks = (self.images[:, :1] > 0.3).astype(np.float32)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        g = np.random.default_rng(seed)  # deterministic "augmentation" from the sampler's seed
        image = self.images[index] * (1.0 + 0.05 * g.standard_normal())
        return {"image": torch.from_numpy(image.astype(np.float32)), "mask": torch.from_numpy(self.masks[index]),
                "case_id": f"c{index}", "slice": int(index)}


class StubSampler:
    """Epoch-wise permutation of (index, seed); rank r takes items r::world; exact state."""

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.rank, self.world = n, seed, rank, world_size
        self.epoch, self.pos = 0, 0

    def _items(self) -> list[tuple[int, int]]:
        g = np.random.default_rng(self.seed + 1000 * self.epoch)
        order = g.permutation(self.n)
        seeds = g.integers(0, 2**31, self.n)
        items = [(int(i), int(s)) for i, s in zip(order, seeds)]
        return items[self.rank::self.world]

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.pos = epoch, 0

    def __iter__(self):
        items = self._items()
        while self.pos < len(items):
            item = items[self.pos]
            self.pos += 1
            yield item

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def make_components(noise: float = 0.0, nan_steps: tuple[int, ...] = (), dropout: float = 0.0,
                    learn_weight: bool = False, n: int = 32, nan_rank: int | None = None):
    from medsegdiff.training.trainer import Components

    def factory(cfg, run_dir, dist_ctx):
        torch.manual_seed(1234)  # identical initial weights on every rank and every run
        model = TinyNet(dropout=dropout)
        return Components(
            model=model,
            objective=StubObjective(
                noise=noise, nan_steps=nan_steps if nan_rank in (None, dist_ctx.rank) else (),
                learn_weight=learn_weight,
            ),
            dataset=StubDataset(n=n),
            sampler=StubSampler(n, seed=cfg.seed, rank=dist_ctx.rank, world_size=dist_ctx.world_size),
        )

    return factory


BASE_OVERRIDES = [
    "device=cpu", "tracking.backend=none", "train.batch_size=4", "train.steps=6", "train.log_every=1",
    "train.checkpoint_every=3", "train.keep_last=10", "train.validation.every=0", "train.ema_rate=0.9",
    "optim.lr=0.01", "optim.warmup_steps=2", "optim.schedule=cosine", "data.num_workers=0",
]


def main(argv: list[str]) -> int:
    """``RUN_DIR [--resume] [--noise X] [--dropout X] [--stop-at N] [--sleep S] key=value ...``"""
    import argparse
    import os
    import time

    from medsegdiff.config import load_config
    from medsegdiff.training.trainer import train

    p = argparse.ArgumentParser()
    p.add_argument("run_dir")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--noise", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds per objective call (SIGKILL window)")
    p.add_argument("--nan-step", type=int, action="append", default=[], help="objective step giving NaN")
    p.add_argument("--nan-rank", type=int, default=None, help="only this rank gives the NaN")
    p.add_argument("--report-threads", action="store_true",
                   help="after training write RUN_DIR/threads_rank<R>.json: the threads still alive")
    p.add_argument("overrides", nargs="*")
    args = p.parse_intermixed_args(argv)
    hang_dump = os.environ.get("MEDSEGDIFF_HANG_DUMP_S")
    if hang_dump:  # a rank still running after this many seconds prints every thread's stack
        import faulthandler

        faulthandler.dump_traceback_later(float(hang_dump), exit=False)
    torch.set_num_threads(1)
    cfg = load_config(None, [*BASE_OVERRIDES, *args.overrides])
    factory = make_components(noise=args.noise, dropout=args.dropout, nan_steps=tuple(args.nan_step),
                              nan_rank=args.nan_rank)
    if args.sleep:
        inner = factory

        def factory(cfg, run_dir, dist_ctx):  # noqa: F811
            comps = inner(cfg, run_dir, dist_ctx)
            fwd = comps.objective.forward

            def slow(model, batch, step):
                time.sleep(args.sleep)
                return fwd(model, batch, step)

            comps.objective.forward = slow
            return comps

    train(cfg, args.run_dir, resume=args.resume, components=factory)
    if args.report_threads:
        write_thread_report(Path(args.run_dir))
    return 0


def live_threads() -> dict[str, Any]:
    """Python threads and native (OS) thread names of this process (native ones from /proc, Linux)."""
    import os
    import threading

    native: list[str] = []
    tasks = Path("/proc/self/task")
    if tasks.is_dir():
        for t in tasks.iterdir():
            try:
                native.append((t / "comm").read_text().strip())
            except OSError:  # the thread ended while listing
                pass
    import torch.distributed as dist

    return {"python": sorted(t.name for t in threading.enumerate()), "native": sorted(native),
            "pid": os.getpid(), "group_initialized": dist.is_available() and dist.is_initialized()}


def write_thread_report(run_dir: Path) -> None:
    import json
    import os

    rank = int(os.environ.get("RANK", "0") or 0)
    (run_dir / f"threads_rank{rank}.json").write_text(json.dumps(live_threads()))


def run_two_ranks(run_dir: Path, args: list[str], env: dict[str, str]) -> Any:
    """torchrun this script with 2 CPU ranks (gloo); the ``subprocess.CompletedProcess``."""
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         str(Path(__file__).resolve()), str(run_dir), *args],
        env=env, timeout=180, capture_output=True, text=True,
    )


def assert_ranks_left_cleanly(run_dir: Path, world: int) -> None:
    """After ``train`` returned, every rank has no process group and no thread but the main one.

    The gloo group's worker threads (``pt_gloo_runloop``, ``gloo_tcp_loop``) alive at interpreter
    exit are what aborted rank 1 now and then with "terminate called without an active exception".
    """
    import json

    for rank in range(world):
        report = json.loads((run_dir / f"threads_rank{rank}.json").read_text())
        assert report["group_initialized"] is False, rank
        assert report["python"] == ["MainThread"], (rank, report)
        leftover = [n for n in report["native"] if "gloo" in n]
        assert not leftover, (rank, report["native"])


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parents[1]))
    sys.exit(main(sys.argv[1:]))
