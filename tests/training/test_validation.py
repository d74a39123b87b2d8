"""Validation during training: native-grid ISLES'24 metrics, Tmax baseline, per-rank split of cases."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medsegdiff.config import load_config
from medsegdiff.data.cache import Manifest
from medsegdiff.training.distributed import DistContext
from medsegdiff.training.validation import Validator, mean_metrics, voxel_volume_ml


class _Constant(nn.Module):
    """Discriminative stand-in: the same logit everywhere."""

    is_diffusion = False

    def __init__(self, logit: float) -> None:
        super().__init__()
        self.logit = logit

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.full_like(image[:, :1], self.logit)


def _validator(tiny_data, **kw):
    root, cache = tiny_data
    cfg = load_config(None, ["device=cpu", "data.image_size=16", "evaluation.tmax_threshold=9.0"])
    manifest = Manifest.open(cache)
    return Validator(cfg, manifest, manifest.case_ids, kw.get("ctx", DistContext())), manifest


def test_empty_prediction_scores_from_first_principles(tiny_data):
    val, manifest = _validator(tiny_data)
    metrics = val(_Constant(-20.0), step=0)  # sigmoid(-20) < 0.5 everywhere: empty prediction
    gt = [manifest.case(c).native_mask() for c in manifest.case_ids]
    vols = [voxel_volume_ml(manifest.case(c).native_geometry) for c in manifest.case_ids]
    empty = [g.sum() == 0 for g in gt]
    # Dice is 1 for an empty reference (both empty), else 0; AVD is the whole reference volume.
    assert metrics["dice"] == np.mean([1.0 if e else 0.0 for e in empty])
    assert np.isclose(metrics["avd_ml"], np.mean([g.sum() * v for g, v in zip(gt, vols)]))
    assert metrics["cases"] == len(manifest.case_ids)
    assert [r["case_id"] for r in val.last_rows] == manifest.case_ids


def test_full_prediction_dice_is_twice_lesion_over_volume_plus_lesion(tiny_data):
    val, manifest = _validator(tiny_data)
    val(_Constant(20.0), step=0)  # everything inside the cache grid is lesion
    for row in val.last_rows:
        case = manifest.case(row["case_id"])
        g = case.native_mask().astype(bool)
        n = g.size  # the cache grid covers the native extent, so every native voxel is predicted
        assert np.isclose(row["dice"], 2 * g.sum() / (n + g.sum()), atol=1e-9), row


def test_tmax_baseline_matches_direct_computation(tiny_data):
    val, manifest = _validator(tiny_data)
    base = val.baseline()
    dice = []
    for cid in manifest.case_ids:
        case = manifest.case(cid)
        p, g = case.native_tmax() > 9.0, case.native_mask().astype(bool)
        denom = p.sum() + g.sum()
        dice.append(1.0 if denom == 0 else 2 * (p & g).sum() / denom)
    assert np.isclose(base["dice"], np.mean(dice))
    assert val.baseline() is base  # computed once


def test_ranks_score_disjoint_cases(tiny_data, monkeypatch):
    val, manifest = _validator(tiny_data, ctx=DistContext(rank=1, world_size=2))
    seen = []
    monkeypatch.setattr(val, "score_case", lambda model, cid, step: seen.append(cid) or {"case_id": cid, "dice": 1.0})
    import medsegdiff.training.validation as vmod

    monkeypatch.setattr(vmod, "all_gather_objects", lambda ctx, rows: [rows])
    val(_Constant(0.0), step=0)
    assert seen == manifest.case_ids[1::2]


def test_mean_metrics_ignores_nan():
    out = mean_metrics([{"dice": 1.0, "avd_ml": float("nan")}, {"dice": 0.0, "avd_ml": 2.0}])
    assert out["dice"] == 0.5 and out["avd_ml"] == 2.0 and out["cases"] == 2.0


def test_panels_show_the_slice_with_most_lesion(tiny_data):
    val, manifest = _validator(tiny_data)
    val(_Constant(20.0), step=0)
    panels = val.last_panels
    assert set(panels) == {"image", "reference", "prediction", "uncertainty"}
    case = manifest.case(manifest.case_ids[0])
    mask = np.asarray(case.mask)
    if mask.any():
        z = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(1)))
        assert np.array_equal(panels["reference"], mask[z].astype(np.float32))
    assert np.allclose(panels["prediction"], 1.0)  # sigmoid(20) everywhere
    assert np.allclose(panels["uncertainty"], 0.0)  # one member: no spread
    for img in panels.values():
        assert img.shape == mask.shape[1:]


class _Pointwise(nn.Module):
    """Discriminative stand-in whose logit at each voxel depends on that voxel's first channel only."""

    is_diffusion = False

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return 40.0 * (image[:, :1] - 0.5)


def test_3d_patch_model_validates_on_stitched_sliding_windows(tiny_data):
    root, cache = tiny_data
    cfg = load_config(None, ["device=cpu", "data.image_size=16", "data.dims=3", "data.patch_size=[2,8,8]",
                             "evaluation.tmax_threshold=9.0"])
    manifest = Manifest.open(cache)
    val = Validator(cfg, manifest, manifest.case_ids, DistContext())
    cid = manifest.case_ids[0]
    image = np.asarray(manifest.case(cid).image, dtype=np.float32)
    prob, spread = val.probabilities(_Pointwise(), cid, step=0)
    # every voxel is covered by windows that agree, so stitching reproduces the whole-volume map
    expected = torch.sigmoid(_Pointwise()(torch.from_numpy(image)[None]))[0, 0].numpy()
    assert prob.shape == image.shape[1:] and np.allclose(prob, expected, atol=1e-6)
    assert np.all(spread == 0)  # one member
    metrics = val(_Constant(-20.0), step=0)  # empty prediction: the same first-principles Dice as 2-D
    gt = [manifest.case(c).native_mask() for c in manifest.case_ids]
    assert metrics["dice"] == np.mean([1.0 if g.sum() == 0 else 0.0 for g in gt])
    assert metrics["cases"] == len(manifest.case_ids)
