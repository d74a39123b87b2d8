"""``medsegdiff predict``: checkpoint + data -> per-case NIfTI predictions on the native grid.

Everything the model needs (architecture, diffusion schedule, respacing, modalities, windows,
image size, context slices) comes from the checkpoint's embedded config; only the ``inference``
section, the sampling keys of ``diffusion`` (``respacing``, ``sampler``, ``eta``,
``clip_denoised``), ``model.compile``/``model.channels_last``, ``device`` and ``seed`` may be
overridden (:data:`OVERRIDABLE`). 3-D patch models are run over overlapping sliding windows
(:mod:`~medsegdiff.inference.windows`).

Per case the volume's slices and the ensemble members are sampled together
(:func:`~medsegdiff.inference.sampler.sample_probabilities`), combined
(:mod:`~medsegdiff.inference.ensemble`), resampled to the native NCCT grid and thresholded
(:mod:`~medsegdiff.inference.export`). Outputs in ``out_dir``: ``<case>.nii.gz`` (uint8 mask),
``<case>_prob.nii.gz``, ``<case>_uncertainty.nii.gz``, ``<case>_overlay.png``,
``<case>_members.npz`` (member masks and brain region for ``evaluate``'s uncertainty metrics, see
:mod:`~medsegdiff.inference.members`; diffusion models, ``inference.write_members``),
``predictions.csv`` and ``predict.json`` (what was run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import os
import re
import sys
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medsegdiff.config.base import to_dict
from medsegdiff.config.loader import apply_overrides, config_from_dict, parse_override
from medsegdiff.data.cache import MANIFEST, Manifest, cache_key, fitting_cache_keys
from medsegdiff.data.datasets import SliceDataset
from medsegdiff.data.preprocess import prepare_dataset
from medsegdiff.diffusion.factory import build_diffusion
from medsegdiff.errors import CheckpointError, ConfigError, DataError
from medsegdiff.inference import ensemble as ens
from medsegdiff.inference import export
from medsegdiff.inference import members as mem
from medsegdiff.inference.calibration import calibration_settings, find_calibration
from medsegdiff.inference.export import to_native
from medsegdiff.inference.sampler import sample_probabilities, sampler_name
from medsegdiff.inference.windows import sample_windows
from medsegdiff.training.checkpoint import load_for_inference
from medsegdiff.utils.io import atomic_write_json
from medsegdiff.utils.runtime import resolve_device, resolve_precision

#: Keys that may be overridden at prediction time (everything else comes from the checkpoint).
OVERRIDABLE = ("inference.", "diffusion.respacing", "diffusion.sampler", "diffusion.eta",
               "diffusion.clip_denoised", "model.compile", "model.channels_last", "device", "seed", "data.layout")
#: Every case of the data, not only the checkpoint's test split (``--cases all``).
ALL_CASES = "all"
CACHE_SUBDIR = "_cache"


@dataclass
class _Source:
    """Cases of one prepared cache."""

    manifest: Any
    case_ids: list[str]


def _check_overrides(overrides: Iterable[str]) -> list[str]:
    out = []
    for text in overrides:
        parts, _ = parse_override(text)
        key = ".".join(parts)
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in OVERRIDABLE):
            raise ConfigError(
                f"override {text!r}: only inference.*, diffusion.respacing/sampler/eta/clip_denoised, "
                "model.compile/channels_last, device, seed and data.layout can be changed at prediction; the model "
                "and preprocessing come from the checkpoint"
            )
        out.append(text)
    return out


def apply_inference_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """A copy of ``cfg`` with prediction-time overrides applied and validated.

    Raises:
        ConfigError: an override outside :data:`OVERRIDABLE`, or an invalid value.
    """
    overrides = _check_overrides(overrides)
    if not overrides:
        return cfg
    return config_from_dict(apply_overrides(to_dict(cfg), overrides))


def _is_cache(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def _check_cache_fits(manifest: Any, cfg: Any, path: Path) -> None:
    want = list(cfg.data.modalities)
    have = manifest.modalities
    if have != want:
        raise DataError(
            f"{path}: the data has modalities {have} but the checkpoint was trained on {want}; "
            "pass data with those modalities (or the raw dataset root so it is prepared with the checkpoint's settings)"
        )
    expected = cache_key(cfg.data)
    if manifest.hash not in fitting_cache_keys(cfg.data):
        raise DataError(
            f"{path}: this cache was prepared with other preprocessing settings ({manifest.hash}) than the "
            f"checkpoint's ({expected}); pass the raw dataset root instead, it is prepared with the checkpoint's settings"
        )


def _prepare_raw(path: Path, out_dir: Path, cfg: Any, progress: bool) -> tuple[Any, bool]:
    """Prepare a raw root or case folder with the checkpoint's data settings into ``out_dir/_cache``.

    ``cfg.data.layout`` is the layout of the data to predict (``auto`` unless overridden with
    ``data.layout=...``), not the training data's: a single case folder works with any checkpoint.

    Returns:
        ``(manifest, built)``: ``built`` is True when the cache was (re)built by this call.
    """
    tag = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", path.resolve().name) or "data"
    cache_dir = out_dir / CACHE_SUBDIR / f"{name}-{tag}"
    kwargs: dict[str, Any] = {"progress": progress}
    if "require_mask" in inspect.signature(prepare_dataset).parameters:
        kwargs["require_mask"] = False  # prediction needs no reference mask
    def stamp() -> float | None:
        return (cache_dir / MANIFEST).stat().st_mtime_ns if (cache_dir / MANIFEST).is_file() else None

    before = stamp()
    try:
        manifest = prepare_dataset(path, cache_dir, cfg.data, **kwargs)
        return manifest, stamp() != before
    except DataError as err:
        if "no usable case" not in str(err):
            raise
        raise DataError(f"{err}; the checkpoint was trained on modalities {list(cfg.data.modalities)}") from None


def resolve_sources(
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: Path,
    cfg: Any,
    cases: Sequence[str] | None = None,
    progress: bool = True,
    stage: str = "predict",
) -> list[_Source]:
    """Open (or prepare) the data and pick the cases to predict.

    ``data`` is a prepared cache folder, a raw dataset root, one case folder, or a list of those;
    raw inputs are prepared with the checkpoint's data settings into ``out_dir/_cache/``. Cases
    the preparation skipped (a missing modality, ...) are reported once, in one line naming
    ``stage``: when raw data is prepared now (not again when its cache is reused), or for a
    prepared cache given as data; not when ``cases`` are requested (they are all usable).

    Raises:
        DataError: a path that does not exist, no cases found, modalities that do not match the
            checkpoint, or a requested case id that is not in the data.
    """
    paths = [Path(data)] if isinstance(data, (str, os.PathLike)) else [Path(p) for p in data]
    if not paths:
        raise DataError("no data given; pass --data DATA_ROOT, a case folder or a prepared cache")
    sources: list[_Source] = []
    seen: set[str] = set()
    for path in paths:
        if not path.exists():
            raise DataError(f"{path}: data path not found; pass a dataset root, a case folder or a prepared cache")
        given_cache, built = _is_cache(path), False
        if given_cache:
            manifest = Manifest.open(path)
            _check_cache_fits(manifest, cfg, path)
        else:
            manifest, built = _prepare_raw(path, out_dir, cfg, progress)
            _check_cache_fits(manifest, cfg, path)
        ids = [c for c in manifest.case_ids if c not in seen]
        if not manifest.case_ids:
            skipped = manifest.skipped
            if skipped:
                first = skipped[0]
                raise DataError(
                    f"{path}: no usable case for this checkpoint ({len(skipped)} skipped; "
                    f"{first.get('case_id')}: {first.get('reason')}); the checkpoint needs {list(cfg.data.modalities)}"
                )
            raise DataError(f"{path}: no cases found; pass an ISLES'24 dataset root, a case folder or a prepared cache")
        # once: for a cache given as data, or raw data prepared now (not when reusing that cache);
        # requested case ids never include skipped ones, so there is nothing to say then
        if manifest.skipped and not cases and (given_cache or built):
            listed = ", ".join(f"{skip.get('case_id')} ({skip.get('reason')})" for skip in manifest.skipped)
            print(f"medsegdiff {stage}: {len(manifest.skipped)} case(s) of {path} were skipped when it was "
                  f"prepared: {listed}", file=sys.stderr)
        seen.update(ids)
        sources.append(_Source(manifest, ids))
    if cases:
        wanted = list(dict.fromkeys(cases))
        missing = [c for c in wanted if c not in seen]
        if missing:
            raise DataError(
                f"case '{missing[0]}' is not in the data ({len(seen)} cases, e.g. {sorted(seen)[:3]}); "
                "check --cases"
            )
        sources = [_Source(s.manifest, [c for c in s.case_ids if c in wanted]) for s in sources]
        sources = [s for s in sources if s.case_ids]
    return sources


def checkpoint_test_cases(checkpoint: str | os.PathLike[str]) -> list[str] | None:
    """The test subjects of the checkpoint's run (``<run>/splits.json``), or None without one."""
    path = Path(checkpoint)
    run = path if path.is_dir() else path.parent.parent  # <run>/checkpoints/x.pt
    split_file = run / "splits.json"
    try:
        test = json.loads(split_file.read_text(encoding="utf-8")).get("test")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(c) for c in test] if isinstance(test, list) else None


