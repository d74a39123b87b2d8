"""Training speed: samples/s and peak memory per optimizer step, fp32 vs bf16, eager vs compiled.

One step is :meth:`medsegdiff.training.trainer.Trainer.run_step` itself: the segmentation objective
(diffusion + Dice/BCE terms, full schedule) forward and backward, the non-finite check, gradient
clipping, the optimiser, LR schedule and EMA update. Inputs are random
tensors of the preset's size (no data needed). Model FLOPs of one step (forward + backward) are
counted with ``torch.utils.flop_counter.FlopCounterMode``; on a GPU the achieved TFLOP/s are compared
with the device's dense peak (table in :mod:`medsegdiff.bench.sample`). The naive comparison is the
EMA update: one fused ``torch._foreach_lerp_`` vs upstream improved-diffusion's per-parameter loop.

Example: ``medsegdiff bench train --preset tiny --size 64 --steps 20``.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import resource
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from medsegdiff.bench import add_device_arguments, add_network_arguments
from medsegdiff.bench.sample import _peak, build_config
from medsegdiff.config.base import deep_merge, to_dict
from medsegdiff.config.loader import config_from_dict
from medsegdiff.diffusion.factory import build_diffusion
from medsegdiff.diffusion.objective import SegmentationObjective
from medsegdiff.nets.registry import build_model
from medsegdiff.tracking.base import NullTracker
from medsegdiff.training.ema import EMA
from medsegdiff.training.trainer import Components, Trainer
from medsegdiff.utils.runtime import resolve_device, torch_threads


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_network_arguments(p, model_help="network name (medsegdiff_v1, medsegdiff_v2, dynunet)")
    p.add_argument("--size", type=int, default=64, help="image size (H = W)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per optimizer step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    add_device_arguments(p)
    p.add_argument("--compile", action="store_true", help="CPU: also time torch.compile (always on a GPU)")
    p.add_argument("--no-compile", action="store_true", help="GPU: skip the torch.compile variants")


def _sync(device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _OneBatch:
    """A fixed random batch served item by item: the bench needs no data on disk."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["image"])

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        return {k: v[key[0]] for k, v in self.batch.items()}


class _Endless:
    """Sampler keys ``(index, seed)`` over the batch, forever (no epochs, no resume state)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((i % self.n, 0) for i in itertools.count())


def _trainer(cfg: Any, out_dir: str, batch_size: int, precision: str, compiled: bool, seed: int = 0) -> Trainer:
    """A set-up :class:`~medsegdiff.training.trainer.Trainer` on one random batch (the real model and objective)."""
    cfg = config_from_dict(deep_merge(to_dict(cfg), {
        "seed": seed, "model": {"compile": compiled}, "data": {"num_workers": 0},
        "train": {"precision": precision, "batch_size": batch_size, "grad_accum": 1, "validation": {"every": 0}},
    }))
    g = torch.Generator().manual_seed(seed)
    s = cfg.data.image_size
    batch = {"image": torch.randn(batch_size, cfg.data.in_channels, s, s, generator=g),
             "mask": (torch.rand(batch_size, 1, s, s, generator=g) > 0.8).float()}

    def components(cfg: Any, run_dir: Any, dist_ctx: Any) -> Components:
        objective = SegmentationObjective(cfg, build_diffusion(cfg.diffusion, respacing=""))
        return Components(model=build_model(cfg), objective=objective, dataset=_OneBatch(batch),
                          sampler=_Endless(batch_size))

    trainer = Trainer(cfg, out_dir, components=components, tracker=NullTracker())
    trainer.setup()
    return trainer


def _variant(cfg, device, args, precision: str, compiled: bool) -> dict[str, Any]:
    """ms per :meth:`Trainer.run_step <medsegdiff.training.trainer.Trainer.run_step>` (what training does)."""
    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer(cfg, out, args.batch_size, precision, compiled)
        try:
            try:
                for _ in range(args.warmup):
                    trainer.run_step()
            except Exception as err:  # compilation needs a C++ toolchain; report instead of failing the bench
                return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                trainer.run_step()
            _sync(device)
            dt = (time.perf_counter() - t0) / args.steps
        finally:
            trainer.close()
    res = {"step_ms": round(dt * 1000, 2), "samples_per_s": round(args.batch_size / dt, 2)}
    if device.type == "cuda":
        res["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return res


def _step_flops(cfg, device, batch_size: int) -> float:
    """FLOPs of one step's forward and backward (:meth:`Trainer.forward_backward`)."""
    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer(cfg, out, batch_size, "fp32", False)
        try:
            with FlopCounterMode(display=False) as counter:
                trainer.forward_backward()
        finally:
            trainer.close()
    return float(counter.get_total_flops())


def _ema_compare(cfg, device, reps: int = 50) -> dict[str, float]:
    """ms per EMA update: fused foreach lerp vs upstream's per-parameter Python loop."""
    model = build_model(cfg).to(device)
    ema = EMA(model, 0.999)
    shadow = [p.detach().clone() for p in model.parameters()]
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        ema.update(model)
    _sync(device)
    fused = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(reps):
            for targ, src in zip(shadow, model.parameters()):  # improved_diffusion.nn.update_ema
                targ.detach().mul_(0.999).add_(src, alpha=1 - 0.999)
    _sync(device)
    loop = (time.perf_counter() - t0) / reps
    return {"foreach_lerp_ms": round(fused * 1000, 4), "per_param_loop_ms": round(loop * 1000, 4),
            "speedup": round(loop / fused, 2) if fused > 0 else None}


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    cfg = build_config(args.preset, args.model, args.size, args.channels, "ddim10")
    cfg = config_from_dict(deep_merge(to_dict(cfg), {"device": str(device), "train": {"ema_rate": 0.999}}))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result: dict[str, Any] = {
        "device": name, "model": cfg.model.name, "preset": args.preset, "image_size": args.size,
        "channels": cfg.data.in_channels, "batch_size": args.batch_size, "steps": args.steps,
        "threads": args.threads or torch.get_num_threads(),
    }
    with torch_threads(args.threads or None):
        params = sum(p.numel() for p in build_model(cfg).parameters())
        result["parameters"] = params
        flops = _step_flops(cfg, device, args.batch_size)
        result["gflop_per_step"] = round(flops / 1e9, 3)
        variants = [("fp32", False), ("bf16", False)]
        if (device.type == "cuda" and not args.no_compile) or args.compile:
            variants += [("fp32", True), ("bf16", True)]
        peaks = _peak(name) if device.type == "cuda" else None
        for precision, compiled in variants:
            key = f"{precision}_{'compiled' if compiled else 'eager'}"
            res = _variant(cfg, device, args, precision, compiled)
            if "step_ms" in res:
                tflops = flops / (res["step_ms"] / 1000) / 1e12
                res["tflops"] = round(tflops, 4)
                if peaks:
                    res["fraction_of_peak"] = round(tflops / peaks["bf16" if precision == "bf16" else "fp32"], 4)
            result[key] = res
        result["ema_update"] = _ema_compare(cfg, device)
    if device.type == "cpu":
        result["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    eager = result.get("fp32_eager", {})
    bf16 = result.get("bf16_eager", {})
    if "step_ms" in eager and "step_ms" in bf16:
        result["bf16_speedup"] = round(eager["step_ms"] / bf16["step_ms"], 2)
    return result
