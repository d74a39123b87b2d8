from __future__ import annotations

import pytest
import torch

from medsegdiff.inference.sampler import NaiveSampler, member_noise, sample_probabilities


def _images(n: int = 3, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 2, size, size, generator=g)


def test_ensemble_batching_equals_member_by_member(tiny_model, tiny_diffusion):
    images = _images(3)
    noise = torch.randn(4, 3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    # batch_size 5 forces chunks of one slice x all members, then a member split (4 members, 5 slots)
    batched = sample_probabilities(tiny_model, tiny_diffusion, images, members=4, noise=noise, batch_size=5)
    assert batched.shape == (4, 3, 8, 8)
    for m in range(4):
        single = sample_probabilities(tiny_model, tiny_diffusion, images, members=1, noise=noise[m : m + 1],
                                      batch_size=1)
        torch.testing.assert_close(batched[m : m + 1], single, atol=1e-5, rtol=0)
    # the members really differ (different x_T), and values are probabilities
    assert (batched[0] - batched[1]).abs().max() > 1e-3
    assert batched.min() >= 0 and batched.max() <= 1


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_cached_encoding_equals_naive_path(tiny_model, tiny_diffusion, sampler, eta):
    images = _images(3)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    fast = sample_probabilities(tiny_model, tiny_diffusion, images, members=2, sampler=sampler, eta=eta,
                                generator=g1, batch_size=64)
    tiny_model.encode_calls = 0
    naive = NaiveSampler(tiny_model, tiny_diffusion, sampler=sampler, eta=eta)(images, members=2, generator=g2)
    steps = tiny_diffusion.num_timesteps
    assert tiny_model.encode_calls == 2 * 3 * steps  # naive re-encodes every slice, member and step
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=0)


def test_image_encoded_once_per_slice(tiny_model, tiny_diffusion):
    tiny_model.encode_calls = 0
    sample_probabilities(tiny_model, tiny_diffusion, _images(6), members=3, batch_size=6)
    assert tiny_model.encode_calls == 3  # 6 slices in chunks of 2 slices x 3 members


def test_stochastic_noise_is_drawn_per_member_and_step():
    a = member_noise(7, 0, 3, (2, 1, 4, 4), torch.device("cpu"))
    assert torch.equal(a, member_noise(7, 0, 3, (2, 1, 4, 4), torch.device("cpu")))
    assert not torch.equal(a, member_noise(7, 1, 3, (2, 1, 4, 4), torch.device("cpu")))
    assert not torch.equal(a, member_noise(7, 0, 4, (2, 1, 4, 4), torch.device("cpu")))