def _default_to_test_split(sources: list[_Source], checkpoint: Path, data: Any) -> list[_Source]:
    """Without ``--cases``: the checkpoint's test subjects when the data holds them (else all, said)."""
    found = [c for s in sources for c in s.case_ids]
    if len(found) <= 1:
        return sources
    test = checkpoint_test_cases(checkpoint)
    keep = set(test or ()) & set(found)
    if not keep:
        why = ("the checkpoint's run has no splits.json" if test is None
               else f"none of the {len(test)} test subjects of the checkpoint's splits.json is in it")
        print(f"medsegdiff predict: predicting all {len(found)} cases of {data}: {why}, so training cases "
              "may be among them; pass --cases to choose", file=sys.stderr)
        return sources
    print(f"medsegdiff predict: predicting the {len(keep)} test case(s) of the checkpoint's split "
          f"(of {len(found)} in the data); pass --cases {ALL_CASES} for every case", file=sys.stderr)
    return [_Source(s.manifest, [c for c in s.case_ids if c in keep]) for s in sources
            if any(c in keep for c in s.case_ids)]


def _case_seed(seed: int, case_id: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(case_id.encode())) % (2**63)


def _overlay_channel(modalities: Sequence[str]) -> int:
    for name in ("tmax", "ncct", "cbf"):
        if name in modalities:
            return list(modalities).index(name)
    return 0


