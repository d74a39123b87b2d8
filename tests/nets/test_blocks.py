"""Building blocks: FF-Parser, repeat_features, size checks, attention, ResBlock."""

from __future__ import annotations

import pytest
import torch

from medsegdiff.errors import ConfigError
from medsegdiff.nets.blocks import (
    AttentionBlock,
    Downsample,
    FFParser,
    ResBlock,
    Upsample,
    check_spatial_size,
    repeat_features,
)


@pytest.mark.parametrize("size", [(8, 6), (4, 6, 5)])
def test_ffparser_identity_at_init_and_dc_filter(size):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size)
    ff = FFParser(3, size)
    torch.testing.assert_close(ff(x), x, atol=1e-5, rtol=0)
    # keep only the zero frequency: the output is the spatial mean of each channel (first principles)
    with torch.no_grad():
        ff.weight_real.zero_()
        ff.weight_real[(slice(None),) + (0,) * len(size)] = 1.0
    mean = x.mean(dim=tuple(range(2, x.ndim)), keepdim=True).expand_as(x)
    torch.testing.assert_close(ff(x), mean, atol=1e-5, rtol=0)


def test_ffparser_imaginary_weight_is_quarter_shift():
    # multiplying every frequency by i (weight 0 + 1i) of a real signal: for a pure cosine
    # cos(2 pi k n / N) the result is -sin(2 pi k n / N) (Hilbert-type quarter-period shift).
    n = 8
    t = torch.arange(n, dtype=torch.float32)
    x = torch.cos(2 * torch.pi * 2 * t / n).expand(1, 1, 1, n).clone()
    ff = FFParser(1, (1, n))
    with torch.no_grad():
        ff.weight_real.zero_()
        ff.weight_imag.fill_(1.0)
    expected = -torch.sin(2 * torch.pi * 2 * t / n).expand(1, 1, 1, n)
    torch.testing.assert_close(ff(x), expected, atol=1e-5, rtol=0)


def test_ffparser_runs_in_fp32_under_bf16_autocast_and_keeps_dtype():
    ff = FFParser(2, (4, 4))
    x = torch.randn(1, 2, 4, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ff(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x.float(), atol=1e-2, rtol=0)


def test_ffparser_wrong_size_message():
    ff = FFParser(2, (8, 8))
    with pytest.raises(ValueError, match=r"spatial size \(4, 4\) but the parser was built for \(8, 8\)"):
        ff(torch.zeros(1, 2, 4, 4))


def test_repeat_features_interleaves_members():
    a = torch.arange(2).reshape(2, 1)
    b = torch.arange(4).reshape(2, 2)
    ra, rb = repeat_features([a, b], 3)
    assert ra.flatten().tolist() == [0, 0, 0, 1, 1, 1]
    assert rb.tolist() == [[0, 1]] * 3 + [[2, 3]] * 3
    assert repeat_features([a], 1)[0] is a
    with pytest.raises(ValueError, match="n must be >= 1"):
        repeat_features([a], 0)


def test_check_spatial_size_message():
    check_spatial_size((96, 96), 4)
    with pytest.raises(
        ConfigError,
        match=r"model: image size 100 .* is not a multiple of 2\^3 = 8 required by channel_mult \[1, 2, 4, 8\]; use 96 or 104",
    ):
        check_spatial_size((100, 100), 4, "model", [1, 2, 4, 8])


@pytest.mark.parametrize("dims", [2, 3])
def test_resblock_down_up_attention_shapes(dims):
    s = (4,) * dims
    x = torch.randn(2, 6, *s)
    emb = torch.randn(2, 10)
    rb = ResBlock(6, 10, out_channels=12, dims=dims, norm_groups=32)  # 12 channels -> 12 groups
    assert rb(x, emb).shape == (2, 12, *s)
    assert rb.out_norm.num_groups == 12
    assert ResBlock(6, None, dims=dims)(x).shape == x.shape
    assert Downsample(6, dims)(x).shape == (2, 6, *(2,) * dims)
    assert Upsample(6, dims, 3)(x).shape == (2, 3, *(8,) * dims)
    att = AttentionBlock(6, num_heads=2, norm_groups=4)
    torch.testing.assert_close(att(x), x)  # zero-initialised projection: identity at init


def test_attention_matches_manual_softmax():
    torch.manual_seed(0)
    att = AttentionBlock(4, num_heads=1, norm_groups=2)
    with torch.no_grad():
        att.proj.weight.copy_(torch.eye(4)[:, :, None])
    x = torch.randn(1, 4, 3, 3)
    h = att.norm(x).reshape(1, 4, 9)
    q, k, v = att.qkv(h).reshape(3, 4, 9)
    w = torch.softmax(q.T @ k / 2.0, dim=-1)  # (N, N), scale 1/sqrt(4)
    expected = x + (v @ w.T + att.proj.bias[:, None]).reshape(1, 4, 3, 3)
    torch.testing.assert_close(att(x), expected, atol=1e-5, rtol=1e-5)


def test_attention_head_error():
    with pytest.raises(ConfigError, match="num_head_channels: 5 does not divide the attention width 12"):
        AttentionBlock(12, num_head_channels=5)
