"""V2 as published: U-SA, NBP-Filter, Fourier-space affinity, SS-Former, information flow, ablations."""

from __future__ import annotations

import math

import pytest
import torch

from medsegdiff.nets.medsegdiff_v2 import (
    NBPFilter,
    PositionalEncoding,
    SpectralCrossAttention,
    SSFormerBlock,
    UncertainSpatialAttention,
)
from medsegdiff.nets.registry import build_model


def test_usa_gaussian_max_and_gate():
    usa = UncertainSpatialAttention(2, 3, dims=2, sigma=1.0, truncate=3.0)
    g = usa.gaussian()
    ref = torch.tensor([math.exp(-(x**2) / 2) for x in range(-3, 4)])  # radius ceil(3 * 1) = 3
    torch.testing.assert_close(g, ref / ref.sum())
    # one bright pixel per channel: blurred values spread to neighbours, the pixel keeps its value
    f = torch.zeros(1, 2, 9, 9)
    f[0, :, 4, 4] = 1.0
    f_anc = usa.smooth(f)
    assert torch.all(f_anc[0, :, 4, 4] == 1.0) and (f_anc >= f).all()
    torch.testing.assert_close(f_anc[0, 1, 4, 5], g[4] * g[3])
    torch.testing.assert_close(f_anc[0, 0, 2, 2], g[1] * g[1])
    c = torch.full((1, 2, 9, 9), 0.3)  # replicate padding: a constant map is unchanged everywhere
    torch.testing.assert_close(usa.smooth(c), c)
    # the gate: Sigmoid(conv1x1(f_anc)) . h + h
    h = torch.randn(1, 3, 9, 9)
    gate = torch.sigmoid(torch.einsum("oc,bchw->bohw", usa.gate.weight[:, :, 0, 0], f_anc) + usa.gate.bias[:, None, None])
    torch.testing.assert_close(usa(f, h), gate * h + h)
    usa3 = UncertainSpatialAttention(2, 2, dims=3, sigma=0.7, learnable=False)
    assert [n for n, _ in usa3.named_parameters()] == ["gate.weight", "gate.bias"]
    p = torch.rand(2, 2, 4, 5, 6)
    assert usa3.smooth(p).shape == p.shape and (usa3.smooth(p) >= p).all()
    with pytest.raises(ValueError, match="must be positive"):
        UncertainSpatialAttention(2, 2, dims=2, sigma=0.0)


def test_usa_sigma_gets_a_gradient_and_the_support_grows_with_sigma(h):
    usa = UncertainSpatialAttention(1, 1, dims=2, sigma=0.5, truncate=3.0)
    radii = []
    for sigma in (0.5, 1.0, 2.5, 6.0):
        with torch.no_grad():
            usa.log_sigma.fill_(math.log(sigma))
        radii.append(usa.radius())
        assert usa.gaussian().numel() == 2 * math.ceil(3 * sigma) + 1
    assert radii == [2, 3, 8, 18]
    # the support is capped by the feature size (no kernel wider than the map)
    assert usa.radius(limit=7) == 7
    # sigma learns from the diffusion output through the whole model
    model = h.perturb(build_model(h.tiny_config("medsegdiff_v2")))
    x, img = torch.randn(2, 1, 16, 16), torch.randn(2, 5, 16, 16)
    model(x, torch.tensor([3, 400]), image=img).square().mean().backward()
    assert model.usa.log_sigma.grad is not None and model.usa.log_sigma.grad.abs() > 0


def test_nbp_depends_on_t_and_on_the_frequency_pair(h):
    model = build_model(h.tiny_config("medsegdiff_v2"))
    emb = model.unet._embed(torch.tensor([10, 900]), None)  # the diffusion UNet's time embedding
    nbp = model.ssformer[0].attn_h.nbp
    w = nbp((4, 4), emb)
    assert w.shape == (2, 2, 16, 16)  # (batch, heads, query frequencies, key frequencies)
    assert (w[0] - w[1]).abs().max() > 1e-3  # t = 10 and t = 900 get different filters
    assert (w[0, :, 0, 0] - w[0, :, 5, 3]).abs().max() > 1e-4  # and frequency pairs differ
    assert NBPFilter(3, 1, 8, 4)((2, 3, 2), torch.zeros(1, 8)).shape == (1, 1, 12, 12)  # 3-D, any size


def test_fourier_affinity_identity_filter_and_dc_filter_from_first_principles():
    torch.manual_seed(0)
    b, heads, size, d = 2, 2, (4, 6), 3
    n = size[0] * size[1]
    q, k = torch.randn(b, heads, n, d), torch.randn(b, heads, n, d)
    spatial = q @ k.transpose(-1, -2) / math.sqrt(d)
    torch.testing.assert_close(SpectralCrossAttention.affinity(q, k, size, None), spatial, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        SpectralCrossAttention.affinity(q, k, size, torch.ones(b, heads, n, n)), spatial, atol=1e-5, rtol=1e-5
    )
    # keep only the (DC, DC) pair: A[n, m] = mean_n(q) . mean_m(k) / sqrt(d) for every n, m
    w = torch.zeros(b, heads, n, n)
    w[..., 0, 0] = 1.0
    dc = (q.mean(2) * k.mean(2)).sum(-1) / math.sqrt(d)
    torch.testing.assert_close(SpectralCrossAttention.affinity(q, k, size, w), dc[..., None, None].expand(b, heads, n, n),
                               atol=1e-5, rtol=1e-5)
    # 3-D grid
    q3, k3 = torch.randn(1, 1, 8, 2), torch.randn(1, 1, 8, 2)
    torch.testing.assert_close(SpectralCrossAttention.affinity(q3, k3, (2, 2, 2), None),
                               q3 @ k3.transpose(-1, -2) / math.sqrt(2), atol=1e-5, rtol=1e-5)


