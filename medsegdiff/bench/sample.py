"""Sampling cost and quality: seconds per volume (synthetic model) or Dice vs NFE (a checkpoint).

**Quality vs cost** (``--checkpoint CKPT --data DATA``): for every sampler of ``--samplers``, every
number of network calls per member of ``--nfe`` (respacing ``<--spacing>N``; the one-step ``x0``
sampler only at 1) and every ensemble size of ``--members``, the held-out cases (the checkpoint's
test split from ``<run>/splits.json``, or ``--cases``) are sampled, combined by the mean,
thresholded on the native grid at one threshold for every setting (the one ``predict`` uses with
the checkpoint's own settings: its calibrated threshold, else ``inference.threshold``) and scored: Dice,
lesion F1, AVD (:func:`medsegdiff.metrics.isles24.case_metrics`), the uncertainty metrics
(:mod:`medsegdiff.metrics.uncertainty`, ensembles of 2 or more) and seconds per volume (sampling
only). Member ``m`` of an ensemble of 5 is member ``m`` of an ensemble of 3 (counter-based noise), so
sizes are paired. ``reference_check`` compares the batched path with the slow reference path on one
case for each sampler (largest absolute difference of the probabilities). Outputs: JSON on stdout
(and ``--output``), ``--out DIR`` with ``bench_sample.json``, ``bench_sample.txt`` (a table) and
``dice_vs_nfe.png``.

Example: ``medsegdiff bench sample --checkpoint runs/x/checkpoints/best.pt --data data/ --out bench/``.

**Speed only** (no ``--checkpoint``): seconds per volume for a preset, respacing and ensemble
size, vs the naive way.

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
import copy
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from medsegdiff.bench import add_device_arguments, add_network_arguments
from medsegdiff.config.base import deep_merge
from medsegdiff.config.data import MODALITIES
from medsegdiff.config.loader import config_from_dict, configs_dir, read_yaml
from medsegdiff.data.datasets import SliceDataset
from medsegdiff.data.splits import Splits
from medsegdiff.diffusion.factory import build_diffusion
from medsegdiff.errors import ConfigError, DataError
from medsegdiff.inference import ensemble as ens
from medsegdiff.inference.export import to_native
from medsegdiff.inference.members import native_members
from medsegdiff.inference.predict import Predictor, apply_inference_overrides, resolve_sources
from medsegdiff.inference.sampler import SAMPLERS, sample_probabilities
from medsegdiff.metrics.bootstrap import paired_difference
from medsegdiff.metrics.isles24 import case_metrics, summarize
from medsegdiff.metrics.uncertainty import UNCERTAINTY_KEYS, uncertainty_metrics
from medsegdiff.nets.blocks import repeat_features
from medsegdiff.nets.registry import build_model
from medsegdiff.utils.io import atomic_write_json, atomic_write_text
from medsegdiff.utils.jsonable import json_safe
from medsegdiff.utils.plotting import new_figure, save_png
from medsegdiff.utils.runtime import autocast, resolve_device, torch_threads

#: Dense peak TFLOP/s per device family (bf16 tensor cores, fp32 without TF32).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp32": 91.6},
    "A10": {"bf16": 125.0, "fp32": 31.2},
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    q = p.add_argument_group("quality vs cost (with --checkpoint)")
    q.add_argument("--checkpoint", default="", help="a checkpoint .pt or run directory: measure Dice vs NFE")
    q.add_argument("--data", default="", help="prepared cache or raw dataset root with the held-out cases")
    q.add_argument("--cases", default="", help="case ids (comma/space separated); default: the run's test split")
    q.add_argument("--max-cases", type=int, default=0, help="score at most this many cases (0 = all)")
    q.add_argument("--samplers", default="ddim,dpmpp_2m,dpmpp_3m,ddpm,x0", help="registered sampler names")
    q.add_argument("--nfe", default="1,2,5,10,25,50,250", help="network calls per member")
    q.add_argument("--ensembles", default="1,3,5", help="ensemble sizes")
    q.add_argument("--spacing", default="trailing", choices=("trailing", "ddim", "uniform"),
                   help="respacing family: trailingN (starts at T-1), ddimN (leading), or N (evenly spaced)")
    q.add_argument("--out", default="", help="folder for bench_sample.json, bench_sample.txt and dice_vs_nfe.png")
    q.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="prediction-time override (inference.*, diffusion.eta, device, ...), repeatable")
    add_network_arguments(p, model_help="network name (medsegdiff_v1, medsegdiff_v2); default: the config's")
    p.add_argument("--shape", default="64x64x8", help="volume H x W x Z (Z slices of H x W)")
    p.add_argument("--respacing", default="ddim10", help="sampling respacing (ddim250, ddim50, 100, ...)")
    p.add_argument("--members", type=int, default=3, help="ensemble members")
    p.add_argument("--batch-size", type=int, default=64, help="(slice, member) pairs per network call")
    p.add_argument("--naive-pairs", type=int, default=2, help="(slice, member) pairs timed on the naive path")
    p.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    add_device_arguments(p)
    p.add_argument("--no-compile", action="store_true", help="GPU: skip the torch.compile variant")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode for the compiled variant (default, reduce-overhead, max-autotune)")
    p.add_argument("--repeats", type=int, default=1, help="timings interleaved fast/naive, best of N")


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        h, w, z = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--shape {text!r}: expected HxWxZ, e.g. 256x256x70") from None
    if h != w or min(h, w, z) < 1:
        raise ConfigError(f"--shape {text!r}: H and W must be equal (data.image_size) and all sizes >= 1")
    return h, w, z


def build_config(preset: str, model: str, image_size: int, channels: int, respacing: str) -> Any:
    """An ExperimentConfig with the preset's model block at ``image_size`` and ``channels`` inputs."""
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
    return copy.deepcopy(model)


