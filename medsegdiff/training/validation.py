"""Validation during training: ISLES'24 volume metrics on the native grid, like the final scoring.

For every validation case: sample each slice with the configured (short) respacing and the EMA
weights (:func:`medsegdiff.inference.sampler.sample_probabilities`; the discriminative baseline
goes through ``sigmoid(logits)`` on the same path), average the ensemble, assemble the cache-grid
volume ``(Z, H, W)``, resample it to the native grid
(:func:`medsegdiff.inference.export.to_native`), threshold, and score with
:func:`medsegdiff.metrics.isles24.case_metrics` against the native mask from ``native.npz``.
Per-case numbers are computed on every rank for its share of the cases (``cases[rank::world]``)
and gathered, so each rank returns the same means (and agrees on the best checkpoint).

3-D patch models (``data.dims: 3``) are validated the same way on whole volumes: the cached volume
is cut into overlapping ``data.patch_size`` windows, all windows are sampled in one batched call and
the member probabilities are stitched (:func:`medsegdiff.inference.windows.sample_windows`, the
path ``medsegdiff predict`` uses), then scored on the native grid like 2-D.

The official simple baseline (Tmax > ``evaluation.tmax_threshold`` s) is scored once on the same
cases for reference.

The researcher's earlier code averaged per-slice Dice over foreground slices at model resolution;
here false positives on empty slices count and the grid is the scoring grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from medsegdiff.config import ExperimentConfig
from medsegdiff.data.datasets import SliceDataset
from medsegdiff.diffusion.factory import build_diffusion
from medsegdiff.inference.export import to_native
from medsegdiff.inference.sampler import sample_probabilities, sampler_name
from medsegdiff.inference.windows import sample_windows
from medsegdiff.metrics.isles24 import case_metrics
from medsegdiff.training.distributed import DistContext, all_gather_objects

LOGGED = ("dice", "avd_ml", "lesion_f1", "lesion_count_diff")
TABLE_COLUMNS = ("case_id", "dice", "avd_ml", "lesion_f1", "lesion_count_diff", "gt_volume_ml", "pred_volume_ml")


def voxel_volume_ml(geometry: Any) -> float:
    vol = getattr(geometry, "voxel_volume_ml", None)
    if vol is not None:
        return float(vol)
    return float(np.prod(np.asarray(geometry.spacing, dtype=np.float64))) / 1000.0


def mean_metrics(rows: Sequence[dict[str, float]], keys: Sequence[str] = LOGGED) -> dict[str, float]:
    """Mean of each key over cases (NaN entries ignored), plus ``cases``."""
    out: dict[str, float] = {}
    for k in keys:
        vals = [float(r[k]) for r in rows if k in r and r[k] is not None and math.isfinite(float(r[k]))]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    out["cases"] = float(len(rows))
    return out


class Validator:
    """Scores a model on the validation cases (see the module docstring).

    Args:
        cfg: the experiment config (``train.validation``, ``diffusion``, ``evaluation``).
        manifest: the opened cache.
        case_ids: validation case ids (``train.validation.max_cases`` keeps the first N).
        dist_ctx: rank/world/device.
    """

    def __init__(self, cfg: ExperimentConfig, manifest: Any, case_ids: Sequence[str], dist_ctx: DistContext) -> None:
        vc = cfg.train.validation
        ids = list(case_ids)[: vc.max_cases] if vc.max_cases else list(case_ids)
        self.cfg = cfg
        self.manifest = manifest
        self.case_ids = ids
        self.dist = dist_ctx
        self.dataset = SliceDataset(manifest, ids, context_slices=cfg.data.context_slices, augment=None,
                                    seed=cfg.seed) if ids and cfg.data.dims == 2 else None
        self._diffusion: Any = None
        self._baseline: dict[str, float] | None = None
        self.last_rows: list[dict[str, Any]] = []
        self.last_panels: dict[str, np.ndarray] = {}
        self.baseline_rows: list[dict[str, Any]] = []

    @property
    def diffusion(self) -> Any:
        if self._diffusion is None:
            self._diffusion = build_diffusion(self.cfg.diffusion, self.cfg.train.validation.respacing)
        return self._diffusion

    def probabilities(self, model: torch.nn.Module, case_id: str, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Ensemble mean and standard deviation of the lesion probability, each ``(Z, H, W)`` (cache grid)."""
        vc = self.cfg.train.validation
        gen = torch.Generator(device="cpu").manual_seed(self.cfg.seed * 1_000_003 + step)
        diffusion = self.diffusion if model.is_diffusion else None

        def sample(images: torch.Tensor) -> torch.Tensor:
            return sample_probabilities(
                model, diffusion, images.to(self.dist.device), members=vc.ensemble,
                sampler=sampler_name(self.cfg), eta=self.cfg.diffusion.eta,
                batch_size=self.cfg.inference.batch_size, generator=gen, precision=self.cfg.inference.precision,
                clip_denoised=self.cfg.diffusion.clip_denoised,
            ).float().cpu()

        if self.cfg.data.dims == 3:  # (M, Z, H, W) from stitched sliding windows
            volume = np.asarray(self.manifest.case(case_id).image, dtype=np.float32)
            probs = torch.from_numpy(
                sample_windows(lambda p: sample(torch.from_numpy(p)).numpy(), volume, self.cfg.data.patch_size)
            )
        else:
            probs = sample(self.dataset.volume(case_id))
        return probs.mean(0).numpy(), probs.std(0, correction=0).numpy()

    def score_case(self, model: torch.nn.Module, case_id: str, step: int) -> dict[str, Any]:
        case = self.manifest.case(case_id)
        prob, spread = self.probabilities(model, case_id, step)
        if case_id == self.case_ids[0]:
            self.last_panels = panels(case, prob, spread)
        native = to_native(prob, case.cache_geometry, case.native_geometry)
        pred = native >= self.cfg.train.validation.threshold
        m = case_metrics(pred, case.native_mask(), voxel_volume_ml(case.native_geometry),
                         self.cfg.evaluation.iou_threshold, hd95=False)
        return {"case_id": case_id, **m}

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """Mean validation metrics (identical on every rank); ``{}`` without validation cases."""
        if not self.case_ids:
            return {}
        mine = self.case_ids[self.dist.rank :: self.dist.world_size]
        rows = [self.score_case(model, cid, step) for cid in mine]
        gathered = [r for part in all_gather_objects(self.dist, rows) for r in part]
        gathered.sort(key=lambda r: self.case_ids.index(r["case_id"]))
        self.last_rows = gathered
        return mean_metrics(gathered)

    def baseline(self) -> dict[str, float]:
        """Tmax > ``evaluation.tmax_threshold`` s on the same cases (computed once; cases without Tmax skipped)."""
        if self._baseline is None:
            rows = []
            for cid in self.case_ids:
                case = self.manifest.case(cid)
                tmax = case.native_tmax()
                if tmax is None:
                    continue
                pred = tmax > self.cfg.evaluation.tmax_threshold
                rows.append({"case_id": cid, **case_metrics(
                    pred, case.native_mask(), voxel_volume_ml(case.native_geometry),
                    self.cfg.evaluation.iou_threshold, hd95=False)})
            self.baseline_rows = rows
            self._baseline = mean_metrics(rows) if rows else {}
        return self._baseline


def table_rows(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """Per-case rows in :data:`TABLE_COLUMNS` order (for ``tracker.log_table``)."""
    return [[r.get(c) for c in TABLE_COLUMNS] for r in rows]


def panels(case: Any, prob: np.ndarray, spread: np.ndarray) -> dict[str, np.ndarray]:
    """Image panels of the slice with the most reference lesion (cache grid), each ``(H, W)`` in [0, 1].

    ``image`` is the Tmax channel when present (else the first modality), then ``reference``,
    ``prediction`` (ensemble-mean probability) and ``uncertainty`` (ensemble standard deviation).
    """
    mask = np.asarray(case.mask)
    z = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(1))) if mask.any() else mask.shape[0] // 2
    mods = list(getattr(case, "modalities", []))
    channel = mods.index("tmax") if "tmax" in mods else 0
    return {
        "image": np.asarray(case.image[channel, z], dtype=np.float32),
        "reference": mask[z].astype(np.float32),
        "prediction": prob[z].astype(np.float32),
        "uncertainty": spread[z].astype(np.float32),
    }
