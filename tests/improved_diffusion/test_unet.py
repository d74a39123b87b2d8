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
