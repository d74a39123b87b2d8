"""Fixtures for the network tests: tiny configs and models with non-trivial (non-zero) outputs."""

from __future__ import annotations

import pytest
import torch

from medsegdiff.config import ExperimentConfig, load_config

TINY = [
    "model.base_channels=8",
    "model.condition_channels=8",
    "model.channel_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.attention_resolutions=[2]",
    "model.num_heads=2",
    "model.norm_groups=4",
    "model.dynunet_filters=[8,16,32]",
]


def tiny_config(name: str = "medsegdiff_v1", *overrides: str, size: int = 16) -> ExperimentConfig:
    """A tiny config for model ``name`` (5 input modalities by default)."""
    return load_config(None, [*TINY, f"model.name={name}", f"data.image_size={size}", *overrides])


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter so that zero-initialised layers give non-zero outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


class Helpers:
    tiny_config = staticmethod(tiny_config)
    perturb = staticmethod(perturb)


@pytest.fixture
def h() -> type[Helpers]:
    """Helper functions (``h.tiny_config``, ``h.perturb``)."""
    return Helpers
