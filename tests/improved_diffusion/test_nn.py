from __future__ import annotations

import math

import pytest
import torch

from improved_diffusion import nn as idnn


def test_timestep_embedding_matches_formula_and_order():
    t = torch.tensor([0.0, 3.0, 250.0])
    dim = 6
    emb = idnn.timestep_embedding(t, dim, max_period=10000)
    assert emb.shape == (3, 6)
    half = 3
    for i, tv in enumerate(t.tolist()):
        for k in range(half):
            f = 10000 ** (-k / half)
            assert emb[i, k].item() == pytest.approx(math.cos(tv * f), abs=1e-5)
            assert emb[i, half + k].item() == pytest.approx(math.sin(tv * f), abs=1e-5)


def test_timestep_embedding_odd_dim_zero_padded():
    emb = idnn.timestep_embedding(torch.tensor([1.0, 7.0]), 7)
    assert emb.shape == (2, 7)
    assert torch.all(emb[:, -1] == 0)


def test_normalization_picks_largest_divisor():
    assert idnn.normalization(64).num_groups == 32
    assert idnn.normalization(48).num_groups == 24
    assert idnn.normalization(12, groups=8).num_groups == 6
    assert idnn.normalization(7).num_groups == 7
    with pytest.raises(ValueError, match="must be positive"):
        idnn.normalization(0)


def test_groupnorm32_computes_in_fp32_and_keeps_dtype():
    gn = idnn.normalization(8, groups=4)
    x = torch.randn(2, 8, 4, 4).to(torch.bfloat16)
    y = gn(x)
    assert y.dtype == torch.bfloat16
    ref = torch.nn.functional.group_norm(x.float(), 4, gn.weight, gn.bias)
    torch.testing.assert_close(y.float(), ref.to(torch.bfloat16).float())


def test_update_ema_lerps_in_place():
    tgt = [torch.zeros(3), torch.ones(2, 2)]
    src = [torch.full((3,), 10.0), torch.full((2, 2), 3.0)]
    ids = [id(t) for t in tgt]
    idnn.update_ema(tgt, src, rate=0.9)
    assert [id(t) for t in tgt] == ids
    torch.testing.assert_close(tgt[0], torch.full((3,), 1.0))
    torch.testing.assert_close(tgt[1], torch.full((2, 2), 0.9 + 0.3))
    with pytest.raises(ValueError, match="2 target tensors but 1 source"):
        idnn.update_ema(tgt, src[:1])


def test_update_ema_on_parameters():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    expected = [0.5 * p.detach() + 0.5 * q.detach() for p, q in zip(a.parameters(), b.parameters())]
    idnn.update_ema(a.parameters(), b.parameters(), rate=0.5)
    for p, e in zip(a.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)


def test_conv_pool_zero_scale_mean_flat():
    assert isinstance(idnn.conv_nd(3, 1, 2, 3), torch.nn.Conv3d)
    assert isinstance(idnn.avg_pool_nd(2, 2), torch.nn.AvgPool2d)
    with pytest.raises(ValueError, match="unsupported dimensions: 4"):
        idnn.conv_nd(4, 1, 1, 1)
    m = idnn.zero_module(torch.nn.Linear(3, 3))
    assert all(torch.all(p == 0) for p in m.parameters())
    m = torch.nn.Linear(2, 1)
    w = m.weight.detach().clone()
    idnn.scale_module(m, 0.5)
    torch.testing.assert_close(m.weight.detach(), 0.5 * w)
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    torch.testing.assert_close(idnn.mean_flat(x), torch.tensor([5.5, 17.5]))


def test_checkpoint_same_values_and_grads():
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)

    def f(inp):
        return torch.tanh(lin(inp)).sum()

    y1 = idnn.checkpoint(f, (x,), lin.parameters(), True)
    g1 = torch.autograd.grad(y1, [x, lin.weight])
    y2 = idnn.checkpoint(f, (x,), lin.parameters(), False)
    g2 = torch.autograd.grad(y2, [x, lin.weight])
    torch.testing.assert_close(y1, y2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