def _reference_mask(case: Any) -> np.ndarray | None:
    if not case.record.get("has_mask", True):
        return None
    mask = np.asarray(case.mask)
    return mask if mask.any() else None


def _volume(manifest: Any, case_id: str, cfg: Any) -> Any:
    """The 2-D model input of one case: ``(Z, C_in, H, W)`` (2.5-D context stacked as channels)."""
    return SliceDataset(manifest, [case_id], context_slices=cfg.data.context_slices).volume(case_id)


class Predictor:
    """A checkpoint ready to sample cases: model, config (with overrides), diffusion and threshold.

    Build it with :meth:`load`; :meth:`members` samples one cached case and :meth:`case` gives the
    combined probability / uncertainty on the cache and native grids.

    Attributes:
        model, cfg, ckpt: from :func:`~medsegdiff.training.checkpoint.load_for_inference`
            (``cfg`` with the overrides applied).
        diffusion: the respaced diffusion (None for the discriminative baseline).
        respacing, members, device, precision: what sampling uses.
        threshold, threshold_source: the probability threshold and where it came from
            (a ``calibration.json`` made with the same settings, the checkpoint's ``calibration`` entry,
            or ``inference.threshold``).
        calibration_settings: the settings a calibrated threshold must match
            (:func:`~medsegdiff.inference.calibration.calibration_settings`).
    """

    def __init__(self, checkpoint: Path, model: Any, cfg: Any, ckpt: dict[str, Any], overrides: list[str]) -> None:
        self.checkpoint, self.model, self.cfg, self.ckpt, self.overrides = checkpoint, model, cfg, ckpt, overrides
        override_keys = {o.split("=", 1)[0].strip() for o in overrides}
        inf = cfg.inference
        self.weights = "ema" if inf.use_ema and ckpt.get("ema") is not None else "model"
        if self.weights == "model" and ckpt.get("ema") is not None:
            model.load_state_dict(ckpt["model"])
        self.device = resolve_device(cfg.device if "device" in override_keys else "auto")
        model.to(self.device).eval()
        if cfg.model.channels_last and self.device.type == "cuda":
            fmt = torch.channels_last_3d if cfg.data.dims == 3 else torch.channels_last
            model = model.to(memory_format=fmt)
        if cfg.model.compile:
            model = torch.compile(model)  # forward only; encode_image runs eagerly once per slice
        self.model = model
        self.precision = resolve_precision(inf.precision, self.device)
        self.is_diffusion = bool(model.is_diffusion)
        self.respacing = (inf.respacing or cfg.diffusion.respacing) if self.is_diffusion else ""
        # ConfigError (from the factory) for a respacing that cannot be built
        self.diffusion = build_diffusion(cfg.diffusion, self.respacing) if self.is_diffusion else None
        self.members_per_case = inf.ensemble if self.is_diffusion else 1
        self.threshold, self.threshold_source = float(inf.threshold), "inference.threshold"
        # what a calibrated threshold must have been found with (inference.calibration)
        self.calibration_settings = calibration_settings(cfg, respacing=self.respacing, members=self.members_per_case)
        if inf.use_calibrated_threshold:
            found = find_calibration(checkpoint, ckpt, settings=self.calibration_settings)
            if found is not None:
                self.threshold, self.threshold_source = found

    @classmethod
    def load(cls, checkpoint: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Predictor:
        """Load ``checkpoint`` (a ``.pt`` file or a run directory) with prediction-time ``overrides``.

        Raises:
            CheckpointError: missing, truncated or incompatible checkpoint.
            ConfigError: an override that may not or cannot be applied.
        """
        path = Path(checkpoint)
        if not path.exists():
            raise CheckpointError(f"{path}: checkpoint not found; pass a checkpoints/*.pt file or a run directory")
        overrides = _check_overrides(overrides)
        model, cfg, ckpt = load_for_inference(path, use_ema=True, device="cpu")
        if not any(o.split("=", 1)[0].strip() == "data.layout" for o in overrides):
            # the training data's layout says nothing about the data to predict: detect it
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, layout="auto"))
        cfg = apply_inference_overrides(cfg, overrides)
        return cls(path, model, cfg, ckpt, list(overrides))

    def members(self, manifest: Any, case_id: str, *, progress: bool = False) -> np.ndarray:
        """Sampled member probabilities of one cached case: float32 ``(M, Z, H, W)`` on the cache grid."""
        cfg = self.cfg
        gen = torch.Generator(device=self.device).manual_seed(_case_seed(cfg.seed, case_id))
        kwargs = dict(members=self.members_per_case, sampler=sampler_name(cfg), eta=cfg.diffusion.eta,
                      batch_size=cfg.inference.batch_size, generator=gen, progress=progress,
                      precision=self.precision, clip_denoised=cfg.diffusion.clip_denoised, desc=case_id)
        if cfg.data.dims == 3:  # sliding 3-D patches, all sampled in one batched call, then stitched
            volume = np.asarray(manifest.case(case_id).image, dtype=np.float32)  # (C, Z, H, W)
            return sample_windows(
                lambda p: sample_probabilities(self.model, self.diffusion, torch.from_numpy(p).to(self.device),
                                               **kwargs).float().cpu().numpy(),
                volume, cfg.data.patch_size,
            )
        images = _volume(manifest, case_id, cfg).to(self.device)
        probs = sample_probabilities(self.model, self.diffusion, images, **kwargs)
        return probs.float().cpu().numpy()

    def case(self, manifest: Any, case_id: str, *, progress: bool = False) -> dict[str, np.ndarray]:
        """Combined probability and uncertainty of one case on the cache and native grids.

        Returns:
            ``prob_cache``, ``unc_cache`` ``(Z, H, W)``; ``prob_native``, ``unc_native``,
            ``mask_native`` ``(Z, Y, X)``; ``mask_cache``; ``members_cache`` ``(M, Z, H, W)``.
        """
        inf = self.cfg.inference
        case = manifest.case(case_id)
        members = self.members(manifest, case_id, progress=progress)
        prob_cache = ens.combine(members, inf.combine, self.threshold)
        unc_cache = ens.uncertainty(members, inf.uncertainty)
        cache_geo, native_geo = case.cache_geometry, case.native_geometry
        prob_native = to_native(prob_cache, cache_geo, native_geo)
        return {
            "prob_cache": prob_cache,
            "unc_cache": unc_cache,
            "mask_cache": ens.binarize(prob_cache, self.threshold, inf.combine),
            "prob_native": prob_native,
            "unc_native": to_native(unc_cache, cache_geo, native_geo),
            "mask_native": ens.binarize(prob_native, self.threshold, inf.combine),
            "members_cache": members,
        }


