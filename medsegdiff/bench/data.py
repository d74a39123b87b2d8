"""Data pipeline: `prepare` seconds and peak memory per case, cached vs naive NIfTI slice throughput.

Generates synthetic ISLES24 cases in a temporary folder (``--full``: full size, 512 x 512-686 x
34-89 voxels), preprocesses each case in a fresh spawned worker process (the worker's own
peak RSS (VmHWM) is its peak memory; an idle worker with the same imports is the baseline), then reads
training slices (i) from the memory-mapped cache through :class:`SliceDataset` and (ii) the naive
way, re-reading every NIfTI file of the case for each slice (as the original MedSegDiff loader does),
in the same run.

The idle baseline (:func:`medsegdiff.data.preprocess.idle_worker_rss_mb`) lives in the module the
prepare worker unpickles from, so both spawned workers import exactly the same stack.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from medsegdiff.config.data import DataConfig
from medsegdiff.data.cache import Manifest, cache_key, modality_window
from medsegdiff.data.datasets import LesionOversamplingSampler, SliceDataset
from medsegdiff.data.discovery import discover_cases
from medsegdiff.data.preprocess import idle_worker_rss_mb, prepare_case, prepare_dataset, window_normalise
from medsegdiff.data.synthetic import generate_dataset
from medsegdiff.utils.parallel import run_parallel


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", type=int, default=2, help="synthetic cases (default 2)")
    p.add_argument("--full", action="store_true", help="full-size cases (512 x 512-686 x 34-89) instead of tiny ones")
    p.add_argument("--shape", help="explicit case size XxYxZ (e.g. 512x686x177, the largest real case); "
                   "overrides --full")
    p.add_argument("--image-size", type=int, default=64, help="data.image_size (default 64)")
    p.add_argument("--samples", type=int, default=2000, help="slices read from the cache (default 2000)")
    p.add_argument("--naive-samples", type=int, default=20, help="slices read the naive way (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the generated data and cache here (default: a temporary folder)")


def _in_fresh_process(fn: Any, *args: Any, **kwargs: Any) -> Any:
    ((_, result),) = run_parallel(fn, [(args, kwargs)], workers=1)
    return result


def _naive_slice(case: Any, z: int, cfg: Any, size: int) -> dict:
    """Read every file of the case again for one slice (SimpleITK), window, resize with torch."""
    chans = []
    for m in cfg.modalities:
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(case.images[m])))[z].astype(np.float32)
        chans.append(window_normalise(arr, *modality_window(cfg, m)))
    image = torch.from_numpy(np.stack(chans))[None]
    image = F.interpolate(image, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(case.mask)))[z].astype(np.float32)
    mask = F.interpolate(torch.from_numpy(mask > 0).float()[None, None], size=(size, size), mode="nearest-exact")[0]
    return {"image": image, "mask": mask}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)  # one DataLoader worker's view: per-process slice throughput
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="medsegdiff-bench-data-"))
    data_root, cache_dir = work / "data", work / "cache"
    shape = args.shape or ("full" if args.full else "tiny")
    result: dict[str, Any] = {"shape": shape, "cases": args.cases, "image_size": args.image_size}
    try:
        t0 = time.perf_counter()
        if not data_root.exists():
            generate_dataset(data_root, cases=args.cases, seed=args.seed, shape=shape)
        result["generate_seconds"] = round(time.perf_counter() - t0, 2)
        cfg = DataConfig(image_size=args.image_size, prepare_workers=1)
        discovered = discover_cases(data_root, cfg.modalities, layout=cfg.layout)
        cases = [c for c in discovered.cases if not c.missing]
        digest = cache_key(cfg)
        source = str(data_root.resolve())

        idle = _in_fresh_process(idle_worker_rss_mb)
        per_case = []
        for case in cases:
            out = _in_fresh_process(prepare_case, case, cfg, cache_dir / case.case_id, settings_hash=digest,
                                    source=source)
            shape_zyx = None
            if out["status"] == "ok":
                g = out["record"]["native_geometry"]["size"]
                shape_zyx = [int(g[2]), int(g[1]), int(g[0])]
            per_case.append({"case_id": case.case_id, "status": out["status"], "native_zyx": shape_zyx,
                             "seconds": round(out["seconds"], 3), "cpu_seconds": round(out["cpu_seconds"], 3),
                             "peak_rss_mb": round(out["peak_rss_mb"], 1),
                             "peak_rss_above_idle_mb": round(out["peak_rss_mb"] - idle, 1)})
        manifest: Manifest = prepare_dataset(data_root, cache_dir, cfg, workers=1, progress=False)
        ok = [c for c in per_case if c["status"] == "ok"]
        result["prepare"] = {
            "worker_idle_rss_mb": round(idle, 1),
            "seconds_per_case": round(float(np.mean([c["seconds"] for c in ok])), 3) if ok else None,
            "cpu_seconds_per_case": round(float(np.mean([c["cpu_seconds"] for c in ok])), 3) if ok else None,
            "peak_rss_mb_max": max((c["peak_rss_mb"] for c in ok), default=None),
            "per_case": per_case,
        }

        ds = SliceDataset(manifest, manifest.case_ids)
        sampler = LesionOversamplingSampler(ds.lesion_flags, rate=0.5, num_samples=args.samples, seed=args.seed)
        keys = list(sampler)
        t0 = time.perf_counter()
        for key in keys:
            ds[key]
        cached = len(keys) / (time.perf_counter() - t0)
        ds_aug = SliceDataset(manifest, manifest.case_ids, augment=cfg.augment)
        n_aug = min(len(keys), 500)
        t0 = time.perf_counter()
        for key in keys[:n_aug]:
            ds_aug[key]
        cached_aug = n_aug / (time.perf_counter() - t0)

        by_id = {c.case_id: c for c in cases}
        naive_keys = keys[: args.naive_samples]
        t0 = time.perf_counter()
        for idx, _ in naive_keys:
            case_pos = int(ds._case_of[idx])
            z = int(ds._slice_of[idx])
            _naive_slice(by_id[ds.case_ids[case_pos]], z, cfg, args.image_size)
        naive = len(naive_keys) / (time.perf_counter() - t0)
        result["slices_per_second"] = {"cache": round(cached, 1), "cache_with_augmentation": round(cached_aug, 1),
                                       "naive_nifti_per_slice": round(naive, 2),
                                       "speedup_cache_vs_naive": round(cached / naive, 1)}
        result["cache_mb"] = round(sum(f.stat().st_size for f in cache_dir.rglob("*") if f.is_file()) / 2**20, 2)
        result["data_mb"] = round(sum(f.stat().st_size for f in data_root.rglob("*") if f.is_file()) / 2**20, 2)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return result
