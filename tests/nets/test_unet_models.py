"""MedSegDiff-V1 and -V2: shapes (2-D/3-D, sizes, channels), gradients, cache, round-trips, errors."""

from __future__ import annotations

import io

import pytest
import torch
import yaml

from medsegdiff.config import config_from_dict, dump_config
from medsegdiff.errors import ConfigError
from medsegdiff.nets.blocks import repeat_features
from medsegdiff.nets.medsegdiff_v1 import MedSegDiffV1
from medsegdiff.nets.medsegdiff_v2 import MedSegDiffV2
from medsegdiff.nets.registry import build_model
from medsegdiff.nets.unet import NetSpec

DIFFUSION = ["medsegdiff_v1", "medsegdiff_v2"]
CLASSES = {"medsegdiff_v1": MedSegDiffV1, "medsegdiff_v2": MedSegDiffV2}


def _spec(dims, size, channels, out=1, **kw):
    base = dict(base_channels=8, condition_channels=8, channel_mult=(1, 2, 2), attention_factors=(4,),
                num_heads=2, norm_groups=4)
    base.update(kw)
    return NetSpec(dims=dims, size=size, in_channels=channels, out_channels=out, **base)


@pytest.mark.parametrize("name", DIFFUSION)
@pytest.mark.parametrize(
    "dims,size,channels",
    [(2, (16, 16), 1), (2, (24, 24), 5), (2, (32, 32), 8), (2, (16, 24), 3), (3, (8, 16, 16), 2)],
)
def test_forward_shapes(name, dims, size, channels):
    torch.manual_seed(0)
    model = CLASSES[name](_spec(dims, size, channels)).eval()
    b = 2
    x = torch.randn(b, 1, *size)
    img = torch.randn(b, channels, *size)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        out, anchor = model(x, t, image=img, return_anchor=True)
    assert out.shape == (b, 1, *size)
    if name == "medsegdiff_v2":
        assert anchor.shape == (b, 1, *size)
    else:
        assert anchor is None
    assert model.is_diffusion


@pytest.mark.parametrize("name", DIFFUSION)
@pytest.mark.parametrize("dims", [2, 3])
def test_every_parameter_gets_a_gradient_and_learned_sigma(name, dims, h):
    size = 16 if dims == 2 else 8
    cfg = h.tiny_config(name, f"data.dims={dims}", "data.patch_size=[8,8,8]", "diffusion.learn_sigma=true", size=size)
    model = h.perturb(build_model(cfg))
    s = (16, 16) if dims == 2 else (8, 8, 8)
    x, img = torch.randn(2, 1, *s), torch.randn(2, 5, *s)
    out, anchor = model(x, torch.tensor([5, 500]), image=img, return_anchor=True)
    assert out.shape == (2, 2, *s)  # epsilon + variance interpolation
    loss = out.square().mean()
    if anchor is not None:
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(anchor, (img[:, :1] > 0).float())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    dead = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert dead == []  # perturbed weights: no parameter is cut off from the loss


@pytest.mark.parametrize("name", DIFFUSION)
def test_image_feature_cache_and_ensemble_repeat_are_exact(name, h):
    torch.manual_seed(1)
    model = h.perturb(build_model(h.tiny_config(name))).eval()
    x = torch.randn(2, 1, 16, 16)
    img = torch.randn(2, 5, 16, 16)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        uncached = model(x, t, image=img)
        feats = model.encode_image(img)
        cached = model(x, t, image_features=feats)
        assert uncached.abs().max() > 1e-3  # non-trivial output
        assert torch.equal(uncached, cached)
        n = 3
        xe = torch.randn(2 * n, 1, 16, 16)
        te = t.repeat_interleave(n)
        ens_cached = model(xe, te, image_features=repeat_features(feats, n))
        ens_uncached = model(xe, te, image=img.repeat_interleave(n, dim=0))
    torch.testing.assert_close(ens_cached, ens_uncached, atol=1e-6, rtol=0)
    if name == "medsegdiff_v2":
        assert torch.equal(model.anchor_logits(feats), feats[-1])


@pytest.mark.parametrize("name", DIFFUSION)
def test_state_dict_and_resolved_config_round_trip(name, h, tmp_path):
    cfg = h.tiny_config(name)
    torch.manual_seed(2)
    model = h.perturb(build_model(cfg)).eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    # the config a run saves (dump_config -> YAML file) rebuilds the same architecture
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    cfg2 = config_from_dict(yaml.safe_load(path.read_text()))
    assert cfg2 == cfg
    torch.manual_seed(99)
    model2 = build_model(cfg2).eval()
    buf.seek(0)
    model2.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    x, img, t = torch.randn(2, 1, 16, 16), torch.randn(2, 5, 16, 16), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(model(x, t, image=img), model2(x, t, image=img))