def predict(
    checkpoint: str | os.PathLike[str],
    data: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    overrides: Sequence[str] = (),
    cases: Sequence[str] | None = None,
    progress: bool = True,
) -> list[Path]:
    """Predict every case of ``data`` with ``checkpoint`` and write the outputs to ``out_dir``.

    The threshold is the calibrated one (``calibration.json`` next to the checkpoint or in its run
    directory, else the checkpoint's ``calibration`` entry) when ``inference.use_calibrated_threshold``
    is true and one exists, else ``inference.threshold``.

    Args:
        checkpoint: a ``.pt`` checkpoint or a run directory (its ``best.pt``).
        data: prepared cache, raw dataset root, case folder, or a list of them.
        out_dir: output folder (created).
        overrides: ``key=value`` for :data:`OVERRIDABLE` keys, e.g. ``inference.ensemble=3``,
            ``diffusion.respacing=ddim50``.
        cases: restrict to these case ids; ``["all"]`` = every case. None: the test subjects of
            the checkpoint's run (``splits.json``) when the data holds several cases and some of
            them (a note says so), else every case (with a warning when there is no split).
        progress: tqdm bars (cases, and denoising steps per case).

    Returns:
        The written binary mask paths (``<out_dir>/<case>.nii.gz``), one per case.

    Raises:
        CheckpointError: missing, truncated or incompatible checkpoint.
        ConfigError: an override that may not or cannot be applied.
        DataError: see :func:`resolve_sources`.
    """
    pred = Predictor.load(checkpoint, overrides)
    cfg, inf = pred.cfg, pred.cfg.inference
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    every = cases is not None and [c.lower() for c in cases] == [ALL_CASES]
    sources = resolve_sources(data, out, cfg, None if every else cases, progress)
    if cases is None:
        sources = _default_to_test_split(sources, pred.checkpoint, data)
    todo = [(s.manifest, cid) for s in sources for cid in s.case_ids]

    bar = None
    if progress:
        bar = tqdm(total=len(todo), desc="predict", unit="case")
    rows, written = [], []
    chan = _overlay_channel(cfg.data.modalities)
    for manifest, case_id in todo:
        case = manifest.case(case_id)
        res = pred.case(manifest, case_id, progress=progress)
        native_geo = case.native_geometry
        paths = export.write_case(out, case_id, mask=res["mask_native"], prob=res["prob_native"],
                                  uncertainty=res["unc_native"], native_geometry=native_geo)
        if inf.write_members and pred.is_diffusion:  # for evaluate's uncertainty metrics
            masks, brain = mem.native_members(res["members_cache"], np.asarray(case.image, dtype=np.float32),
                                              pred.threshold, case.cache_geometry, native_geo)
            mem.write_members(mem.members_path(out, case_id), masks, brain)
        if inf.overlays:
            export.write_overlay(export.output_paths(out, case_id)["overlay"],
                                 np.asarray(case.image[chan], dtype=np.float32), res["mask_cache"],
                                 _reference_mask(case), case_id=case_id)
        rows.append(export.case_row(case_id, res["mask_native"], res["unc_native"], native_geo.voxel_volume_ml,
                                    pred.threshold, combine=inf.combine, members=pred.members_per_case,
                                    respacing=pred.respacing))
        written.append(paths["mask"])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(case=case_id, ml=rows[-1]["lesion_volume_ml"])
    if bar is not None:
        bar.close()
    export.write_predictions_csv(out / "predictions.csv", rows)
    atomic_write_json(out / "predict.json", {
        "checkpoint": str(pred.checkpoint.resolve()),
        "step": pred.ckpt.get("step"),
        "weights": pred.weights,
        "data": [str(Path(p)) for p in ([data] if isinstance(data, (str, os.PathLike)) else data)],
        "cases": [cid for _, cid in todo],
        "threshold": pred.threshold,
        "threshold_source": pred.threshold_source,
        "respacing": pred.respacing,
        "members": pred.members_per_case,
        "device": str(pred.device),
        "precision": pred.precision,
        "overrides": pred.overrides,
        "inference": to_dict(inf),
    })
    return written


__all__ = ["ALL_CASES", "OVERRIDABLE", "Predictor", "apply_inference_overrides", "checkpoint_test_cases", "predict",
           "resolve_sources"]