def _sync(device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _count_flops(model: Any, images: Any, members: int, batch_size: int, precision: str) -> dict[str, float]:
    """FLOPs of one denoising call per (slice, member) pair and of one image encoding per slice."""

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
    """The quality-vs-cost benchmark with ``--checkpoint``, else the synthetic speed benchmark."""
    if getattr(args, "checkpoint", ""):
        return run_quality(args)
    return run_speed(args)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", ",").split(",") if v]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,2,5,10") from None
    if not values or min(values) < 1:
        raise ConfigError(f"{flag} {text!r}: expected positive integers")
    return values


def respacing_for(spacing: str, nfe: int) -> str:
    """The respacing string with ``nfe`` steps: ``trailingN``, ``ddimN`` or ``N``."""
    return str(nfe) if spacing == "uniform" else f"{spacing}{nfe}"


def _held_out_cases(checkpoint: Any, sources: list[Any], cases_arg: str) -> list[tuple[Any, str]]:
    available = [(s.manifest, c) for s in sources for c in s.case_ids]
    if cases_arg:
        return available  # already filtered by resolve_sources
    ckpt = Path(checkpoint)
    run_dir = ckpt if ckpt.is_dir() else ckpt.parent.parent
    split_file = run_dir / "splits.json"
    if not split_file.is_file():
        raise DataError(f"{split_file}: no split next to the checkpoint; pass --cases with the held-out case ids")
    test = set(Splits.load(split_file).test)
    held = [(m, c) for m, c in available if c in test]
    if not held:
        raise DataError(f"{split_file}: none of its {len(test)} test cases is in --data; pass --cases")
    return held


def _score_case(pred: Any, manifest: Any, case_id: str, members: Any) -> dict[str, float]:
    case = manifest.case(case_id)
    gt = case.native_mask() > 0
    geo_c, geo_n = case.cache_geometry, case.native_geometry
    prob = to_native(ens.combine_mean(members), geo_c, geo_n)
    mask = prob >= pred.threshold
    m = case_metrics(mask, gt, geo_n.voxel_volume_ml, pred.cfg.evaluation.iou_threshold, hd95=False)
    row = {k: m[k] for k in ("dice", "lesion_f1", "avd_ml")}
    if members.shape[0] > 1:
        masks, brain = native_members(members, np.asarray(case.image, dtype=np.float32), pred.threshold, geo_c, geo_n)
        unc = to_native(ens.uncertainty(members, pred.cfg.inference.uncertainty), geo_c, geo_n)
        row.update(uncertainty_metrics(masks, prob, unc, mask, gt, brain))
    return row