def test_bad_size_and_channels_errors(h):
    with pytest.raises(
        ConfigError, match=r"image size 100 .* not a multiple of 2\^3 = 8 required by channel_mult \[1, 2, 4, 8\]; use 96 or 104"
    ):
        build_model(h.tiny_config("medsegdiff_v2", "model.channel_mult=[1,2,4,8]", size=100))
    model = build_model(h.tiny_config("medsegdiff_v1"))
    t = torch.tensor([1])
    with pytest.raises(ConfigError, match=r"image has 3 channels but the model was built for 5 \(data.in_channels"):
        model(torch.zeros(1, 1, 16, 16), t, image=torch.zeros(1, 3, 16, 16))
    with torch.no_grad():  # the FF-Parser no longer fixes the size (weights in normalised frequency)
        assert model(torch.zeros(1, 1, 32, 32), t, image=torch.zeros(1, 5, 32, 32)).shape == (1, 1, 32, 32)
    with pytest.raises(ConfigError, match=r"expects \(B, C, H, W\)"):
        model(torch.zeros(1, 1, 4, 16, 16), t, image=torch.zeros(1, 5, 4, 16, 16))
    with pytest.raises(ValueError, match="exactly one of image= or image_features="):
        model(torch.zeros(1, 1, 16, 16), t)
    with pytest.raises(ConfigError, match=r"use repeat_features"):
        feats = model.encode_image(torch.zeros(1, 5, 16, 16))
        model(torch.zeros(2, 1, 16, 16), torch.tensor([1, 1]), image_features=feats)
    # V2 accepts other valid sizes too and still checks them
    v2 = build_model(h.tiny_config("medsegdiff_v2")).eval()
    with torch.no_grad():
        assert v2(torch.zeros(1, 1, 24, 24), t, image=torch.zeros(1, 5, 24, 24)).shape == (1, 1, 24, 24)
    with pytest.raises(ConfigError, match=r"image size 17 .* not a multiple of 2\^1 = 2"):
        v2(torch.zeros(1, 1, 17, 17), t, image=torch.zeros(1, 5, 17, 17))


def test_bad_attention_config_errors(h):
    with pytest.raises(ConfigError, match=r"attention_resolutions\[0\]': got 3; allowed: downsample factors \[1, 2\]"):
        h.tiny_config("medsegdiff_v1", "model.attention_resolutions=[3]")
    with pytest.raises(ConfigError, match="num_heads: 3 does not divide the attention width 16"):
        build_model(h.tiny_config("medsegdiff_v1", "model.num_heads=3"))
    with pytest.raises(ConfigError, match="num_head_channels: 5 does not divide the attention width 16"):
        build_model(h.tiny_config("medsegdiff_v1", "model.num_head_channels=5"))


@pytest.mark.parametrize("name", DIFFUSION)
def test_self_conditioning_mask_channels(name):
    # the self-conditioning contract: the network takes cat([x_t, x0_prev]) and says so
    model = CLASSES[name](_spec(2, (16, 16), 3, mask_channels=2)).eval()
    assert model.self_condition is False  # set by the registry from diffusion.self_condition
    x, img, t = torch.randn(2, 2, 16, 16), torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with torch.no_grad():
        assert model(x, t, image=img).shape == (2, 1, 16, 16)
    with pytest.raises(ConfigError, match=r"x_t \(noisy mask\) has 1 channels but the model was built for 2"):
        model(x[:, :1], t, image=img)


@pytest.mark.parametrize("name", DIFFUSION)
def test_3d_depth_rule(name):
    # full 3-D (default): every level halves D too; resample_depth=False keeps D (any depth)
    x, img, t = torch.randn(1, 1, 5, 16, 16), torch.randn(1, 2, 5, 16, 16), torch.tensor([3])
    with pytest.raises(ConfigError, match=r"image size 5 .* not a multiple of 2\^2 = 4"):
        CLASSES[name](_spec(3, (5, 16, 16), 2))
    model = CLASSES[name](_spec(3, (5, 16, 16), 2, resample_depth=False)).eval()
    assert model.spec.level_size(2) == (5, 4, 4)
    with torch.no_grad():
        assert model(x, t, image=img).shape == (1, 1, 5, 16, 16)
        assert model.encode_image(img)[model.spec.levels].shape[2:] == (5, 4, 4)


@pytest.mark.parametrize("name", DIFFUSION)
def test_bf16_autocast_close_to_fp32_and_channels_last(name, h):
    torch.manual_seed(3)
    model = h.perturb(build_model(h.tiny_config(name))).eval()
    x, img, t = torch.randn(2, 1, 16, 16), torch.randn(2, 5, 16, 16), torch.tensor([3, 300])
    with torch.no_grad():
        ref = model(x, t, image=img)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, image=img)
        rel = (low.float() - ref).norm() / ref.norm()
        assert rel < 0.05, rel
        model.to(memory_format=torch.channels_last)
        cl = model(x.to(memory_format=torch.channels_last), t, image=img.to(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-4)


def test_compile_eager_backend_matches(h):
    torch.manual_seed(4)
    model = h.perturb(build_model(h.tiny_config("medsegdiff_v2"))).eval()
    x, img, t = torch.randn(1, 1, 16, 16), torch.randn(1, 5, 16, 16), torch.tensor([3])
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, image=img), model(x, t, image=img))


@pytest.mark.slow
@pytest.mark.parametrize("name", DIFFUSION)
def test_compile_inductor_matches(name, h):
    torch.manual_seed(5)
    model = h.perturb(build_model(h.tiny_config(name))).eval()
    x, img, t = torch.randn(2, 1, 16, 16), torch.randn(2, 5, 16, 16), torch.tensor([3, 30])
    compiled = torch.compile(model)
    with torch.no_grad():
        feats = model.encode_image(img)
        torch.testing.assert_close(compiled(x, t, image_features=feats), model(x, t, image_features=feats),
                                   atol=1e-4, rtol=1e-4)


def test_activation_checkpointing_gives_same_outputs_and_gradients(h):
    torch.manual_seed(6)
    plain = h.perturb(build_model(h.tiny_config("medsegdiff_v1")))
    ckpt = build_model(h.tiny_config("medsegdiff_v1", "model.use_checkpoint=true"))
    ckpt.load_state_dict(plain.state_dict())
    x, img, t = torch.randn(2, 1, 16, 16), torch.randn(2, 5, 16, 16), torch.tensor([3, 30])
    for m in (plain, ckpt):
        m(x, t, image=img).square().mean().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=n)
