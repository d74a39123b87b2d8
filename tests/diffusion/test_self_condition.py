"""concat_self_cond builds the self-conditioned network input (Chen et al. 2022)."""

from __future__ import annotations

import pytest
import torch

from medsegdiff.diffusion.self_condition import concat_self_cond


def test_concat_with_and_without_estimate():
    x = torch.randn(2, 1, 4, 4)
    prev = torch.rand(2, 1, 4, 4, dtype=torch.float64) * 2 - 1
    out = concat_self_cond(x, prev)
    assert out.shape == (2, 2, 4, 4) and out.dtype == x.dtype
    assert torch.equal(out[:, :1], x) and torch.allclose(out[:, 1:], prev.float())
    zeros = concat_self_cond(x, None)
    assert torch.equal(zeros[:, :1], x) and torch.all(zeros[:, 1:] == 0)
    with pytest.raises(ValueError, match=r"estimate \(2, 1, 2, 2\) must have the shape of x_t \(2, 1, 4, 4\)"):
        concat_self_cond(x, torch.zeros(2, 1, 2, 2))


@pytest.mark.parametrize("name", ["medsegdiff_v1", "medsegdiff_v2"])
def test_registry_builds_two_mask_channels_and_the_flag(name):
    from medsegdiff.config.loader import config_from_dict
    from medsegdiff.nets.registry import build_model

    base = {
        "model": {"name": name, "base_channels": 8, "channel_mult": [1, 2], "norm_groups": 4,
                  "attention_resolutions": [2], "num_heads": 2},
        "data": {"image_size": 8, "modalities": ["cbf", "tmax"]},
    }
    assert build_model(config_from_dict(base)).self_condition is False
    torch.manual_seed(0)
    model = build_model(config_from_dict({**base, "diffusion": {"self_condition": True}})).eval()
    assert model.self_condition is True
    x, img, t = torch.randn(2, 1, 8, 8), torch.randn(2, 2, 8, 8), torch.tensor([3, 600])
    for p in model.parameters():  # zero-initialised output layers would hide the dependence
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        a = model(concat_self_cond(x, None), t, image=img)
        b = model(concat_self_cond(x, torch.ones_like(x)), t, image=img)
    assert a.shape == (2, 1, 8, 8) and (a - b).abs().max() > 1e-4  # the estimate channel is used