def _reference_check(pred: Any, manifest: Any, case_id: str, sampler: str) -> float:
    """Largest |batched - reference| probability on two slices, two members, a 2-step chain."""

    images = SliceDataset(manifest, [case_id], context_slices=pred.cfg.data.context_slices).volume(case_id)[:2]
    images = images.to(pred.device)
    outs = [sample_probabilities(pred.model, pred.diffusion, images, members=2, sampler=sampler,
                                 eta=pred.cfg.diffusion.eta, naive=naive, precision=pred.precision,
                                 clip_denoised=pred.cfg.diffusion.clip_denoised,
                                 generator=torch.Generator(device=pred.device).manual_seed(0))
            for naive in (False, True)]
    return float((outs[0] - outs[1]).abs().max())


def run_quality(args: argparse.Namespace) -> dict[str, Any]:
    """Dice / lesion F1 / AVD / uncertainty and seconds per volume for each sampler x NFE x ensemble size.

    Raises:
        ConfigError: bad lists, an unknown sampler, a respacing the schedule cannot make.
        DataError / CheckpointError: see :func:`medsegdiff.inference.predict.Predictor.load`.
    """


    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown:
        raise ConfigError(f"--samplers: unknown {unknown[0]!r}; registered: {', '.join(SAMPLERS)}")
    nfes, sizes = _int_list(args.nfe, "--nfe"), _int_list(args.ensembles, "--ensembles")
    if not args.data:
        raise ConfigError("bench sample --checkpoint needs --data (the cache or dataset with the held-out cases)")
    out_dir = Path(args.out) if args.out else None
    base = Predictor.load(args.checkpoint, args.override)
    # raw data is prepared (with the checkpoint's settings) into <out>/_cache, or a temporary folder
    work = out_dir if out_dir is not None else Path(tempfile.mkdtemp(prefix="medsegdiff_bench_sample_"))
    case_filter = [c for c in args.cases.replace(",", " ").split() if c] or None
    sources = resolve_sources(args.data, work, base.cfg, case_filter, progress=False)
    cases = _held_out_cases(args.checkpoint, sources, args.cases)
    if args.max_cases:
        cases = cases[: args.max_cases]
    result: dict[str, Any] = {
        "checkpoint": str(args.checkpoint), "step": base.ckpt.get("step"), "device": str(base.device),
        "precision": base.precision, "threshold": base.threshold, "threshold_source": base.threshold_source,
        "spacing": args.spacing, "cases": [c for _, c in cases], "settings": [], "reference_check": {},
    }
    keys = ("dice", "lesion_f1", "avd_ml", *UNCERTAINTY_KEYS)
    for sampler in samplers:
        one_call = SAMPLERS[sampler].one_call
        for nfe in ([1] if one_call else nfes):
            # the one-step sampler uses the first timestep only: trailing1 makes it t = T - 1
            respacing = respacing_for("trailing" if one_call else args.spacing, nfe)
            for m in sizes:
                # every setting is thresholded alike: at the checkpoint's threshold for its own settings
                overrides = [*args.override, f"inference.sampler={sampler}", f"inference.respacing={respacing}",
                             f"inference.ensemble={m}", "inference.use_calibrated_threshold=false",
                             f"inference.threshold={base.threshold}"]
                pred = Predictor(base.checkpoint, base.model, _with_overrides(base.cfg, overrides), base.ckpt,
                                 overrides)
                rows, seconds = [], []
                for manifest, case_id in cases:
                    t0 = time.perf_counter()
                    members = pred.members(manifest, case_id)
                    seconds.append(time.perf_counter() - t0)
                    rows.append(_score_case(pred, manifest, case_id, members))
                summary = summarize(rows, [k for k in keys if k in rows[0]])
                entry = {"sampler": sampler, "nfe": nfe, "respacing": respacing, "members": m,
                         "seconds_per_volume": round(float(np.mean(seconds)), 4),
                         **{k: v["mean"] for k, v in summary.items()},
                         "per_case": [{"case_id": c, **r} for (_, c), r in zip(cases, rows)]}
                result["settings"].append(entry)
                print(f"bench sample: {sampler} nfe={nfe} members={m}: dice {entry['dice']:.4f} "
                      f"{entry['seconds_per_volume']:.2f} s/volume", file=sys.stderr)
        check = Predictor(base.checkpoint, base.model, _with_overrides(base.cfg, [
            *args.override, f"inference.respacing={respacing_for(args.spacing, 2)}",
            "inference.use_calibrated_threshold=false"]), base.ckpt, [])  # probabilities only: no threshold
        result["reference_check"][sampler] = _reference_check(check, cases[0][0], cases[0][1], sampler)
    add_paired_differences(result["settings"], reference=("ddim", max(nfes)))
    result["table"] = format_quality_table(result["settings"])
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / "bench_sample.json", json_safe(result))
        atomic_write_text(out_dir / "bench_sample.txt", result["table"] + "\n")
        plot_dice_vs_nfe(out_dir / "dice_vs_nfe.png", result["settings"])
    return json_safe(result)


