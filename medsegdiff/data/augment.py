"""Training augmentation: MONAI dictionary transforms built from :class:`AugmentConfig`.

Spatial transforms (left-right flip, in-plane rotation, zoom) act identically on ``image`` and
``mask`` (image: bilinear / trilinear, mask: nearest, so the mask stays binary; the zoom uses
``nearest-exact`` for the mask because torch's ``nearest`` is shifted by half a pixel against
``bilinear`` with ``align_corners=False``); intensity jitter
(additive shift, multiplicative scale) acts on the image only. ``augment.rotate_deg`` is in degrees
and is converted to the radians MONAI expects. Randomness is a pure function of the seed given to
:func:`augment_sample`, so a resumed run reproduces the exact same samples.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    RandFlipd,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
)

from medsegdiff.config.data import AugmentConfig

IMAGE_KEY = "image"
MASK_KEY = "mask"


def build_augment(cfg: AugmentConfig, *, spatial_dims: int = 2, image_key: str = IMAGE_KEY,
                  mask_key: str = MASK_KEY) -> Any | None:
    """A MONAI ``Compose`` of random dictionary transforms, or None if augmentation is off.

    Args:
        cfg: ``data.augment``.
        spatial_dims: 2 for slices ``(C, H, W)``, 3 for patches ``(C, D, H, W)``; rotation is always
            in the H-W plane (about the slice axis) and the flip is along W (left-right).
        image_key: key of the image tensor.
        mask_key: key of the mask tensor.

    Returns:
        ``monai.transforms.Compose`` or None when ``cfg.enabled`` is false or every probability is 0.
    """
    if not cfg.enabled:
        return None
    keys = [image_key, mask_key]
    linear = "bilinear" if spatial_dims == 2 else "trilinear"
    transforms: list[Any] = []
    if cfg.flip_prob > 0:
        transforms.append(RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=spatial_dims - 1))
    if cfg.rotate_prob > 0 and cfg.rotate_deg > 0:
        # Degrees in the config, radians in MONAI. In 3D, range_x rotates about the first spatial axis
        # (D), i.e. in the H-W plane.
        transforms.append(RandRotated(keys, range_x=math.radians(cfg.rotate_deg), prob=cfg.rotate_prob,
                                      keep_size=True, mode=("bilinear", "nearest"), padding_mode="zeros",
                                      align_corners=False))
    if cfg.scale_prob > 0 and cfg.scale > 0:
        transforms.append(RandZoomd(keys, prob=cfg.scale_prob, min_zoom=1.0 - cfg.scale, max_zoom=1.0 + cfg.scale,
                                    mode=(linear, "nearest-exact"), padding_mode="constant", keep_size=True))
    if cfg.intensity_prob > 0 and cfg.intensity_shift > 0:
        transforms.append(RandShiftIntensityd(image_key, offsets=cfg.intensity_shift, prob=cfg.intensity_prob))
    if cfg.intensity_prob > 0 and cfg.intensity_scale > 0:
        transforms.append(RandScaleIntensityd(image_key, factors=cfg.intensity_scale, prob=cfg.intensity_prob))
    if not transforms:
        return None
    return Compose(transforms)


def augment_sample(transform: Any, sample: dict[str, Any], seed: int, *, image_key: str = IMAGE_KEY,
                   mask_key: str = MASK_KEY) -> dict[str, Any]:
    """Apply ``transform`` with randomness fixed by ``seed``; returns plain float32 tensors.

    Args:
        transform: from :func:`build_augment` (None = identity).
        sample: dict with ``image`` ``(C, *S)`` and ``mask`` ``(1, *S)`` float32 tensors.
        seed: the per-sample seed (e.g. from :class:`~medsegdiff.data.datasets.LesionOversamplingSampler`).

    Returns:
        A new dict; ``mask`` is re-binarised (> 0.5) so it stays in {0, 1}.
    """
    if transform is None:
        return sample
    # One RandomState shared by every transform (consumed in a fixed order): deterministic per seed,
    # and 15x cheaper than Compose.set_random_state, which builds a new RandomState per transform.
    state = np.random.RandomState(int(seed) % (2**32))
    transform.set_random_state(state=state)
    for t in transform.transforms:
        if hasattr(t, "set_random_state"):
            t.set_random_state(state=state)
    tracking = get_track_meta()
    set_track_meta(False)  # plain tensors: no MetaTensor / affine bookkeeping (about 2x faster)
    try:
        out = transform(dict(sample))
    finally:
        set_track_meta(tracking)
    result = dict(sample)
    image = out[image_key]
    mask = out[mask_key]
    image = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(np.asarray(image))
    mask = mask.as_tensor() if hasattr(mask, "as_tensor") else torch.as_tensor(np.asarray(mask))
    result[image_key] = image.to(torch.float32).contiguous()
    result[mask_key] = (mask > 0.5).to(torch.float32).contiguous()
    return result


__all__ = ["augment_sample", "build_augment"]
