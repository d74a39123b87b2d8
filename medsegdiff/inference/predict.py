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
``predictions.csv`` and ``predict.json`` (what was run).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medsegdiff.data.cache import cache_key
from medsegdiff.errors import CheckpointError, ConfigError, DataError

#: Keys that may be overridden at prediction time (everything else comes from the checkpoint).
OVERRIDABLE = ("inference.", "diffusion.respacing", "diffusion.sampler", "diffusion.eta",
               "diffusion.clip_denoised", "model.compile", "model.channels_last", "device", "seed")
CACHE_SUBDIR = "_cache"


@dataclass
class _Source:
    """Cases of one prepared cache."""

    manifest: Any
    case_ids: list[str]


def _check_overrides(overrides: Iterable[str]) -> list[str]:
    from medsegdiff.config.loader import parse_override

    out = []
    for text in overrides:
        parts, _ = parse_override(text)
        key = ".".join(parts)
        if not any(key == k or (k.endswith(".") and key.startswith(k)) for k in OVERRIDABLE):
            raise ConfigError(
                f"override {text!r}: only inference.*, diffusion.respacing/sampler/eta/clip_denoised, "
                "model.compile/channels_last, device and seed can be changed at prediction; the model and "
                "preprocessing come from the checkpoint"
            )
        out.append(text)
    return out


def apply_inference_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """A copy of ``cfg`` with prediction-time overrides applied and validated.

    Raises:
        ConfigError: an override outside :data:`OVERRIDABLE`, or an invalid value.
    """
    from medsegdiff.config.base import to_dict
    from medsegdiff.config.loader import apply_overrides, config_from_dict

    overrides = _check_overrides(overrides)
    if not overrides:
        return cfg
    return config_from_dict(apply_overrides(to_dict(cfg), overrides))


def _is_cache(path: Path) -> bool:
    from medsegdiff.data.cache import MANIFEST

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
    if manifest.hash != expected:
        raise DataError(
            f"{path}: this cache was prepared with other preprocessing settings ({manifest.hash}) than the "
            f"checkpoint's ({expected}); pass the raw dataset root instead, it is prepared with the checkpoint's settings"
        )