def add_paired_differences(settings: list[dict[str, Any]], reference: tuple[str, int], *,
                           resamples: int = 2000) -> None:
    """Add ``dice_minus_reference`` and its 95 % CI ``dice_minus_reference_ci95`` to every setting.

    The difference to ``reference`` (sampler, NFE) is paired over the cases and taken at the same
    ensemble size (the Done-when test of issue 13 compares each sampler with DDIM at the largest
    NFE, e.g. 250); the CI is the percentile bootstrap of the per-case differences
    (:func:`medsegdiff.metrics.bootstrap.paired_difference`). Settings without a reference get None.
    """
    refs = {e["members"]: e for e in settings if (e["sampler"], e["nfe"]) == reference}
    for e in settings:
        ref = refs.get(e["members"])
        diff = (paired_difference({0: e["per_case"]}, {0: ref["per_case"]}, resamples=resamples)
                if ref is not None else {"mean": None, "ci95": None})
        e["dice_minus_reference"], e["dice_minus_reference_ci95"] = diff["mean"], diff["ci95"]
    if settings:
        settings[0].setdefault("reference", f"{reference[0]} at NFE {reference[1]}")


def _with_overrides(cfg: Any, overrides: list[str]) -> Any:
    return apply_inference_overrides(cfg, overrides)


def format_quality_table(settings: list[dict[str, Any]]) -> str:
    """One line per (sampler, NFE, members): Dice, the paired difference to the reference with its
    95 % CI, lesion F1, AVD, gain, AUROC, seconds per volume."""
    cols = ("lesion_f1", "avd_ml", "ensemble_gain", "uncertainty_auroc", "seconds_per_volume")
    ref = settings[0].get("reference", "reference") if settings else "reference"
    diff_head = f"vs {ref} [95% CI]"

    def cell(v: Any, width: int) -> str:
        return f"{'-':>{width}}" if v is None or v != v else f"{v:>{width}.4f}"

    lines = [f"{'sampler':<10}{'nfe':>5}{'members':>8}{'dice':>9}{diff_head:>32}" + "".join(f"{c:>20}" for c in cols)]
    for e in settings:
        d, ci = e.get("dice_minus_reference"), e.get("dice_minus_reference_ci95")
        diff = "-" if d is None else f"{d:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else f"{d:+.4f}"
        lines.append(f"{e['sampler']:<10}{e['nfe']:>5}{e['members']:>8}{cell(e.get('dice'), 9)}{diff:>32}"
                     + "".join(cell(e.get(c), 20) for c in cols))
    return "\n".join(lines)


def plot_dice_vs_nfe(path: Any, settings: list[dict[str, Any]]) -> None:
    """Dice vs NFE (log x), one line per sampler and ensemble size, written as PNG."""
    fig = new_figure(6.4, 4.2)
    ax = fig.add_subplot()
    groups: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for e in settings:
        groups.setdefault((e["sampler"], e["members"]), []).append((e["nfe"], e["dice"]))
    for (sampler, m), pts in sorted(groups.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{sampler} x{m}")
    ax.set_xscale("log")
    ax.set_xlabel("network calls per member (NFE)")
    ax.set_ylabel("Dice (held-out cases)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_png(fig, path)


def run_speed(args: argparse.Namespace) -> dict[str, Any]:
    """Synthetic-model speed: batched fast path vs the naive reference path (seconds per volume)."""

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