def test_learned_sigma_ddpm_and_generator_reproducibility(parts):
    torch.manual_seed(0)
    model = parts.TinyDenoiser(out_ch=2)
    diffusion = parts.make_diffusion("5", learn_sigma=True)
    images = _images(2)
    a = sample_probabilities(model, diffusion, images, members=2, sampler="ddpm",
                             generator=torch.Generator().manual_seed(3))
    b = sample_probabilities(model, diffusion, images, members=2, sampler="ddpm",
                             generator=torch.Generator().manual_seed(3))
    c = sample_probabilities(model, diffusion, images, members=2, sampler="ddpm",
                             generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_model_left_in_its_training_mode(tiny_model, tiny_diffusion):
    tiny_model.train()
    sample_probabilities(tiny_model, tiny_diffusion, _images(1), members=1)
    assert tiny_model.training


def test_discriminative_model_returns_sigmoid_of_logits(parts):
    torch.manual_seed(0)
    model = parts.TinyDiscriminative()
    images = _images(3)
    out = sample_probabilities(model, None, images, members=5, batch_size=2)
    assert out.shape == (1, 3, 8, 8)
    torch.testing.assert_close(out[0], torch.sigmoid(model(images))[:, 0])


def test_bad_arguments_raise(tiny_model, tiny_diffusion):
    with pytest.raises(ValueError, match="sampler must be"):
        sample_probabilities(tiny_model, tiny_diffusion, _images(1), sampler="euler")
    with pytest.raises(ValueError, match="noise must have shape"):
        sample_probabilities(tiny_model, tiny_diffusion, _images(1), members=2,
                             noise=torch.zeros(1, 1, 1, 8, 8))


@pytest.mark.parametrize("name", ["medsegdiff_v1", "medsegdiff_v2"])
def test_real_networks_fast_equals_naive(name, parts):
    from medsegdiff.config.loader import config_from_dict
    from medsegdiff.nets.registry import build_model

    cfg = config_from_dict({
        "model": {"name": name, "base_channels": 8, "channel_mult": [1, 2], "norm_groups": 4,
                  "attention_resolutions": [2], "num_heads": 2},
        "data": {"image_size": 8, "modalities": ["cbf", "tmax"]},
    })
    torch.manual_seed(0)
    model = build_model(cfg)
    diffusion = parts.make_diffusion("3")
    images = _images(3)
    fast = sample_probabilities(model, diffusion, images, members=2, batch_size=4, eta=0.5,
                                generator=torch.Generator().manual_seed(9))
    naive = sample_probabilities(model, diffusion, images, members=2, naive=True, eta=0.5,
                                 generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=0)


def test_fast_ddim_equals_the_core_ddim_sample_loop(tiny_model, tiny_diffusion):
    """The batched sampler runs the core's DDIM steps: same x_T -> same result as ddim_sample_loop."""
    torch.manual_seed(0)
    images = torch.randn(3, 2, 8, 8)
    x_T = torch.randn(2, 3, 1, 8, 8)
    fast = sample_probabilities(tiny_model, tiny_diffusion, images, members=2, noise=x_T, batch_size=4)
    for m in range(2):
        ref = tiny_diffusion.ddim_sample_loop(
            tiny_model, (3, 1, 8, 8), noise=x_T[m], model_kwargs={"image": images}, eta=0.0
        )
        assert torch.allclose(fast[m], ((ref[:, 0] + 1) / 2).clamp(0, 1), atol=1e-5)


def test_self_conditioned_model_gets_the_previous_estimate(tiny_model, tiny_diffusion):
    """Chen et al. 2022, Algorithm 2: step k sees the x0 estimate of step k+1 (zeros at the start)."""
    from medsegdiff.diffusion.self_condition import concat_self_cond

    torch.manual_seed(0)
    tiny_model.inp = torch.nn.Conv2d(2, tiny_model.inp.out_channels, 3, padding=1)
    tiny_model.self_condition = True
    images = torch.randn(3, 2, 8, 8)
    x_T = torch.randn(2, 3, 1, 8, 8)
    fast = sample_probabilities(tiny_model, tiny_diffusion, images, members=2, noise=x_T, batch_size=4)
    naive = sample_probabilities(tiny_model, tiny_diffusion, images, members=2, noise=x_T, naive=True)
    torch.testing.assert_close(fast, naive, atol=1e-5, rtol=0)
    for m in range(2):
        x, prev, zeros_only = x_T[m], None, x_T[m]
        for k in reversed(range(tiny_diffusion.num_timesteps)):
            t = torch.full((3,), k)
            with torch.no_grad():
                out = tiny_diffusion.ddim_sample(
                    lambda x, ts, p=prev, **kw: tiny_model(concat_self_cond(x, p), ts, **kw), x, t,
                    model_kwargs={"image": images},
                )
                zeros_only = tiny_diffusion.ddim_sample(
                    lambda x, ts, **kw: tiny_model(concat_self_cond(x, None), ts, **kw), zeros_only, t,
                    model_kwargs={"image": images},
                )["sample"]
            x, prev = out["sample"], out["pred_xstart"]
        torch.testing.assert_close(fast[m], ((x[:, 0] + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)
        assert not torch.allclose(fast[m], ((zeros_only[:, 0] + 1) / 2).clamp(0, 1), atol=1e-4)
