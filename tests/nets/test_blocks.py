"""MedSegDiff building blocks: FF-Parser (any size), repeat_features, size checks.

The generic blocks (ResBlock, attention, resampling) are the core's: tests/improved_diffusion/test_unet.py.
"""

from __future__ import annotations

import pytest
import torch

from medsegdiff.errors import ConfigError
from medsegdiff.nets.blocks import FFParser, check_spatial_size, repeat_features


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


def test_ffparser_other_size_samples_the_map_in_normalised_frequency():
    # identity stays identity at every size, 2-D and 3-D
    for ref, size in [((8, 8), (16, 12)), ((8, 8), (4, 6)), ((4, 6, 6), (8, 12, 10))]:
        x = torch.randn(2, 3, *size)
        torch.testing.assert_close(FFParser(3, ref)(x), x, atol=1e-5, rtol=0)
    # a low-pass map (keep |f| <= 1/8 in both axes) learned at 16 x 16 keeps |f| <= 1/8 at 32 x 32:
    # a cosine of frequency 1/16 passes, one of frequency 1/4 is removed (first principles)
    ff = FFParser(1, (16, 16))
    with torch.no_grad():
        fy = torch.fft.fftfreq(16).abs()[:, None]
        fx = torch.fft.rfftfreq(16)[None, :]
        ff.weight_real.copy_(((fy <= 0.125) & (fx <= 0.125)).float()[None])
    n = torch.arange(32, dtype=torch.float32)
    low = torch.cos(2 * torch.pi * n / 16).expand(1, 1, 32, 32)
    high = torch.cos(2 * torch.pi * n / 4).expand(1, 1, 32, 32)
    torch.testing.assert_close(ff(low), low, atol=1e-5, rtol=0)
    torch.testing.assert_close(ff(high), torch.zeros_like(high), atol=1e-5, rtol=0)
    # the resampled map is differentiable in the stored weights (training at any size)
    ff(torch.randn(1, 1, 24, 24)).square().sum().backward()
    assert ff.weight_real.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="3-D input but the parser is 2-D"):
        ff(torch.zeros(1, 1, 4, 4, 4))


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


def test_check_spatial_size_depth_rule():
    check_spatial_size((5, 16, 16), 3, resample_depth=False)  # in-plane only: any depth
    with pytest.raises(ConfigError, match=r"image size 5 .* not a multiple of 2\^2 = 4"):
        check_spatial_size((5, 16, 16), 3, resample_depth=True)
