"""DynUNet baseline: strides, shapes, gradients, errors."""

from __future__ import annotations

import pytest
import torch

from medsegdiff.errors import ConfigError
from medsegdiff.nets.baseline import DynUNetBaseline, dynunet_strides
from medsegdiff.nets.registry import build_model


def test_strides_follow_nnunet_rule():
    assert dynunet_strides((16, 64, 64), 4) == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    assert dynunet_strides((24, 24), 4) == [[1, 1], [2, 2], [2, 2], [1, 1]]  # 24 -> 12 -> 6, 6 -> 3 < 4
    assert dynunet_strides((7, 16), 3) == [[1, 1], [1, 2], [1, 2]]


@pytest.mark.parametrize("size,channels", [((16, 16), 1), ((24, 32), 5), ((8, 16, 16), 2)])
def test_shapes_and_gradients(size, channels):
    m = DynUNetBaseline(channels, size, [8, 16, 32])
    assert m.is_diffusion is False
    x = torch.randn(2, channels, *size)
    out = m(x)
    assert out.shape == (2, 1, *size)
    out.mean().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_registry_and_errors(h):
    m = build_model(h.tiny_config("dynunet"))
    assert isinstance(m, DynUNetBaseline) and m.in_channels == 5
    with pytest.raises(ConfigError, match=r"image has shape \(1, 3, 16, 16\); expected \(B, 5, H, W\)"):
        m(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ConfigError, match=r"not divisible by the DynUNet strides \(4, 4\)"):
        m(torch.zeros(1, 5, 18, 18))
