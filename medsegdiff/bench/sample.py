"""Sampling speed: seconds per volume for a preset, respacing and ensemble size, vs the naive way.

The fast path is :func:`medsegdiff.inference.sampler.sample_probabilities` (all slices and members
batched, image encoded once per slice). The naive path is what the official MedSegDiff does: one
slice and one member at a time, the image re-encoded at every step. The naive path is timed on a
few (slice, member) pairs and extrapolated linearly to the whole volume (its cost is exactly
proportional to the number of pairs). On a GPU the fast path is also timed in bf16 and bf16 +
``torch.compile``; model FLOP/s are counted with ``torch.utils.flop_counter.FlopCounterMode``
(one denoising step, times steps, plus the image encodings) and compared with the device's peak.

Example: ``medsegdiff bench sample --preset small --shape 256x256x70 --respacing ddim250 --members 5``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

#: Dense peak TFLOP/s per device family (bf16 tensor cores, fp32 without TF32).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp32": 91.6},
    "A10": {"bf16": 125.0, "fp32": 31.2},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="model block configs/model/<preset>.yaml (tiny, small, base, large)")
    p.add_argument("--model", default="", help="network name (medsegdiff_v1, medsegdiff_v2); default: the config's")
    p.add_argument("--shape", default="64x64x8", help="volume H x W x Z (Z slices of H x W)")
    p.add_argument("--channels", type=int, default=5, help="input modalities")
    p.add_argument("--respacing", default="ddim10", help="sampling respacing (ddim250, ddim50, 100, ...)")
    p.add_argument("--members", type=int, default=3, help="ensemble members")
    p.add_argument("--batch-size", type=int, default=64, help="(slice, member) pairs per network call")
    p.add_argument("--naive-pairs", type=int, default=2, help="(slice, member) pairs timed on the naive path")
    p.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--no-compile", action="store_true", help="GPU: skip the torch.compile variant")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode for the compiled variant (default, reduce-overhead, max-autotune)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch default)")
    p.add_argument("--repeats", type=int, default=1, help="timings interleaved fast/naive, best of N")


def _parse_shape(text: str) -> tuple[int, int, int]:
    from medsegdiff.errors import ConfigError

    try:
        h, w, z = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--shape {text!r}: expected HxWxZ, e.g. 256x256x70") from None
    if h != w or min(h, w, z) < 1:
        raise ConfigError(f"--shape {text!r}: H and W must be equal (data.image_size) and all sizes >= 1")
    return h, w, z


def build_config(preset: str, model: str, image_size: int, channels: int, respacing: str) -> Any:
    """An ExperimentConfig with the preset's model block at ``image_size`` and ``channels`` inputs."""
    from medsegdiff.config.base import deep_merge
    from medsegdiff.config.data import MODALITIES
    from medsegdiff.config.loader import config_from_dict, configs_dir, read_yaml
    from medsegdiff.errors import ConfigError

    path = configs_dir() / "model" / f"{preset}.yaml"
    if not path.is_file():
        raise ConfigError(f"--preset {preset!r}: no {path}; use one of tiny, small, base, large")
    data = deep_merge(read_yaml(path), {
        "data": {"image_size": image_size, "modalities": list(MODALITIES[:channels])},
        "diffusion": {"respacing": respacing},
        "device": "auto",
    })
    if model:
        data = deep_merge(data, {"model": {"name": model}})
    return config_from_dict(data)


def _peak(device_name: str) -> dict[str, float] | None:
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_name:
            return peaks
    return None


