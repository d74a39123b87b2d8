"""Dice + BCE segmentation terms with per-sample weights (MONAI DiceLoss, reduction "none")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import Tensor

_EPS = 1e-6


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.flatten(1).mean(dim=1)


def _weighted_batch_mean(per_sample: Tensor, weights: Tensor | None) -> Tensor:
    """``mean_b(w_b * l_b)``: low-weight samples shrink the term (no renormalisation by sum w)."""
    if weights is None:
        return per_sample.mean()
    if weights.shape != per_sample.shape:
        raise ValueError(
            f"dice_bce_terms: weights must have shape {tuple(per_sample.shape)} (one per sample), "
            f"got {tuple(weights.shape)}"
        )
    return (weights.to(per_sample.dtype) * per_sample).mean()


def dice_bce_terms(
    prob_or_logits: Tensor,
    target: Tensor,
    *,
    logits: bool,
    weights: Tensor | None = None,
    smooth: float = 1e-5,
) -> dict[str, Tensor]:
    """Soft Dice loss and binary cross-entropy, each averaged per sample, then over the batch.

    Args:
        prob_or_logits: ``(B, 1, H, W[, D])`` lesion logits (``logits=True``) or probabilities in
            ``[0, 1]`` (``logits=False``; e.g. ``(x0_hat + 1) / 2``, clamped to ``[1e-6, 1 - 1e-6]``
            for the BCE).
        target: ``(B, 1, H, W[, D])`` mask in ``{0, 1}``.
        logits: whether the input is logits (sigmoid applied inside both terms).
        weights: optional ``(B,)`` per-sample weights (e.g. :func:`timestep_weights`); each term is
            ``mean_b(weights_b * loss_b)``.
        smooth: MONAI DiceLoss ``smooth_nr`` and ``smooth_dr``.

    Returns:
        ``{"dice": Tensor[], "bce": Tensor[]}`` (float32 scalars with gradient).

    Raises:
        ValueError: shapes differ or ``weights`` is not ``(B,)``.
    """
    if prob_or_logits.shape != target.shape:
        raise ValueError(
            f"dice_bce_terms: prediction shape {tuple(prob_or_logits.shape)} differs from target "
            f"shape {tuple(target.shape)}"
        )
    # Losses in float32 (safe under autocast; BCE on probabilities is refused by autocast).
    x = prob_or_logits.float()
    y = target.float()
    with torch.autocast(device_type=x.device.type, enabled=False):
        dice_loss = DiceLoss(sigmoid=logits, reduction="none", smooth_nr=smooth, smooth_dr=smooth)
        dice = _per_sample_mean(dice_loss(x, y))
        if logits:
            bce = _per_sample_mean(F.binary_cross_entropy_with_logits(x, y, reduction="none"))
        else:
            p = x.clamp(_EPS, 1.0 - _EPS)
            bce = _per_sample_mean(-(y * torch.log(p) + (1.0 - y) * torch.log1p(-p)))
    return {"dice": _weighted_batch_mean(dice, weights), "bce": _weighted_batch_mean(bce, weights)}