def test_positional_encoding_is_defined_for_any_size_and_distinguishes_positions():
    pe = PositionalEncoding(8, 2, freqs=3)
    p = pe((4, 5), torch.device("cpu"))
    assert p.shape == (20, 8)
    assert torch.cdist(p, p).add(torch.eye(20)).min() > 1e-4  # no two positions share an encoding
    assert pe((3, 3), torch.device("cpu")).shape == (9, 8)  # another size, same weights


def test_ssformer_block_starts_as_identity_and_lets_the_condition_in(h):
    torch.manual_seed(0)
    blk = SSFormerBlock(8, heads=2, dims=2, emb_channels=12, nbp_hidden=4, pos_freqs=2)
    hm, c, emb = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(2, 12)
    h2, c2 = blk(hm, c, emb)
    torch.testing.assert_close(h2, hm)  # zero-initialised residual projections
    torch.testing.assert_close(c2, c)
    h.perturb(blk)
    h2, _ = blk(hm, c, emb)
    h2.sum().backward()
    assert all(p.grad is not None for p in blk.parameters())
    assert c.grad.abs().sum() > 0  # the image features reach the mask path


def _trained_like(h, *overrides):
    torch.manual_seed(1)
    return h.perturb(build_model(h.tiny_config("medsegdiff_v2", *overrides)), scale=0.1).eval()


def test_output_changes_when_the_bottleneck_image_tokens_are_shuffled(h):
    model = _trained_like(h)
    levels = model.spec.levels
    x, img, t = torch.randn(2, 1, 16, 16), torch.randn(2, 5, 16, 16), torch.tensor([20, 600])
    with torch.no_grad():
        feats = model.encode_image(img)
        out = model(x, t, image_features=feats)
        bott = feats[levels]
        perm = torch.randperm(bott[0, 0].numel(), generator=torch.Generator().manual_seed(0))
        shuffled = list(feats)
        shuffled[levels] = bott.flatten(2)[..., perm].reshape(bott.shape)
        out_shuffled = model(x, t, image_features=shuffled)
    rel = (out_shuffled - out).norm() / out.norm()
    assert rel > 1e-3, rel  # the issue measured 3.6e-07 for the old, position-blind SS-Former


def test_every_encoder_scale_receives_gradient_from_the_diffusion_output(h):
    model = _trained_like(h, "model.channel_mult=[1,2,2]", "model.attention_resolutions=[4]")
    levels = model.spec.levels
    x, img, t = torch.randn(2, 1, 16, 16), torch.randn(2, 5, 16, 16), torch.tensor([20, 600])
    feats = [f.detach().requires_grad_() for f in model.encode_image(img)]
    model(x, t, image_features=feats).square().sum().backward()
    used = feats[: levels + 2]  # every level, the bottleneck and f_c^-1 (the anchor logits are the loss's)
    norms = [f.grad.norm().item() if f.grad is not None else 0.0 for f in used]
    assert all(n > 1e-6 for n in norms), norms
    assert feats[-1].grad is None
    # the paper's wiring (scale_fusion off) leaves the intermediate scales unused, as the issue measured
    paper = _trained_like(h, "model.channel_mult=[1,2,2]", "model.attention_resolutions=[4]", "model.scale_fusion=false")
    feats = [f.detach().requires_grad_() for f in paper.encode_image(img)]
    paper(x, t, image_features=feats).square().sum().backward()
    assert [f.grad is None for f in feats[:levels]] == [True] * levels
    assert feats[levels].grad.norm() > 0 and feats[levels + 1].grad.norm() > 0


@pytest.mark.parametrize(
    "overrides, anchor, blocks",
    [((), True, 1), (("model.ssformer_depth=0",), True, 0), (("model.anchor=false",), False, 1)],
    ids=["both", "anchor-only", "ssformer-only"],
)
def test_ablation_switches(h, overrides, anchor, blocks):
    model = build_model(h.tiny_config("medsegdiff_v2", *overrides))
    x, img, t = torch.randn(1, 1, 16, 16), torch.randn(1, 5, 16, 16), torch.tensor([4])
    out, logits = model(x, t, image=img, return_anchor=True)
    assert (logits is not None) == anchor and len(model.ssformer) == blocks
    assert len(model.encode_image(img)) == model.spec.levels + 1 + (2 if anchor else 0)
    loss = out.sum() + (logits.sum() if anchor else 0)
    loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []  # nothing built and unused


def test_anchor_detach_stops_the_diffusion_gradient_into_the_condition_decoder(h):
    det = h.perturb(build_model(h.tiny_config("medsegdiff_v2", "model.anchor_detach=true")))
    x, img, t = torch.randn(1, 1, 16, 16), torch.randn(1, 5, 16, 16), torch.tensor([4])
    det(x, t, image=img).square().sum().backward()
    assert all(p.grad is None for p in det.condition.output_blocks.parameters())
    assert det.usa.log_sigma.grad is not None
    assert det.condition.input_blocks[0][0].weight.grad.abs().sum() > 0  # the encoder still learns