def _prepare_raw(path: Path, out_dir: Path, cfg: Any, progress: bool) -> Any:
    """Prepare a raw root or case folder with the checkpoint's data settings into ``out_dir/_cache``."""
    import inspect

    from medsegdiff.data.preprocess import prepare_dataset

    tag = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", path.resolve().name) or "data"
    cache_dir = out_dir / CACHE_SUBDIR / f"{name}-{tag}"
    kwargs: dict[str, Any] = {"progress": progress}
    if "require_mask" in inspect.signature(prepare_dataset).parameters:
        kwargs["require_mask"] = False  # prediction needs no reference mask
    try:
        return prepare_dataset(path, cache_dir, cfg.data, **kwargs)
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
) -> list[_Source]:
    """Open (or prepare) the data and pick the cases to predict.

    ``data`` is a prepared cache folder, a raw dataset root, one case folder, or a list of those;
    raw inputs are prepared with the checkpoint's data settings into ``out_dir/_cache/``.

    Raises:
        DataError: a path that does not exist, no cases found, modalities that do not match the
            checkpoint, or a requested case id that is not in the data.
    """
    from medsegdiff.data.cache import Manifest

    paths = [Path(data)] if isinstance(data, (str, os.PathLike)) else [Path(p) for p in data]
    if not paths:
        raise DataError("no data given; pass --data DATA_ROOT, a case folder or a prepared cache")
    sources: list[_Source] = []
    seen: set[str] = set()
    for path in paths:
        if not path.exists():
            raise DataError(f"{path}: data path not found; pass a dataset root, a case folder or a prepared cache")
        if _is_cache(path):
            manifest = Manifest.open(path)
            _check_cache_fits(manifest, cfg, path)
        else:
            manifest = _prepare_raw(path, out_dir, cfg, progress)
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
        for skip in manifest.skipped:
            print(f"medsegdiff predict: skipped {skip.get('case_id')}: {skip.get('reason')}", file=sys.stderr)
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
    from medsegdiff.data.datasets import SliceDataset

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
        from medsegdiff.diffusion.factory import build_diffusion
        from medsegdiff.inference.calibration import calibration_settings, find_calibration
        from medsegdiff.utils.runtime import resolve_device

        self.checkpoint, self.model, self.cfg, self.ckpt, self.overrides = checkpoint, model, cfg, ckpt, overrides
        override_keys = {o.split("=", 1)[0].strip() for o in overrides}
        inf = cfg.inference
        self.weights = "ema" if inf.use_ema and ckpt.get("ema") is not None else "model"
        if self.weights == "model" and ckpt.get("ema") is not None:
            model.load_state_dict(ckpt["model"])
        self.device = resolve_device(cfg.device if "device" in override_keys else "auto")
        model.to(self.device).eval()
        if cfg.model.channels_last and self.device.type == "cuda":
            import torch

            fmt = torch.channels_last_3d if cfg.data.dims == 3 else torch.channels_last
            model = model.to(memory_format=fmt)
        if cfg.model.compile:
            import torch

            model = torch.compile(model)  # forward only; encode_image runs eagerly once per slice
        self.model = model
        precision = inf.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        self.is_diffusion = bool(getattr(model, "is_diffusion", True))
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
        from medsegdiff.training.checkpoint import load_for_inference

        path = Path(checkpoint)
        if not path.exists():
            raise CheckpointError(f"{path}: checkpoint not found; pass a checkpoints/*.pt file or a run directory")
        overrides = _check_overrides(overrides)
        model, cfg, ckpt = load_for_inference(path, use_ema=True, device="cpu")
        cfg = apply_inference_overrides(cfg, overrides)
        return cls(path, model, cfg, ckpt, list(overrides))

    def members(self, manifest: Any, case_id: str, *, progress: bool = False) -> np.ndarray:
        """Sampled member probabilities of one cached case: float32 ``(M, Z, H, W)`` on the cache grid."""
        import torch

        from medsegdiff.inference.sampler import sample_probabilities

        cfg = self.cfg
        gen = torch.Generator(device=self.device).manual_seed(_case_seed(cfg.seed, case_id))
        kwargs = dict(members=self.members_per_case, sampler=cfg.diffusion.sampler, eta=cfg.diffusion.eta,
                      batch_size=cfg.inference.batch_size, generator=gen, progress=progress,
                      precision=self.precision, clip_denoised=cfg.diffusion.clip_denoised, desc=case_id)
        if cfg.data.dims == 3:  # sliding 3-D patches, all sampled in one batched call, then stitched
            from medsegdiff.inference.windows import extract_patches, stitch

            volume = np.asarray(manifest.case(case_id).image, dtype=np.float32)  # (C, Z, H, W)
            patches, starts, padded = extract_patches(volume, cfg.data.patch_size)
            probs = sample_probabilities(self.model, self.diffusion, torch.from_numpy(patches).to(self.device),
                                         **kwargs)  # (M, N, D, h, w)
            return stitch(probs.float().cpu().numpy(), starts, padded, volume.shape[1:])
        images = _volume(manifest, case_id, cfg).to(self.device)
        probs = sample_probabilities(self.model, self.diffusion, images, **kwargs)
        return probs.float().cpu().numpy()

    def case(self, manifest: Any, case_id: str, *, progress: bool = False) -> dict[str, np.ndarray]:
        """Combined probability and uncertainty of one case on the cache and native grids.

        Returns:
            ``prob_cache``, ``unc_cache`` ``(Z, H, W)``; ``prob_native``, ``unc_native``,
            ``mask_native`` ``(Z, Y, X)``; ``mask_cache``.
        """
        from medsegdiff.inference import ensemble as ens
        from medsegdiff.inference.export import to_native

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
        cases: restrict to these case ids.
        progress: tqdm bars (cases, and denoising steps per case).

    Returns:
        The written binary mask paths (``<out_dir>/<case>.nii.gz``), one per case.

    Raises:
        CheckpointError: missing, truncated or incompatible checkpoint.
        ConfigError: an override that may not or cannot be applied.
        DataError: see :func:`resolve_sources`.
    """
    from medsegdiff.config.base import to_dict
    from medsegdiff.inference import export
    from medsegdiff.utils.io import atomic_write_json

    pred = Predictor.load(checkpoint, overrides)
    cfg, inf = pred.cfg, pred.cfg.inference
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = resolve_sources(data, out, cfg, cases, progress)
    todo = [(s.manifest, cid) for s in sources for cid in s.case_ids]

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="predict", unit="case")
    rows, written = [], []
    chan = _overlay_channel(cfg.data.modalities)
    for manifest, case_id in todo:
        case = manifest.case(case_id)
        res = pred.case(manifest, case_id, progress=progress)
        native_geo = case.native_geometry
        paths = export.write_case(out, case_id, mask=res["mask_native"], prob=res["prob_native"],
                                  uncertainty=res["unc_native"], native_geometry=native_geo)
        if inf.overlays:
            export.write_overlay(export.output_paths(out, case_id)["overlay"],
                                 np.asarray(case.image[chan], dtype=np.float32), res["mask_cache"],
                                 _reference_mask(case))
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


__all__ = ["OVERRIDABLE", "Predictor", "apply_inference_overrides", "predict", "resolve_sources"]
