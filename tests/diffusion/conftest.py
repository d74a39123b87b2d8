"""Stub models implementing the model contract (ARCHITECTURE.md) for the objective tests."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from medsegdiff.config.schema import ExperimentConfig


class StubDiffusionModel(nn.Module):
    """Tiny conditional model: a 1x1 conv on [x_t, image]; optional anchor head on the image."""

    is_diffusion = True
    self_condition = False

    def __init__(
        self, in_ch: int = 2, out_ch: int = 1, anchor: bool = False, dims: int = 2, self_condition: bool = False
    ) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.self_condition = self_condition
        self.net = conv((2 if self_condition else 1) + in_ch, out_ch, 1)
        self.anchor_head = conv(in_ch, 1, 1) if anchor else None
        self.seen_t: list[torch.Tensor] = []
        self.seen_x: list[torch.Tensor] = []  # the network inputs (with the self-conditioning channel)

    def encode_image(self, image):
        return [image]

    def anchor_logits(self, feats):
        return self.anchor_head(feats[0]) if self.anchor_head is not None else None

    def forward(self, x_t, timesteps, image=None, image_features=None, return_anchor=False):
        feats = self.encode_image(image) if image is not None else list(image_features)
        self.seen_t.append(timesteps.detach().clone())
        self.seen_x.append(x_t)
        out = self.net(torch.cat([x_t, feats[0]], 1))
        if return_anchor:
            return out, self.anchor_logits(feats)
        return out


class OracleModel(nn.Module):
    """Reads the true mask from image channel 0 and returns the exact eps (or x0, or v) for it.

    ``sign=-1`` predicts the opposite mask. A learned-sigma model gets a zero variance channel.
    """

    is_diffusion = True
    self_condition = False

    def __init__(self, alphas_cumprod: np.ndarray, kind: str = "eps", sign: float = 1.0, learn_sigma=False):
        super().__init__()
        self.abar = torch.tensor(alphas_cumprod, dtype=torch.float64)
        self.kind, self.sign, self.learn_sigma = kind, sign, learn_sigma
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, timesteps, image=None, image_features=None, return_anchor=False):
        x0 = self.sign * (2 * image[:, :1] - 1)
        if self.kind == "x0":
            out = x0
        else:
            ab = self.abar[timesteps.long()].reshape(-1, *([1] * (x_t.ndim - 1)))
            eps = (x_t.double() - ab.sqrt() * x0.double()) / (1 - ab).sqrt()
            out = (ab.sqrt() * eps - (1 - ab).sqrt() * x0.double() if self.kind == "v" else eps).float()
        out = out + 0 * self.dummy
        if self.learn_sigma:
            out = torch.cat([out, torch.zeros_like(out)], 1)
        return (out, None) if return_anchor else out


class StubBaseline(nn.Module):
    is_diffusion = False

    def __init__(self, in_ch: int = 2) -> None:
        super().__init__()
        self.net = nn.Conv2d(in_ch, 1, 1)

    def forward(self, image):
        return self.net(image)


def make_cfg(**sections) -> ExperimentConfig:
    """Default experiment config with some section fields replaced: make_cfg(loss={"strategy": ...})."""
    cfg = ExperimentConfig()
    changes = {}
    for name, fields in sections.items():
        changes[name] = dataclasses.replace(getattr(cfg, name), **fields)
    cfg = dataclasses.replace(cfg, **changes)
    return cfg


def make_batch(b: int = 2, size: int = 8, in_ch: int = 2, dims: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    spatial = (size,) * dims
    mask = torch.zeros(b, 1, *spatial)
    mask[..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
    image = torch.cat([mask, torch.randn(b, in_ch - 1, *spatial, generator=g)], 1)
    return {"image": image, "mask": mask, "case_id": ["a"] * b, "slice": list(range(b))}


@pytest.fixture
def stubs():
    return {"diffusion": StubDiffusionModel, "oracle": OracleModel, "baseline": StubBaseline,
            "cfg": make_cfg, "batch": make_batch}
