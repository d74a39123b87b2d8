"""V2 parts: uncertain spatial attention, neural band-pass filter, SS-Former, anchor options."""

from __future__ import annotations

import math

import pytest
import torch

from medsegdiff.nets.medsegdiff_v2 import NBPFilter, SSFormerBlock, UncertainSpatialAttention, _band_partition
from medsegdiff.nets.registry import build_model


def test_usa_gaussian_and_max():
    usa = UncertainSpatialAttention(2, kernel=5, learnable=True)
    g = usa.gaussian()
    sigma = 1.0  # (5 - 1) / 4
    ref = torch.tensor([math.exp(-(x**2) / (2 * sigma**2)) for x in range(-2, 3)])
    torch.testing.assert_close(g, ref / ref.sum())
    # a single lesion pixel: blurred values spread to neighbours, the pixel itself keeps its value
    p = torch.zeros(1, 1, 7, 7)
    p[0, 0, 3, 3] = 1.0
    u = usa(p)
    assert u[0, 0, 3, 3] == 1.0
    torch.testing.assert_close(u[0, 0, 3, 4], g[2] * g[3])
    torch.testing.assert_close(u[0, 0, 1, 1], g[0] * g[0])
    assert (u >= p).all()
    # a constant map is unchanged away from the (zero-padded) border
    c = torch.full((1, 1, 9, 9), 0.3)
    torch.testing.assert_close(usa(c)[..., 2:-2, 2:-2], c[..., 2:-2, 2:-2])


def test_usa_3d_and_fixed():
    usa = UncertainSpatialAttention(3, kernel=3, learnable=False)
    assert not any(True for _ in usa.parameters())
    p = torch.rand(2, 1, 4, 5, 6)
    u = usa(p)
    assert u.shape == p.shape and (u >= p).all()
    assert torch.equal(UncertainSpatialAttention(2, kernel=1)(p[:, :, 0]), p[:, :, 0])
    with pytest.raises(ValueError, match="odd"):
        UncertainSpatialAttention(2, kernel=4)


@pytest.mark.parametrize("size", [(6, 8), (4, 6, 5)])
def test_nbp_bands_partition_of_unity_and_identity(size):
    parts = _band_partition(size, 4, torch.device("cpu"))
    torch.testing.assert_close(parts.sum(0), torch.ones(parts.shape[1:]))
    assert parts[0].flatten()[0] == 1.0  # the DC term is all in the lowest band
    x = torch.randn(2, 3, *size)
    nbp = NBPFilter(3, 4)
    torch.testing.assert_close(nbp(x), x, atol=1e-5, rtol=0)
    with torch.no_grad():
        nbp.gain.fill_(0.5)
    torch.testing.assert_close(nbp(x), 0.5 * x, atol=1e-5, rtol=0)
    with torch.no_grad():  # lowest band only of the DC: zero gain everywhere but band 0 of channel 0
        nbp.gain.zero_()
        nbp.gain[0, 0] = 1.0
    y = nbp(x)
    assert y[:, 1:].abs().max() < 1e-6
    # the mean (DC) of channel 0 is preserved exactly, higher frequencies are attenuated
    torch.testing.assert_close(y[:, 0].mean(dim=tuple(range(1, y.ndim - 1))), x[:, 0].mean(dim=tuple(range(1, y.ndim - 1))))
    assert y[:, 0].var() < x[:, 0].var()


def test_ssformer_block_shapes_and_gradients():
    blk = SSFormerBlock(8, heads=2, bands=3)
    h, c = torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(2, 8, 4, 4, requires_grad=True)
    h2, c2 = blk(h, c)
    assert h2.shape == h.shape and c2.shape == c.shape
    h2.sum().backward()
    assert all(p.grad is not None for p in blk.parameters())
    assert c.grad is not None and c.grad.abs().sum() > 0  # the image features reach the mask path


def test_v2_ablations_and_anchor_detach(h):
    no_anchor = build_model(h.tiny_config("medsegdiff_v2", "model.anchor=false", "model.ssformer_depth=0"))
    x, img, t = torch.randn(1, 1, 16, 16), torch.randn(1, 5, 16, 16), torch.tensor([4])
    out, anchor = no_anchor(x, t, image=img, return_anchor=True)
    assert anchor is None and out.shape == (1, 1, 16, 16)
    out.sum().backward()
    assert all(p.grad is not None for p in no_anchor.parameters())
    assert len(no_anchor.encode_image(img)) == 3  # levels + bottleneck, no anchor
    det = h.perturb(build_model(h.tiny_config("medsegdiff_v2", "model.anchor_detach=true")))
    det(x, t, image=img).square().sum().backward()
    assert all(p.grad is None for p in det.anchor_head.parameters())  # diffusion loss does not reach it
    assert det.usa.log_sigma.grad is not None
