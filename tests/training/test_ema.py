"""EMA of weights: aliased (shared) parameters keep every state_dict key (DynUNet skip_layers)."""

from __future__ import annotations

import torch
from torch import nn

from medsegdiff.training.ema import EMA


class _Shared(nn.Module):
    """One Linear registered under two names, like DynUNet's ``downsamples`` / ``skip_layers``."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(3, 2)
        self.skip = self.enc
        self.norm = nn.BatchNorm1d(2)


def test_state_dict_has_every_key_of_the_model_including_aliases() -> None:
    m = _Shared()
    ema = EMA(m, rate=0.5)
    assert set(ema.state_dict()) == set(m.state_dict())  # skip.weight / skip.bias included
    with torch.no_grad():
        m.enc.weight.fill_(2.0)
    start = ema.state_dict()["enc.weight"].clone()
    ema.update(m)
    sd = ema.state_dict()
    expected = 0.5 * start + 0.5 * 2.0
    assert torch.allclose(sd["enc.weight"], expected) and torch.allclose(sd["skip.weight"], expected)
    fresh = _Shared()
    fresh.load_state_dict(sd, strict=True)  # the bug: missing skip.* keys made this fail
    assert torch.allclose(fresh.skip.weight, expected)


def test_load_state_dict_round_trip() -> None:
    m = _Shared()
    ema = EMA(m, rate=0.9)
    other = EMA(_Shared(), rate=0.9)
    other.load_state_dict(ema.state_dict())
    for a, b in zip(ema.shadow, other.shadow):
        assert torch.equal(a, b)


def test_dynunet_ema_weights_load_strictly() -> None:
    from medsegdiff.config import load_config
    from medsegdiff.nets.registry import build_model

    cfg = load_config(None, ["model.name=dynunet", "model.preset=tiny", "model.dynunet_filters=[8,16,32]",
                             "data.image_size=16"])
    model = build_model(cfg)
    ema = EMA(model, rate=0.99)
    assert any(".skip_layers." in k for k in ema.state_dict())
    build_model(cfg).load_state_dict(ema.state_dict(), strict=True)