def _calls_per_step(z: int, members: int, batch_size: int) -> int:
    """Network calls per denoising step for the fast path's chunking (see the sampler)."""
    spc = max(1, batch_size // members)
    mpc = min(members, batch_size)
    return -(-z // spc) * -(-members // mpc)


def _copy_model(model: Any) -> Any:
    import copy

    return copy.deepcopy(model)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _count_flops(model: Any, images: Any, members: int, batch_size: int, precision: str) -> dict[str, float]:
    """FLOPs of one denoising call per (slice, member) pair and of one image encoding per slice."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medsegdiff.nets.blocks import repeat_features
    from medsegdiff.utils.runtime import autocast

    spc = max(1, batch_size // members)
    img = images[:spc]
    nm = min(members, batch_size)
    with torch.inference_mode(), autocast(images.device, precision):
        with FlopCounterMode(display=False) as enc:
            feats = model.encode_image(img)
        feats = repeat_features(list(feats), nm)
        x = torch.randn(img.shape[0] * nm, 1, *img.shape[2:], device=images.device)
        t = torch.full((x.shape[0],), 500, device=images.device, dtype=torch.long)
        with FlopCounterMode(display=False) as step:
            model(x, t, image_features=feats)
    return {"step_per_pair": step.get_total_flops() / x.shape[0], "encode_per_slice": enc.get_total_flops() / img.shape[0]}


def _time(fn: Any, device: Any) -> tuple[float, float | None]:
    """Seconds of ``fn()`` and the CUDA peak memory (MiB; None on CPU)."""
    import torch

    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return seconds, peak


def run(args: argparse.Namespace) -> dict[str, Any]:
    import resource

    import torch

    from medsegdiff.diffusion.factory import build_diffusion
    from medsegdiff.nets.registry import build_model
    from medsegdiff.utils.runtime import resolve_device, torch_threads

    h, w, z = _parse_shape(args.shape)
    cfg = build_config(args.preset, args.model, h, args.channels, args.respacing)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    diffusion = build_diffusion(cfg.diffusion, args.respacing)
    warm = build_diffusion(cfg.diffusion, "2")
    steps = int(diffusion.num_timesteps)
    images = torch.randn(z, cfg.data.in_channels, h, w, generator=torch.Generator().manual_seed(1)).to(device)
    pairs = z * args.members
    n_params = sum(p.numel() for p in model.parameters())
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "model": cfg.model.name, "preset": args.preset, "parameters": n_params,
        "shape_hwz": [h, w, z], "in_channels": cfg.data.in_channels, "respacing": args.respacing, "steps": steps,
        "members": args.members, "batch_size": args.batch_size, "network_calls_per_volume_naive": pairs * steps,
        "network_calls_per_volume_fast": steps * _calls_per_step(z, args.members, args.batch_size),
    }
    with torch_threads(args.threads or None):
        from medsegdiff.inference.sampler import sample_probabilities

        variants = [("fp32", "fp32", False, False)]
        if device.type == "cuda":
            variants += [("bf16", "bf16", False, False), ("bf16_channels_last", "bf16", False, True)]
            if not args.no_compile:
                variants.append(("bf16_channels_last_compiled", "bf16", True, True))
        flops = _count_flops(model, images, args.members, args.batch_size, "fp32")
        total_flops = flops["step_per_pair"] * pairs * steps + flops["encode_per_slice"] * z
        result["gflop_per_volume"] = round(total_flops / 1e9, 3)
        result["gflop_per_network_call_per_pair"] = round(flops["step_per_pair"] / 1e9, 4)
        result["gflop_encode_per_slice"] = round(flops["encode_per_slice"] / 1e9, 4)
        peaks = _peak(result["device"]) if device.type == "cuda" else None

        def fast_fn(net: Any, precision: str, diff: Any) -> Any:
            return lambda: sample_probabilities(
                net, diff, images, members=args.members, batch_size=args.batch_size, precision=precision,
                generator=torch.Generator(device=device).manual_seed(0))

        n_pairs = max(1, min(args.naive_pairs, pairs))
        m = min(args.members, n_pairs)
        n_slices = max(1, n_pairs // m)
        sub = images[:n_slices]

        def naive_fn(diff: Any) -> Any:
            return lambda: sample_probabilities(model, diff, sub, members=m, naive=True, precision="fp32",
                                                generator=torch.Generator(device=device).manual_seed(0))

        nets = {}
        for name, precision, compiled, channels_last in variants:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            net = model if not channels_last else _copy_model(model).to(memory_format=fmt)
            nets[name] = torch.compile(net, dynamic=False, mode=args.compile_mode) if compiled else net
            fast_fn(nets[name], precision, warm)()  # warm-up (and compilation) on a 2-step chain
        if not args.no_naive:
            naive_fn(warm)()
        best: dict[str, tuple[float, float | None]] = {}
        naive_best = float("inf")
        for _ in range(max(1, args.repeats)):  # interleaved, best of N: robust to a busy machine
            for name, precision, _, _ in variants:
                sec, peak = _time(fast_fn(nets[name], precision, diffusion), device)
                if name not in best or sec < best[name][0]:
                    best[name] = (sec, peak)
            if not args.no_naive:
                naive_best = min(naive_best, _time(naive_fn(diffusion), device)[0])
        fast: dict[str, Any] = {}
        for name, precision, _, _ in variants:
            seconds, peak_mb = best[name]
            entry = {"seconds_per_volume": round(seconds, 4),
                     "peak_memory_mb": None if peak_mb is None else round(peak_mb, 1),
                     "tflops_achieved": round(total_flops / seconds / 1e12, 4)}
            if peaks is not None:
                entry["fraction_of_peak"] = round(total_flops / seconds / (peaks[precision] * 1e12), 4)
                entry["peak_tflops"] = peaks[precision]
            fast[name] = entry
        result["fast"] = fast
        if not args.no_naive:
            per_volume = naive_best * pairs / (n_slices * m)
            result["naive"] = {"pairs_timed": n_slices * m, "seconds_measured": round(naive_best, 4),
                               "seconds_per_volume_extrapolated": round(per_volume, 4)}
            result["speedup_fp32"] = round(per_volume / fast["fp32"]["seconds_per_volume"], 2)
            top = min(fast.values(), key=lambda e: e["seconds_per_volume"])
            result["speedup_best"] = round(per_volume / top["seconds_per_volume"], 2)
    result["process_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result
