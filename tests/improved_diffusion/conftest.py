"""Fixtures for the improved_diffusion tests: tiny closed-form "models"."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch


def cosine_alpha_bar(s: float) -> float:
    """iDDPM Eq. 17 numerator f(t) = cos^2(((t + 0.008) / 1.008) * pi / 2)."""
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def linear_alpha_bar(T: int) -> np.ndarray:
    """alpha_bar of the scaled linear schedule, computed independently of the library."""
    scale = 1000.0 / T
    betas = np.linspace(scale * 1e-4, scale * 0.02, T)
    return np.cumprod(1.0 - betas)


class OracleEps:
    """Knows x0: returns the exact noise (``kind="eps"``), x0 or v for (x_t, original-scale t)."""

    def __init__(self, x0: torch.Tensor, alpha_bar: np.ndarray, kind: str = "eps") -> None:
        self.x0 = x0
        self.abar = torch.tensor(alpha_bar, dtype=torch.float64)
        self.kind = kind
        self.seen: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        self.seen.append(t.clone())
        if self.kind == "x0":
            return self.x0.clone()
        ab = self.abar[t.long()].reshape(-1, *([1] * (x.ndim - 1)))
        eps = (x.double() - ab.sqrt() * self.x0.double()) / (1 - ab).sqrt()
        if self.kind == "v":  # v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022, App. D)
            return (ab.sqrt() * eps - (1 - ab).sqrt() * self.x0.double()).float()
        return eps.float()


@pytest.fixture
def oracle_cls():
    return OracleEps


@pytest.fixture
def smooth_model():
    """A deterministic, smooth epsilon model that does not know the data."""

    def model(x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        scale = (t.float() / 1000.0).reshape(-1, *([1] * (x.ndim - 1)))
        return 0.3 * torch.tanh(x) * (1 + scale)

    return model
