"""Fixtures for the inference tests: a tiny conditional denoiser and a respaced diffusion."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn


class TinyDenoiser(nn.Module):
    """A small MedSegDiff-contract network: ``encode_image`` + ``forward(x_t, t, image|image_features)``.

    Non-linear in the image, the noisy mask and t, so cached-vs-uncached and batching differences
    would show. Counts ``encode_image`` calls to check the encoding is reused.
    """

    is_diffusion = True
    self_condition = False

    def __init__(self, in_ch: int = 2, width: int = 8, out_ch: int = 1) -> None:
        super().__init__()
        self.enc1 = nn.Conv2d(in_ch, width, 3, padding=1)
        self.enc2 = nn.Conv2d(width, width, 3, padding=1, stride=2)
        self.inp = nn.Conv2d(1, width, 3, padding=1)
        self.temb = nn.Linear(16, width)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.up = nn.ConvTranspose2d(width, width, 2, stride=2)
        self.out = nn.Conv2d(2 * width, out_ch, 3, padding=1)
        self.encode_calls = 0

    def encode_image(self, image: torch.Tensor) -> list[torch.Tensor]:
        self.encode_calls += 1
        f1 = torch.tanh(self.enc1(image))
        f2 = torch.tanh(self.enc2(f1))
        return [f1, f2]

    def _temb(self, t: torch.Tensor) -> torch.Tensor:
        half = 8
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=1)

    def forward(self, x, timesteps, image=None, image_features=None, return_anchor=False):
        if (image is None) == (image_features is None):
            raise ValueError("exactly one of image / image_features")
        feats = self.encode_image(image) if image is not None else image_features
        h = torch.tanh(self.inp(x) + feats[0] + self.temb(self._temb(timesteps))[:, :, None, None])
        h2 = torch.tanh(self.mid(nn.functional.avg_pool2d(h, 2) + feats[1]))
        return self.out(torch.cat([h, self.up(h2)], dim=1))


class TinyDiscriminative(nn.Module):
    is_diffusion = False

    def __init__(self, in_ch: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, 1, 3, padding=1)

    def forward(self, image):
        return self.conv(image)


def make_diffusion(respacing: str = "ddim10", steps: int = 100, learn_sigma: bool = False):
    from improved_diffusion.gaussian_diffusion import (
        LossType,
        ModelMeanType,
        ModelVarType,
        get_named_beta_schedule,
    )
    from improved_diffusion.respace import SpacedDiffusion, space_timesteps

    return SpacedDiffusion(
        space_timesteps(steps, respacing),
        betas=get_named_beta_schedule("linear", steps),
        model_mean_type=ModelMeanType.EPSILON,
        model_var_type=ModelVarType.LEARNED_RANGE if learn_sigma else ModelVarType.FIXED_LARGE,
        loss_type=LossType.MSE,
    )


@pytest.fixture
def tiny_model() -> TinyDenoiser:
    torch.manual_seed(0)
    return TinyDenoiser()


@pytest.fixture
def tiny_diffusion():
    return make_diffusion()


@pytest.fixture
def parts():
    """The helper classes and factory, for tests that build their own (importlib mode: no imports)."""
    from types import SimpleNamespace

    return SimpleNamespace(TinyDenoiser=TinyDenoiser, TinyDiscriminative=TinyDiscriminative,
                           make_diffusion=make_diffusion)
