"""Model speed: parameters, GFLOPs, forward and training throughput, peak memory; cached vs naive.

For every preset (``configs/model/<preset>.yaml``) and network it reports:

* ``params`` and ``gflops_per_sample`` (``torch.utils.flop_counter.FlopCounterMode``; for the
  diffusion models split into the image encoding and one denoising step on cached features);
* forward and forward+backward samples/s and peak memory, in fp32 and bf16 autocast, eager and
  (``--compile``, default on GPU) ``torch.compile``-d; peak memory is
  ``torch.cuda.max_memory_allocated`` on GPU and the growth of the process peak RSS
  (``resource.getrusage(...).ru_maxrss``) on CPU - 0 when a variant stayed below an earlier peak;
* the naive comparison: ``--steps`` sampling-style denoising calls for an ensemble of ``--members``,
  re-encoding the image at every call (``forward(x, t, image=...)``, as the official code does)
  against encoding once and reusing the features (``encode_image`` + ``repeat_features``), timed
  (best of ``--iters``, alternating) and as the FLOP ratio ``flops_speedup``.

Example: ``medsegdiff bench model --presets tiny,small --size 256 --batch 4``.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import sys
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from medsegdiff.bench import add_device_arguments
from medsegdiff.config import configs_dir, load_config
from medsegdiff.config.data import MODALITIES
from medsegdiff.errors import ConfigError
from medsegdiff.nets.blocks import repeat_features
from medsegdiff.nets.registry import build_model
from medsegdiff.utils.runtime import autocast, resolve_device, torch_threads


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--presets", default="tiny,small", help="comma-separated presets (tiny, small, base, large)")
    p.add_argument("--models", default="medsegdiff_v1,medsegdiff_v2",
                   help="comma-separated networks (medsegdiff_v1, medsegdiff_v2, dynunet)")
    p.add_argument("--size", type=int, default=256, help="image size (H = W)")
    p.add_argument("--batch", type=int, default=4, help="batch size of the throughput runs")
    p.add_argument("--channels", type=int, default=5, help="input modalities (1-7)")
    p.add_argument("--learn-sigma", action="store_true", help="2 output channels (learned variance)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations before each measurement")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (default on GPU)")
    p.add_argument("--no-compile", action="store_true", help="never time torch.compile")
    p.add_argument("--no-backward", action="store_true", help="skip forward+backward")
    p.add_argument("--steps", type=int, default=10, help="denoising calls of the cached-vs-naive comparison")
    p.add_argument("--members", type=int, default=4, help="ensemble members of the cached-vs-naive comparison")
    add_device_arguments(p)


def _config(preset: str, name: str, size: int, channels: int, learn_sigma: bool) -> Any:
    if not 1 <= channels <= len(MODALITIES):
        raise ConfigError(f"--channels {channels}: allowed 1 .. {len(MODALITIES)}")
    path = configs_dir() / "model" / f"{preset}.yaml"
    mods = ",".join(MODALITIES[:channels])
    return load_config(
        path,
        [f"model.name={name}", f"data.image_size={size}", f"data.modalities=[{mods}]", "data.dims=2",
         f"diffusion.learn_sigma={'true' if learn_sigma else 'false'}"],
    )


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _maxrss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0


@contextlib.contextmanager
def _peak(device, out: dict[str, float]):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield
        _sync(device)
        out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        out["peak_mem_above_weights_mb"] = round((torch.cuda.max_memory_allocated(device) - base) / 2**20, 1)
    else:
        before = _maxrss_mb()
        yield
        out["peak_rss_growth_mb"] = round(_maxrss_mb() - before, 1)


def _time(fn, device, iters: int, warmup: int) -> float:
    """Seconds per call (mean over ``iters`` after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / iters


def _gflops(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def _bench_one(cfg, args, device) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    diffusion = bool(model.is_diffusion)
    s, c, b = cfg.data.image_size, cfg.data.in_channels, args.batch
    img = torch.randn(b, c, s, s, device=device)
    x = torch.randn(b, 1, s, s, device=device)
    t = torch.randint(0, 1000, (b,), device=device)
    res: dict[str, Any] = {
        "params": sum(p.numel() for p in model.parameters()),
        "image_size": s,
        "in_channels": c,
        "batch": b,
    }

    model.eval()
    with torch.no_grad():
        if diffusion:
            feats1 = model.encode_image(img[:1])
            res["gflops_per_sample"] = round(_gflops(lambda: model(x[:1], t[:1], image=img[:1])), 3)
            res["gflops_encode_image"] = round(_gflops(lambda: model.encode_image(img[:1])), 3)
            res["gflops_step_cached"] = round(_gflops(lambda: model(x[:1], t[:1], image_features=feats1)), 3)
        else:
            res["gflops_per_sample"] = round(_gflops(lambda: model(img[:1])), 3)

    def fwd(m):
        return (lambda: m(x, t, image=img, return_anchor=True)) if diffusion else (lambda: m(img))

    def loss_of(out):
        if isinstance(out, tuple):
            main, anchor = out
            return main.float().square().mean() + (anchor.float().square().mean() if anchor is not None else 0)
        return out.float().square().mean()

    compile_it = not args.no_compile and (args.compile or device.type == "cuda")
    variants = [("eager", model)]
    if compile_it:
        variants.append(("compiled", torch.compile(model)))
    for precision in [p.strip() for p in args.precisions.split(",") if p.strip()]:
        for mode, m in variants:
            key = f"{precision}_{mode}"
            print(f"[bench model] {cfg.model.preset}/{cfg.model.name}: {key}", file=sys.stderr, flush=True)
            entry: dict[str, Any] = {}
            try:
                with autocast(device, precision):
                    model.eval()
                    with torch.no_grad(), _peak(device, entry):
                        sec = _time(fwd(m), device, args.iters, args.warmup)
                    entry["forward_samples_per_s"] = round(b / sec, 2)
                    if not args.no_backward:
                        model.train()
                        mem: dict[str, float] = {}

                        def step(m=m):
                            model.zero_grad(set_to_none=True)
                            loss_of(fwd(m)()).backward()

                        with _peak(device, mem):
                            sec = _time(step, device, args.iters, args.warmup)
                        entry["train_samples_per_s"] = round(b / sec, 2)
                        entry.update({f"train_{k}": v for k, v in mem.items()})
                        model.zero_grad(set_to_none=True)
            except Exception as err:  # a variant failing (e.g. compile) must not hide the others
                entry["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            res[key] = entry

    if diffusion:
        print(f"[bench model] {cfg.model.preset}/{cfg.model.name}: cached vs naive sampling", file=sys.stderr,
              flush=True)
        model.eval()
        n, steps = args.members, args.steps
        ximg = img.repeat_interleave(n, 0)
        xe = torch.randn(b * n, 1, s, s, device=device)
        te = torch.full((b * n,), 500, device=device)

        def naive():
            for _ in range(steps):
                model(xe, te, image=ximg)

        def cached():
            feats = repeat_features(model.encode_image(img), n)
            for _ in range(steps):
                model(xe, te, image_features=feats)

        # alternate the two and keep the best of --iters runs each: robust to a busy machine
        t_naive = t_cached = float("inf")
        with torch.no_grad():
            if device.type == "cuda":
                naive(), cached()
            for _ in range(max(1, args.iters)):
                t_naive = min(t_naive, _time(naive, device, 1, 0))
                t_cached = min(t_cached, _time(cached, device, 1, 0))
        res["sampling_cache"] = {
            "images": b,
            "members": n,
            "steps": steps,
            "naive_reencode_s": round(t_naive, 3),
            "cached_s": round(t_cached, 3),
            "speedup": round(t_naive / t_cached, 2),
            "flops_speedup": round(
                steps * res["gflops_per_sample"] / (res["gflops_encode_image"] / n + steps * res["gflops_step_cached"]), 2
            ),
        }
    return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    out: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": args.threads or torch.get_num_threads(),
        "results": {},
    }
    with torch_threads(args.threads or None):
        for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
            for name in [m.strip() for m in args.models.split(",") if m.strip()]:
                cfg = _config(preset, name, args.size, args.channels, args.learn_sigma)
                out["results"][f"{preset}/{name}"] = _bench_one(cfg, args, device)
            overhead = v2_overhead(out["results"].get(f"{preset}/medsegdiff_v1"),
                                   out["results"].get(f"{preset}/medsegdiff_v2"))
            if overhead:
                out.setdefault("v2_over_v1", {})[preset] = overhead
    return out


def v2_overhead(v1: dict[str, Any] | None, v2: dict[str, Any] | None) -> dict[str, float]:
    """V2 relative to V1 of the same preset: ratios of parameters, GFLOPs and throughputs.

    Args:
        v1, v2: the two results of :func:`_bench_one` (None when not benchmarked).

    Returns:
        ``{"params": r, "gflops_per_sample": r, "gflops_step_cached": r, "<variant>_<forward|train>_time": r}``
        with ``r = V2 / V1`` (time ratios are inverse throughput ratios); empty when one is missing.
    """
    if not v1 or not v2:
        return {}
    ratios = {k: round(v2[k] / v1[k], 3) for k in ("params", "gflops_per_sample", "gflops_step_cached")
              if v1.get(k) and k in v2}
    for key, entry in v1.items():
        if isinstance(entry, dict) and isinstance(v2.get(key), dict):
            for what in ("forward", "train"):
                a, b = entry.get(f"{what}_samples_per_s"), v2[key].get(f"{what}_samples_per_s")
                if a and b:
                    ratios[f"{key}_{what}_time"] = round(a / b, 3)
    return ratios
