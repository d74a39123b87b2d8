"""Preprocessing into the cache (``medsegdiff prepare``): windows, normalisation, resampling.

Per case (one worker process each, modality by modality so that at most one native float32
volume is alive at a time):

1. Load and check the case one modality at a time (:func:`medsegdiff.data.loading.load_case` on a
   one-modality view of the case: every channel checked against the NCCT grid, mask binarised).
2. Lesion statistics on the native grid: voxels, mL, connected components (26-connectivity).
3. Each modality: non-finite values -> 0, clip to ``data.windows[m]`` and scale to [0, 1]
   (defaults in :data:`medsegdiff.config.data.DEFAULT_WINDOWS`: wide enough to keep every
   clinical threshold, see there), then in-plane resampling to ``data.image_size`` with SimpleITK: Gaussian
   anti-aliasing in-plane (sigma = (new spacing - old spacing) / 2, as ``skimage.transform.resize``)
   then linear interpolation. Z is never resampled.
4. The mask: ``soft`` = the same smoothing + linear interpolation of the binary mask thresholded at
   0.5, or ``nearest``; never an area average that drops border voxels.
5. Optional brain mask (``data.brain_mask``): NCCT 1-100 HU, largest 3D component, holes filled
   per slice; or the support of the perfusion maps (any map > 0, holes filled). Applied on the
   cache grid (images set to 0 outside).
6. Optional histogram equalisation (``data.equalize``) inside the positive voxels of each channel,
   background kept at 0 (as KurtLab's ``skimage.exposure.equalize_hist`` on the positive mask).
7. The **resolution ceiling** of the case: the cache-grid mask sent back to the native grid the way
   predictions are (linear interpolation, ``>= 0.5``) and scored with Dice against the native
   mask. The manifest holds the per-case values and their mean (``resolution_ceiling``);
   ``prepare`` warns when the mean falls below ``data.min_resolution_ceiling`` (0.95), because a
   model trained on that grid cannot score higher even with a perfect cache-grid prediction.

The cache grid keeps the native origin and direction; its in-plane spacing is
``spacing * (n - 1) / (image_size - 1)``, so the first and last voxel centres coincide with the
native ones (the same physical extent, no border lost).

Files are written atomically; the per-case ``done`` marker (with the settings hash) is written
last, so an interrupted ``prepare`` resumes: completed cases are kept, partial ones rebuilt.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from medsegdiff.config.data import CLINICAL_THRESHOLDS, DEFAULT_WINDOWS, DataConfig
from medsegdiff.data.cache import (
    CACHE_FORMAT,
    DONE,
    IMAGE,
    MANIFEST,
    MASK,
    NATIVE,
    Manifest,
    cache_settings,
    modality_window,
    read_done,
    settings_hash,
)
from medsegdiff.data.discovery import discover_cases
from medsegdiff.data.grid import cache_geometry, ceiling_summary, resample_inplane, resolution_ceiling
from medsegdiff.data.loading import CaseError, Geometry, load_case
from medsegdiff.errors import DataError
from medsegdiff.utils.io import atomic_open, atomic_write_json
from medsegdiff.utils.parallel import run_parallel

PERFUSION = ("cbf", "cbv", "mtt", "tmax")
BRAIN_HU = (1.0, 100.0)
EQUALIZE_BINS = 256


# --------------------------------------------------------------------------------------------
# Settings


def window_warnings(data_cfg: DataConfig) -> list[str]:
    """One line per input modality whose window clips a clinical threshold (:data:`CLINICAL_THRESHOLDS`).

    A threshold at or beyond the window's end is invisible in the cache: every value past it maps
    to the same 0 or 1.
    """
    out = []
    for m in data_cfg.modalities:
        low, high = modality_window(data_cfg, m)
        lost = [t for t in CLINICAL_THRESHOLDS.get(m, []) if not low < t < high]
        if lost:
            out.append(f"data.windows.{m}=[{low:g}, {high:g}] hides the clinical threshold(s) "
                       f"{', '.join(f'{t:g}' for t in lost)}; widen the window (default "
                       f"{DEFAULT_WINDOWS[m]}) so the network can see them")
    return out


# --------------------------------------------------------------------------------------------
# Array operations (pure numpy; tested on hand-made arrays)


def window_normalise(volume: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to ``[low, high]`` and scale to [0, 1]; NaN / inf become 0 (the low end).

    Args:
        volume: any real array (e.g. ``(Z, Y, X)`` HU or perfusion units).
        low, high: the window, ``low < high``.

    Returns:
        float32 array of the same shape in [0, 1] (a new array unless ``volume`` is float32, which
        is then modified in place to keep memory flat).
    """
    out = volume if volume.dtype == np.float32 else volume.astype(np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        out[bad] = low
    del bad
    out -= np.float32(low)
    out *= np.float32(1.0 / (high - low))
    np.clip(out, 0.0, 1.0, out=out)
    return out


def equalize_positive(volume: np.ndarray, nbins: int = EQUALIZE_BINS) -> np.ndarray:
    """Histogram equalisation of the positive voxels; zeros stay 0.

    The cumulative histogram (``nbins`` bins over [0, 1]) of the voxels > 0 maps each positive
    value to its quantile in (0, 1] by linear interpolation between bin centres, as
    ``skimage.exposure.equalize_hist(volume, nbins, mask=volume > 0)``; the background is then 0.

    Args:
        volume: float array in [0, 1], any shape.

    Returns:
        float32 array in [0, 1].
    """
    out = np.zeros(volume.shape, dtype=np.float32)
    positive = volume > 0
    values = volume[positive]
    if values.size == 0:
        return out
    hist, edges = np.histogram(values, bins=nbins, range=(0.0, 1.0))
    cdf = np.cumsum(hist).astype(np.float64)
    cdf /= cdf[-1]
    centres = (edges[:-1] + edges[1:]) / 2
    out[positive] = np.interp(values, centres, cdf).astype(np.float32)
    return out


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    for z in range(mask.shape[0]):
        if mask[z].any():
            mask[z] = ndimage.binary_fill_holes(mask[z])
    return mask


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected component of a boolean ``(Z, Y, X)`` mask (all False if empty)."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros(mask.shape, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def brain_mask_from_ncct(ncct: np.ndarray, hu_range: tuple[float, float] = BRAIN_HU) -> np.ndarray:
    """Brain mask from NCCT in HU: ``low <= HU <= high``, opened in-plane, largest 3D component, holes filled.

    The in-plane opening (3 x 3 cross, 2 iterations) cuts thin soft-tissue bridges between brain and
    scalp before the largest component is taken (skull >= 250 HU separates them elsewhere).

    Args:
        ncct: ``(Z, Y, X)`` in Hounsfield units.

    Returns:
        bool ``(Z, Y, X)``.
    """
    mask = (ncct >= hu_range[0]) & (ncct <= hu_range[1])
    cross = np.zeros((1, 3, 3), dtype=bool)
    cross[0, 1, :] = cross[0, :, 1] = True
    mask = ndimage.binary_opening(mask, structure=cross, iterations=2)
    mask = largest_component(mask)
    return _fill_holes_per_slice(mask)


def support_mask(volumes: Iterable[np.ndarray]) -> np.ndarray:
    """Union of ``volume > 0`` over the given maps (e.g. the perfusion maps), holes filled per slice."""
    out: np.ndarray | None = None
    for v in volumes:
        out = (v > 0) if out is None else (out | (v > 0))
    if out is None:
        raise ValueError("support_mask needs at least one volume")
    return _fill_holes_per_slice(out)


def lesion_statistics(mask: np.ndarray, voxel_volume_ml: float) -> dict[str, Any]:
    """``voxels``, ``ml`` and ``components`` (26-connectivity, as the official cc3d count) of a mask."""
    fg = mask > 0
    voxels = int(np.count_nonzero(fg))
    components = int(ndimage.label(fg, structure=np.ones((3, 3, 3), dtype=bool))[1]) if voxels else 0
    return {"voxels": voxels, "ml": voxels * float(voxel_volume_ml), "components": components}


def _stored_ceiling(case_dir: Path, record: Mapping[str, Any]) -> float | None:
    """The ceiling of an already cached case (from its ``mask.npy`` and ``native.npz``)."""
    if not record.get("has_mask", True):
        return None
    try:
        cache_mask = np.load(case_dir / MASK, mmap_mode="r")
        with np.load(case_dir / NATIVE) as native:
            native_mask = native["mask"]
    except (OSError, KeyError, ValueError):
        return None
    return resolution_ceiling(native_mask, cache_mask, Geometry.from_dict(record["native_geometry"]),
                              Geometry.from_dict(record["cache_geometry"]))


# --------------------------------------------------------------------------------------------
# One case


def idle_worker_rss_mb() -> float:
    """Peak RSS of a process that imported this module and did nothing else: run in a fresh worker,
    it is the per-process floor under :func:`prepare_case` (which unpickles from this same module)."""
    return _peak_rss_mb()


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status`` (``ru_maxrss`` would include the parent's memory at the
    ``fork`` that precedes the ``exec`` of a spawned worker); elsewhere ``ru_maxrss`` (bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def _load_one(case: Any, data_cfg: DataConfig, modality: str, *, with_mask: bool) -> Any:
    """``load_case`` restricted to one modality (and the mask only if asked): one volume in memory."""
    one = dataclasses.replace(case, images={modality: case.images[modality]},
                              mask=case.mask if with_mask else None, missing=[])
    return load_case(one, dataclasses.replace(data_cfg, modalities=[modality]))


def preprocess_case(case: Any, data_cfg: DataConfig) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Load and preprocess one case, one modality at a time.

    Args:
        case: a :class:`~medsegdiff.data.discovery.CaseFiles` with every modality of ``data.modalities``.
        data_cfg: the ``data`` section.

    Returns:
        ``(record, arrays)``: the manifest record (``case_id``, ``native_geometry``,
        ``cache_geometry``, ``shape``, ``lesion``, ``lesion_slices``, ``cache_lesion_voxels``,
        ``has_tmax``, ``has_mask``, ``nonfinite``, ``notes``) and ``image`` float16 ``(C, Z, H, W)``,
        ``mask`` uint8 ``(Z, H, W)`` (all 0 without a mask file), ``native_mask`` uint8 ``(Z, Y, X)`` (if
        the case has a mask), ``tmax`` float32 ``(Z, Y, X)`` (if Tmax is a modality).

    Raises:
        medsegdiff.data.loading.CaseError: the case cannot be loaded (the caller skips or stops).
        DataError: a modality without a file, or no source for the brain mask.
    """
    cid = case.case_id
    missing = [m for m in data_cfg.modalities if m not in case.images]
    if missing:
        raise DataError(f"case {cid}: missing modality {', '.join(missing)} (no file found)")
    size = int(data_cfg.image_size)
    modalities = list(data_cfg.modalities)
    nonfinite: dict[str, int] = {}
    notes: list[str] = []
    has_mask = True

    # The brain mask from NCCT needs raw HU: load NCCT first (even when it is not a model input).
    ncct_first = data_cfg.brain_mask and data_cfg.brain_mask_source in ("auto", "ncct") and (
        "ncct" in modalities or case.ncct is not None)
    if data_cfg.brain_mask and data_cfg.brain_mask_source == "ncct" and not ncct_first:
        raise DataError(f"case {cid}: data.brain_mask_source=ncct but the case has no NCCT file")
    order = sorted(modalities, key=lambda m: m != "ncct") if ncct_first else modalities
    brain_native: np.ndarray | None = None
    if ncct_first and "ncct" not in modalities:
        probe = dataclasses.replace(case, images={**case.images, "ncct": case.ncct})
        loaded = _load_one(probe, data_cfg, "ncct", with_mask=False)
        brain_native = brain_mask_from_ncct(loaded.images.pop("ncct"))
        del loaded

    native = target = None
    channels: np.ndarray | None = None
    native_mask = cache_mask = None
    lesion: dict[str, Any] = {}
    support: np.ndarray | None = None
    tmax_native: np.ndarray | None = None
    for m in order:
        loaded = _load_one(case, data_cfg, m, with_mask=native_mask is None)
        nonfinite.update(loaded.nonfinite)
        notes.extend(loaded.notes)
        if native is None:
            native = loaded.geometry
            target = cache_geometry(native, size)
            channels = np.zeros((len(modalities), int(native.size[2]), size, size), dtype=np.float32)
        if native_mask is None:
            has_mask = loaded.mask is not None  # False only for prediction inputs (require_mask=False)
            native_mask = (np.ascontiguousarray(loaded.mask, dtype=np.uint8) if has_mask
                           else np.zeros(native.shape_zyx, dtype=np.uint8))
            lesion = lesion_statistics(native_mask, native.voxel_volume_ml)
            cache_mask = resample_inplane(native_mask, native, target, mode=data_cfg.mask_resample)
        vol = loaded.images.pop(m)
        del loaded
        if m == "ncct" and ncct_first:
            brain_native = brain_mask_from_ncct(vol)
        if m == "tmax":
            tmax_native = np.array(vol, dtype=np.float32, copy=True)
        if data_cfg.brain_mask and not ncct_first and m in PERFUSION:
            support = (vol > 0) if support is None else (support | (vol > 0))
        low, high = modality_window(data_cfg, m)
        owned = [window_normalise(vol, low, high)]
        del vol
        # the recursive (IIR) Gaussian may overshoot by ~1e-3 at sharp edges: back into [0, 1]
        channels[modalities.index(m)] = np.clip(resample_inplane(owned, native, target, mode="linear"), 0.0, 1.0)
    assert channels is not None and cache_mask is not None and native_mask is not None  # modalities non-empty
    if data_cfg.brain_mask:
        if brain_native is None:
            if support is None:
                raise DataError(f"case {cid}: data.brain_mask needs an NCCT file or a perfusion map "
                                "(cbf, cbv, mtt, tmax) in data.modalities")
            brain_native = _fill_holes_per_slice(support)
            support = None
        brain = resample_inplane(brain_native, native, target, mode="soft")
        del brain_native
        channels *= brain[None].astype(np.float32)
    if data_cfg.equalize:
        for c in range(channels.shape[0]):
            channels[c] = equalize_positive(channels[c])
    n_z = channels.shape[1]
    lesion_slices = np.flatnonzero(cache_mask.reshape(n_z, -1).any(axis=1))
    record = {
        "case_id": cid,
        "native_geometry": native.to_dict(),
        "cache_geometry": target.to_dict(),
        "shape": [int(s) for s in channels.shape],
        "lesion": lesion,
        "lesion_slices": [int(z) for z in lesion_slices],
        "cache_lesion_voxels": int(np.count_nonzero(cache_mask)),
        "resolution_ceiling": resolution_ceiling(native_mask, cache_mask, native, target) if has_mask else None,
        "has_tmax": tmax_native is not None,
        "has_mask": has_mask,
        "nonfinite": _jsonable(nonfinite),
        "notes": notes,
    }
    arrays = {"image": channels.astype(np.float16), "mask": cache_mask.astype(np.uint8)}
    if has_mask:
        arrays["native_mask"] = native_mask
    if tmax_native is not None:
        arrays["tmax"] = tmax_native
    return record, arrays


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


def write_case(case_dir: Path, record: dict[str, Any], arrays: Mapping[str, np.ndarray], *, settings_hash: str,
               source: str) -> None:
    """Write one case folder; the ``done`` marker (hash, source, record) comes last."""
    case_dir.mkdir(parents=True, exist_ok=True)
    _save_npy(case_dir / IMAGE, arrays["image"])
    _save_npy(case_dir / MASK, arrays["mask"])
    native = {}
    if "native_mask" in arrays:
        native["mask"] = arrays["native_mask"]
    if "tmax" in arrays:
        native["tmax"] = arrays["tmax"]
    _save_npz(case_dir / NATIVE, **native)
    atomic_write_json(case_dir / DONE, {"hash": settings_hash, "source": source, "record": record})


def prepare_case(case: Any, data_cfg: DataConfig, case_dir: str | os.PathLike[str], *, settings_hash: str,
                 source: str) -> dict[str, Any]:
    """Preprocess and write one case (runs in a worker process).

    Returns:
        ``{"status": "ok", "record", "seconds", "cpu_seconds", "peak_rss_mb"}`` or ``{"status":
        "skipped", "case_id", "reason", ...}`` when the case cannot be loaded (:class:`~medsegdiff.data.loading.CaseError`).
    """
    case_dir = Path(case_dir)
    (case_dir / DONE).unlink(missing_ok=True)  # never a stale marker next to new partial files
    start, cpu = time.perf_counter(), _cpu_seconds()

    def stats() -> dict[str, float]:
        return {"seconds": time.perf_counter() - start, "cpu_seconds": _cpu_seconds() - cpu,
                "peak_rss_mb": _peak_rss_mb()}

    try:
        record, arrays = preprocess_case(case, data_cfg)
    except (CaseError, DataError) as err:
        return {"status": "skipped", "case_id": _case_id(case), "reason": str(err), **stats()}
    write_case(case_dir, record, arrays, settings_hash=settings_hash, source=source)
    return {"status": "ok", "record": record, **stats()}


def _case_id(case: Any) -> str:
    return str(getattr(case, "case_id", case))


# --------------------------------------------------------------------------------------------
# The whole dataset


def _discover(data_root: Path, data_cfg: DataConfig, require_mask: bool = True
              ) -> tuple[list[Any], list[dict[str, str]], list[str]]:
    """Complete cases, skipped incomplete ones (or DataError with ``missing_modality: fail``), problems."""
    result = discover_cases(data_root, data_cfg.modalities, layout=data_cfg.layout, require_mask=require_mask)
    cases, skipped = [], []
    for case in result.cases:
        if case.missing:
            if any(m != "mask" for m in case.missing) and data_cfg.missing_modality == "fail":
                raise DataError(f"{data_root}: {case.missing_message()} (data.missing_modality=fail; set it to "
                                "skip_case to leave such cases out)")
            if case.missing == ["mask"] and data_cfg.on_error == "fail":
                raise DataError(f"{data_root}: {case.missing_message()} (data.on_error=fail; set it to skip to "
                                "leave such cases out)")
            skipped.append({"case_id": case.case_id, "reason": case.missing_message()})
        else:
            cases.append(case)
    problems = [str(p) for p in result.problems]
    return cases, skipped, problems


def prepare_dataset(data_root: str | os.PathLike[str], cache_dir: str | os.PathLike[str], data_cfg: DataConfig, *,
                    workers: int | None = None, progress: bool = True, require_mask: bool = True) -> Manifest:
    """Preprocess every case of ``data_root`` into ``cache_dir`` (see the module docstring).

    Reuses an up-to-date cache (cases whose ``done`` marker has the current settings hash and data
    root), rebuilds stale or partial cases, and writes ``manifest.json`` last.

    Args:
        data_root: the ISLES24 root (either release layout).
        cache_dir: output folder (created).
        data_cfg: the ``data`` section (modalities, windows, image size, ...).
        workers: worker processes; None = ``data.prepare_workers``; 1 = in this process.
        progress: show a tqdm bar.
        require_mask: skip cases without a lesion mask (training). With False (prediction) such cases
            are cached with ``has_mask: false``, an all-zero ``mask.npy`` and no native mask.

    Returns:
        The opened :class:`~medsegdiff.data.cache.Manifest`; its ``last_run`` attribute holds this
        call's ``prepared`` / ``reused`` counts, mean ``seconds_per_case``, worker ``peak_rss_mb``,
        the ``resolution_ceiling`` summary (:func:`ceiling_summary`) and the window ``warnings``
        (:func:`window_warnings`), both also in ``manifest.json``; callers print them
        (:func:`ceiling_message`).

    Raises:
        DataError: missing data root, no usable case, or a bad case with ``data.on_error: fail``.
    """
    data_root = Path(data_root)
    cache_dir = Path(cache_dir)
    if not data_root.is_dir():
        raise DataError(f"{data_root}: data root not found; pass the folder that contains raw_data/ and "
                        "derivatives/ (or batch_*/)")
    settings = cache_settings(data_cfg)
    digest = settings_hash(settings)
    source = str(data_root.resolve())
    cases, skipped, problems = _discover(data_root, data_cfg, require_mask)
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = cache_dir / MANIFEST
    old = read_manifest_json(manifest_path)
    if old is not None and (old.get("hash") != digest or old.get("data_root") != source):
        manifest_path.unlink(missing_ok=True)  # a half-rebuilt cache must not look valid

    records: dict[str, dict[str, Any]] = {}
    todo = []
    for case in cases:
        cid = _case_id(case)
        done = read_done(cache_dir / cid)
        if done is not None and done.get("hash") == digest and done.get("source") == source \
                and isinstance(done.get("record"), dict):
            records[cid] = done["record"]
        else:
            todo.append(case)

    n_workers = int(workers if workers is not None else data_cfg.prepare_workers)
    n_workers = max(1, min(n_workers, len(todo))) if todo else 1
    stats: list[dict[str, Any]] = []

    def handle(result: dict[str, Any]) -> None:
        stats.append({k: result.get(k) for k in ("seconds", "peak_rss_mb")})
        if result["status"] == "ok":
            records[result["record"]["case_id"]] = result["record"]
            return
        if data_cfg.on_error == "fail":
            raise DataError(f"case '{result['case_id']}': {result['reason']} (data.on_error=fail; set "
                            "data.on_error=skip to leave bad cases out)")
        skipped.append({"case_id": result["case_id"], "reason": result["reason"]})

    bar = tqdm(total=len(todo), desc="prepare", unit="case", disable=not progress or not todo)
    try:
        if n_workers == 1:
            for case in todo:
                handle(prepare_case(case, data_cfg, cache_dir / _case_id(case), settings_hash=digest, source=source))
                bar.update(1)
        else:
            calls = [((case, data_cfg, cache_dir / _case_id(case)), {"settings_hash": digest, "source": source})
                     for case in todo]
            for _, result in run_parallel(prepare_case, calls, workers=n_workers):
                handle(result)
                bar.update(1)
    finally:
        bar.close()

    for cid, rec in records.items():  # caches written before the ceiling was recorded
        if "resolution_ceiling" not in rec:
            records[cid] = {**rec, "resolution_ceiling": _stored_ceiling(cache_dir / cid, rec)}
    if not records:
        reasons = "; ".join(f"{s['case_id']}: {s['reason']}" for s in skipped[:3])
        raise DataError(f"{data_root}: no usable case found ({len(skipped)} skipped{': ' + reasons if reasons else ''}); "
                        "check the data root and data.modalities")
    manifest = {
        "format_version": CACHE_FORMAT,
        "hash": digest,
        "settings": settings,
        "data_root": source,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cases": [records[c] for c in sorted(records)],
        "skipped": sorted(skipped, key=lambda s: s["case_id"]),
        "problems": problems,
        "resolution_ceiling": ceiling_summary(list(records.values()), data_cfg),
        "warnings": window_warnings(data_cfg),
        "timing": {"prepared": len(todo), "reused": len(cases) - len(todo),
                   "seconds_per_case": _mean([s["seconds"] for s in stats]),
                   "peak_rss_mb": max((s["peak_rss_mb"] or 0 for s in stats), default=None)},
    }
    old = read_manifest_json(manifest_path)
    unchanged = old is not None and not todo and all(
        old.get(k) == manifest[k] for k in ("format_version", "hash", "settings", "data_root", "cases", "skipped",
                                             "resolution_ceiling", "warnings"))
    if not unchanged:  # an up-to-date cache is left exactly as it is
        atomic_write_json(manifest_path, manifest)
    opened = Manifest.open(cache_dir, expected_hash=digest)
    opened.last_run = {**manifest["timing"], "resolution_ceiling": manifest["resolution_ceiling"],
                       "warnings": list(manifest["warnings"])}
    return opened


def _mean(values: list[Any]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def read_manifest_json(path: Path) -> dict[str, Any] | None:
    """The raw manifest JSON, or None if absent or unreadable."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


__all__ = [
    "brain_mask_from_ncct",
    "cache_settings",
    "equalize_positive",
    "largest_component",
    "modality_window",
    "lesion_statistics",
    "prepare_case",
    "prepare_dataset",
    "preprocess_case",
    "support_mask",
    "window_normalise",
    "window_warnings",
    "write_case",
]
