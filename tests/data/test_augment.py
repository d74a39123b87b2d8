"""Augmentation: image and mask stay aligned, degrees become radians, deterministic per seed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from medsegdiff.config.data import AugmentConfig
from medsegdiff.data.augment import augment_sample, build_augment


def _sample(spatial=(16, 16)) -> dict:
    mask = torch.zeros(1, *spatial)
    mask[(0, *[slice(s // 4, 3 * s // 4 - 1) for s in spatial])] = 1
    mask[(0, *[slice(1, 3) for _ in spatial])] = 1  # second, small blob near a corner
    other = torch.linspace(0.1, 0.4, mask.numel()).reshape(mask.shape)
    return {"image": torch.cat([mask.clone(), other]), "mask": mask}


def _boundary(mask: np.ndarray) -> int:
    m = mask.astype(bool)
    return int((ndimage.binary_dilation(m) & ~ndimage.binary_erosion(m)).sum())


def test_flip_only_keeps_exact_alignment():
    t = build_augment(AugmentConfig(flip_prob=1.0, rotate_prob=0, scale_prob=0, intensity_prob=0))
    s = _sample()
    out = augment_sample(t, s, seed=1)
    assert torch.equal(out["mask"], torch.flip(s["mask"], dims=[-1]))  # left-right = last axis
    assert torch.equal(out["image"][:1], out["mask"])


ALL = dict(flip_prob=0.5, rotate_deg=30, rotate_prob=1.0, scale=0.2, scale_prob=1.0,
           intensity_shift=0.05, intensity_scale=0.05, intensity_prob=1.0)
ROTATE = dict(flip_prob=0, rotate_deg=30, rotate_prob=1.0, scale_prob=0, intensity_prob=0)
ZOOM = dict(flip_prob=0, rotate_prob=0, scale=0.2, scale_prob=1.0, intensity_prob=0)


@pytest.mark.parametrize("spatial", [(16, 16), (6, 16, 16)])
@pytest.mark.parametrize(("kwargs", "tolerance"), [(ROTATE, 0.1), (ZOOM, 0.1), (ALL, 0.25)])
def test_transforms_keep_image_and_mask_aligned(spatial, kwargs, tolerance):
    # Image channel 0 is a copy of the mask before augmentation. Bilinear (image) vs nearest (mask)
    # may differ only on a few boundary voxels; a misaligned pair (other angle / zoom, or the
    # half-voxel shift of torch 'nearest' vs 'bilinear') differs on 20-50 % of the boundary.
    t = build_augment(AugmentConfig(**kwargs), spatial_dims=len(spatial))
    for seed in range(6):
        out = augment_sample(t, _sample(spatial), seed)
        mask = out["mask"][0].numpy()
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert mask.sum() > 0
        image = out["image"][0].numpy()
        decisive = np.abs(image - 0.5) > 0.05  # exact ties (0.5) may round either way
        mismatch = int(((image > 0.5) != (mask > 0.5))[decisive].sum())
        assert mismatch <= max(tolerance * _boundary(mask), 2), (seed, mismatch, _boundary(mask))


def test_rotation_degrees_are_converted_to_radians():
    for deg in (90.0, 10.0):
        t = build_augment(AugmentConfig(flip_prob=0, rotate_deg=deg, rotate_prob=1.0, scale_prob=0, intensity_prob=0))
        angles = []
        for seed in range(60):
            augment_sample(t, _sample(), seed)
            angles.append(t.transforms[0].rand_rotate.x)
        bound = math.radians(deg)
        assert max(abs(a) for a in angles) <= bound + 1e-9
        assert max(abs(a) for a in angles) > 0.7 * bound  # the range is used, not a tiny one


def test_rotation_by_ninety_degrees_moves_a_corner_blob():
    # A setting of 90 degrees must be able to rotate by close to 90: a blob in the top-left corner
    # ends up near another corner for the most extreme sampled angle.
    t = build_augment(AugmentConfig(flip_prob=0, rotate_deg=90, rotate_prob=1.0, scale_prob=0, intensity_prob=0))
    best = None
    for seed in range(60):
        m = torch.zeros(1, 1, 15, 15)
        m[..., 1:4, 1:4] = 1
        out = augment_sample(t, {"image": m[0].clone(), "mask": m[0]}, seed)
        angle = t.transforms[0].rand_rotate.x
        if best is None or abs(angle) > abs(best[0]):
            best = (angle, out["mask"][0].numpy())
    angle, mask = best
    assert abs(angle) > math.radians(75)
    ys, xs = np.nonzero(mask)
    centre = np.array([ys.mean(), xs.mean()])
    assert np.linalg.norm(centre - np.array([2.0, 2.0])) > 8  # left its original corner


def test_deterministic_per_seed_and_intensity_on_image_only():
    cfg = AugmentConfig(flip_prob=0.5, rotate_prob=0.5, scale_prob=0.5, intensity_prob=1.0)
    t = build_augment(cfg)
    a, b = augment_sample(t, _sample(), 7), augment_sample(t, _sample(), 7)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    differs = [not torch.equal(augment_sample(t, _sample(), s)["image"], a["image"]) for s in range(8, 14)]
    assert any(differs)
    only_intensity = build_augment(AugmentConfig(flip_prob=0, rotate_prob=0, scale_prob=0, intensity_prob=1.0,
                                                 intensity_shift=0.2, intensity_scale=0.2))
    s = _sample()
    out = augment_sample(only_intensity, s, 3)
    assert torch.equal(out["mask"], s["mask"])
    assert not torch.equal(out["image"], s["image"])


def test_disabled_is_none():
    assert build_augment(AugmentConfig(enabled=False)) is None
    assert build_augment(AugmentConfig(flip_prob=0, rotate_prob=0, scale_prob=0, intensity_prob=0)) is None
    s = _sample()
    assert augment_sample(None, s, 0) is s


def test_3d_rotation_is_in_the_slice_plane():
    t = build_augment(AugmentConfig(flip_prob=0, rotate_deg=90, rotate_prob=1.0, scale_prob=0, intensity_prob=0),
                      spatial_dims=3)
    m = torch.zeros(1, 9, 15, 15)
    m[0, 2, 1:3, 7] = 1  # a blob on slice D = 2, near the H border
    moved = 0
    for seed in range(10):
        out = augment_sample(t, {"image": m.clone(), "mask": m.clone()}, seed)
        d, h, w = np.nonzero(out["mask"][0].numpy())
        assert set(d.tolist()) == {2}  # never leaves its slice
        moved += int(abs(w.mean() - 7) > 3)
    assert moved > 0
