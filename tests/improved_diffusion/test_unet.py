"""UNetModel: shapes in 2D/3D, the guided-diffusion fixes, SDPA attention equals the formula."""

from __future__ import annotations

import math

import pytest
import torch

from improved_diffusion.unet import AttentionBlock, Downsample, QKVAttention, UNetModel, Upsample


def reference_attention(qkv):
    """softmax(q^T k / sqrt(ch)) v with heads packed as [q | k | v] per head."""
    ch = qkv.shape[1] // 3
    q, k, v = torch.split(qkv, ch, dim=1)
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
    return torch.einsum("bts,bcs->bct", w, v)


def test_sdpa_attention_matches_formula():
    qkv = torch.randn(3, 3 * 8, 10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(QKVAttention()(qkv), reference_attention(qkv), rtol=1e-5, atol=1e-5)


def test_attention_block_heads_split_before_qkv():
    torch.manual_seed(0)
    blk = AttentionBlock(8, num_heads=2)
    torch.nn.init.normal_(blk.proj_out.weight)
    x = torch.randn(2, 8, 3, 3)
    b, c = 2, 8
    qkv = blk.qkv(blk.norm(x.reshape(b, c, -1))).reshape(b * 2, -1, 9)  # per head: [q | k | v]
    h = blk.proj_out(reference_attention(qkv).reshape(b, -1, 9))
    torch.testing.assert_close(blk(x), (x.reshape(b, c, -1) + h).reshape(x.shape), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        AttentionBlock(8, num_heads=3)


@pytest.mark.parametrize("dims, shape, expected", [(2, (1, 4, 8, 8), (1, 4, 4, 4)), (3, (1, 4, 3, 8, 8), (1, 4, 3, 4, 4))])
@pytest.mark.parametrize("use_conv", [False, True])
def test_down_and_upsample(dims, shape, expected, use_conv):
    x = torch.randn(*shape)
    down = Downsample(4, use_conv, dims=dims)(x)
    assert down.shape == expected
    up = Upsample(4, use_conv, dims=dims)(down)
    assert up.shape == shape
    if not use_conv:  # average pooling: mean of each 2x2 block
        torch.testing.assert_close(down[..., 0, 0], x[..., :2, :2].mean(dim=(-1, -2)))
    assert Downsample(4, False, dims=3, resample_depth=True)(torch.randn(1, 4, 4, 8, 8)).shape == (1, 4, 2, 4, 4)


@pytest.mark.parametrize("dims, size", [(2, (8, 8)), (3, (2, 8, 8))])
def test_unet_shapes_and_zero_init_output(dims, size):
    torch.manual_seed(0)
    model = UNetModel(in_channels=3, model_channels=8, out_channels=2, num_res_blocks=1,
                      attention_resolutions=(2,), channel_mult=(2, 4), dims=dims, num_heads=2,
                      use_scale_shift_norm=True, conv_resample=False)
    x = torch.randn(2, 3, *size)
    out = model(x, torch.tensor([1, 500]))
    assert out.shape == (2, 2, *size)
    assert torch.all(out == 0)  # the output convolution starts at zero, like upstream
    feats = model.get_feature_vectors(x, torch.tensor([1.5, 2.0]))
    assert len(feats["down"]) == len(model.input_blocks) and feats["middle"].shape[1] == 32


def test_checkpointing_gives_same_loss_and_grads():
    torch.manual_seed(0)
    kw = dict(in_channels=1, model_channels=8, out_channels=1, num_res_blocks=1, attention_resolutions=(1,),
              channel_mult=(1, 2), dropout=0.0)
    a, b = UNetModel(**kw), UNetModel(**kw, use_checkpoint=True)
    torch.nn.init.normal_(a.out[-1].weight, std=0.1)
    b.load_state_dict(a.state_dict())
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([3, 7])
    la, lb = a(x, t).square().mean(), b(x, t).square().mean()
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6)


def test_class_conditional_needs_labels():
    model = UNetModel(1, 8, 1, 1, (), channel_mult=(1,), num_classes=3)
    out = model(torch.randn(2, 1, 4, 4), torch.tensor([0, 1]), y=torch.tensor([0, 2]))
    assert out.shape == (2, 1, 4, 4)
    with pytest.raises(ValueError, match="if and only if the model is class-conditional"):
        model(torch.randn(2, 1, 4, 4), torch.tensor([0, 1]))


def test_unet_learns_epsilon_on_a_tiny_problem():
    from improved_diffusion.script_util import create_gaussian_diffusion

    torch.manual_seed(0)
    d = create_gaussian_diffusion(steps=100)
    model = UNetModel(1, 8, 1, 1, (), channel_mult=(1, 2))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x0 = torch.zeros(8, 1, 4, 4)
    x0[:, :, 1:3, 1:3] = 1.0
    x0 = 2 * x0 - 1
    losses = []
    for _ in range(60):
        t = torch.randint(0, 100, (8,))
        loss = d.training_losses(model, x0, t)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first


# -- extensions (listed in the provenance header of improved_diffusion/unet.py) ----------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_resblock_time_free_groups_and_widths(dims):
    from improved_diffusion.unet import ResBlock

    s = (4,) * dims
    x, emb = torch.randn(2, 6, *s), torch.randn(2, 10)
    rb = ResBlock(6, 10, 0.0, out_channels=12, dims=dims, use_scale_shift_norm=True, norm_groups=32)
    assert rb(x, emb).shape == (2, 12, *s)
    assert rb.out_layers[0].num_groups == 12  # the largest divisor of 12 not above 32
    assert ResBlock(6, 10, 0.0, dims=dims, norm_groups=4).in_layers[0].num_groups == 3
    with pytest.raises(ValueError, match="called without one"):
        rb(x)
    free = ResBlock(6, None, 0.0, dims=dims, use_scale_shift_norm=True)
    assert free.emb_layers is None and not free.use_scale_shift_norm
    torch.testing.assert_close(free(x), x)  # zero-initialised last convolution: identity at init
    torch.nn.init.normal_(free.out_layers[-1].weight)
    assert torch.equal(free(x), free(x, None)) and not torch.allclose(free(x), x)


def test_attention_num_head_channels_and_groups():
    from improved_diffusion.unet import attention_heads

    assert attention_heads(64, num_heads=4) == 4
    assert attention_heads(64, num_heads=4, num_head_channels=16) == 4
    assert attention_heads(64, num_heads=1, num_head_channels=32) == 2  # the width per head wins
    blk = AttentionBlock(12, num_head_channels=4, norm_groups=4)
    assert blk.num_heads == 3 and blk.norm.num_groups == 4
    with pytest.raises(ValueError, match="not divisible by num_head_channels 5"):
        AttentionBlock(12, num_head_channels=5)


def test_channel_changing_and_full_3d_resampling():
    x = torch.randn(1, 4, 4, 8, 8)
    assert Downsample(4, True, dims=3, out_channels=6)(x).shape == (1, 6, 4, 4, 4)  # upstream rule (1, 2, 2)
    assert Downsample(4, True, dims=3, out_channels=6, resample_depth=True)(x).shape == (1, 6, 2, 4, 4)
    assert Upsample(4, True, dims=3, out_channels=2, resample_depth=True)(x).shape == (1, 2, 8, 16, 16)
    assert Upsample(4, True, 2, 3)(torch.randn(1, 4, 2, 2)).shape == (1, 3, 4, 4)  # guided's positional order
    with pytest.raises(ValueError, match="needs use_conv=True"):
        Downsample(4, False, out_channels=6)
    with pytest.raises(ValueError, match="needs use_conv=True"):
        Upsample(4, False, out_channels=6)


def test_encode_hooks_decode_equal_forward_and_time_free_encoder():
    torch.manual_seed(0)
    kw = dict(in_channels=2, model_channels=8, out_channels=1, num_res_blocks=1, attention_resolutions=(2,),
              channel_mult=(1, 2), num_heads=2, norm_groups=4)
    model = UNetModel(**kw)
    torch.nn.init.normal_(model.out[-1].weight, std=0.1)
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([1, 9])
    emb = model._embed(t, None)
    h, hs = model.encode(x, emb)
    out = model.out(model.decode(model.middle_block(h, emb), hs, emb))
    torch.testing.assert_close(out, model(x, t))
    assert model.level_ends == (1, 3) and [hs[i].shape[1] for i in model.level_ends] == [8, 16]
    # a hook replaces a block's output, including the skip connection the decoder sees
    seen = []
    h2, hs2 = model.encode(x, emb, {1: lambda z: seen.append(z.shape) or z * 0})
    assert seen == [(2, 8, 8, 8)] and torch.equal(hs2[1], torch.zeros_like(hs2[1]))
    assert not torch.equal(model.out(model.decode(model.middle_block(h2, emb), hs2, emb)), out)
    # time-free encoder only: no time MLP, no decoder, forward without timesteps
    enc = UNetModel(**kw, timestep_conditioned=False, encoder_only=True, mid_attention=False)
    assert not hasattr(enc, "time_embed") and not hasattr(enc, "output_blocks")
    assert len(enc.middle_block) == 2
    h3, _ = enc.encode(x, None)
    assert enc.middle_block(h3).shape == (2, 16, 4, 4)
    full = UNetModel(**kw, timestep_conditioned=False)
    assert full(x).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="pass timesteps"):
        model(x)
