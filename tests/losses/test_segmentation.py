"""Dice + BCE terms: hand-computed values, per-sample weighting, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from medsegdiff.losses.segmentation import dice_bce_terms


def batch():
    target = torch.zeros(2, 1, 2, 2)
    target[:, 0, 0, 0] = 1.0  # one lesion voxel of four in each sample
    return target


def test_half_probability_values_by_hand():
    target = batch()
    prob = torch.full_like(target, 0.5)
    out = dice_bce_terms(prob, target, logits=False, smooth=0.0)
    # Dice loss 1 - 2*0.5 / (2 + 1) = 2/3; BCE = -log(0.5) on every voxel
    assert out["dice"].item() == pytest.approx(2 / 3, abs=1e-6)
    assert out["bce"].item() == pytest.approx(math.log(2), abs=1e-6)
    from_logits = dice_bce_terms(torch.zeros_like(target), target, logits=True, smooth=0.0)
    assert from_logits["dice"].item() == pytest.approx(2 / 3, abs=1e-6)
    assert from_logits["bce"].item() == pytest.approx(math.log(2), abs=1e-6)


def test_per_sample_weights_scale_each_sample():
    target = batch()
    prob = torch.full_like(target, 0.5)
    prob[1] = target[1]  # sample 1 perfect: dice 0, bce ~ 0
    out = dice_bce_terms(prob, target, logits=False, weights=torch.tensor([0.5, 1.0]), smooth=0.0)
    assert out["dice"].item() == pytest.approx(0.5 * (2 / 3) / 2, abs=1e-5)
    assert out["bce"].item() == pytest.approx(0.5 * math.log(2) / 2, abs=1e-4)


def test_gradients_flow_and_reduce_loss():
    target = batch()
    logits = torch.zeros_like(target, requires_grad=True)
    out = dice_bce_terms(logits, target, logits=True)
    (out["dice"] + out["bce"]).backward()
    assert logits.grad is not None
    assert logits.grad[0, 0, 0, 0] < 0 < logits.grad[0, 0, 1, 1]  # push lesion up, background down


def test_bad_weights_shape_message():
    target = batch()
    with pytest.raises(ValueError, match=r"weights must have shape \(2,\) \(one per sample\), got \(3,\)"):
        dice_bce_terms(target, target, logits=False, weights=torch.ones(3))
