"""Build a network from an experiment config: ``build_model(cfg)`` by ``cfg.model.name``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch.nn as nn

from medsegdiff.errors import ConfigError
from medsegdiff.nets.baseline import DynUNetBaseline
from medsegdiff.nets.medsegdiff_v1 import MedSegDiffV1
from medsegdiff.nets.medsegdiff_v2 import MedSegDiffV2
from medsegdiff.nets.unet import NetSpec

__all__ = ["MODELS", "build_model", "is_diffusion_model", "model_size", "register_model"]

Builder = Callable[..., nn.Module]
MODELS: dict[str, Builder] = {}
_DISCRIMINATIVE: set[str] = set()


def register_model(name: str, *, diffusion: bool = True) -> Callable[[Builder], Builder]:
    """Decorator adding a builder ``fn(cfg) -> nn.Module`` to :data:`MODELS` under ``name``.

    ``diffusion=False`` marks a discriminative network (``model(image) -> logits``); its built
    models have ``is_diffusion = False``, which :func:`is_diffusion_model` answers before building.
    """

    def deco(fn: Builder) -> Builder:
        MODELS[name] = fn
        if not diffusion:
            _DISCRIMINATIVE.add(name)
        return fn

    return deco


def is_diffusion_model(name: str) -> bool:
    """Whether ``model.name`` is a diffusion network (the one place that decides, by registration)."""
    return name not in _DISCRIMINATIVE


def model_size(cfg) -> tuple[int, ...]:
    """Spatial input size: ``(image_size, image_size)`` in 2-D, ``data.patch_size`` (D, H, W) in 3-D."""
    if cfg.data.dims == 2:
        return (cfg.data.image_size, cfg.data.image_size)
    return tuple(cfg.data.patch_size)


def _spec(cfg):
    spec = NetSpec.from_config(
        cfg.model,
        in_channels=cfg.data.in_channels,
        size=model_size(cfg),
        dims=cfg.data.dims,
        out_channels=2 if cfg.diffusion.learn_sigma else 1,
    )
    # Self-conditioning (Chen et al. 2022): x_t and the previous x0 estimate as two mask channels.
    return replace(spec, mask_channels=2) if cfg.diffusion.self_condition else spec


@register_model("medsegdiff_v1")
def _build_v1(cfg) -> nn.Module:
    return MedSegDiffV1(_spec(cfg), ff_parser=cfg.model.ff_parser)


@register_model("medsegdiff_v2")
def _build_v2(cfg) -> nn.Module:
    m = cfg.model
    return MedSegDiffV2(
        _spec(cfg),
        anchor=m.anchor,
        anchor_detach=m.anchor_detach,
        usa_sigma=m.usa_sigma,
        usa_truncate=m.usa_truncate,
        usa_learnable=m.usa_learnable,
        ssformer_depth=m.ssformer_depth,
        nbp_hidden=m.nbp_hidden,
        pos_freqs=m.ssformer_pos_freqs,
        scale_fusion=m.scale_fusion,
    )


@register_model("dynunet", diffusion=False)
def _build_dynunet(cfg) -> nn.Module:
    return DynUNetBaseline(
        cfg.data.in_channels, model_size(cfg), cfg.model.dynunet_filters, res_block=cfg.model.dynunet_res_block
    )


def build_model(cfg) -> nn.Module:
    """The network named by ``cfg.model.name`` for ``cfg.data`` geometry and ``cfg.diffusion.learn_sigma``.

    The model is on the CPU in float32, not compiled; ``cfg.model.channels_last`` and
    ``cfg.model.compile`` are applied by the caller (trainer / sampler).

    Raises:
        ConfigError: unknown name (lists the known ones) or an impossible geometry.
    """
    name = cfg.model.name
    try:
        builder = MODELS[name]
    except KeyError:
        raise ConfigError(
            f"config key 'model.name': got {name!r}; known models: {', '.join(sorted(MODELS))}"
        ) from None
    model = builder(cfg)
    model.self_condition = bool(cfg.diffusion.self_condition) and model.is_diffusion
    return model
