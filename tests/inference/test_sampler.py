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


ALL_SAMPLERS = [("ddim", 0.0), ("ddim", 0.8), ("ddpm", 0.0), ("dpmpp_2m", 0.0), ("dpmpp_3m", 0.0), ("x0", 0.0)]


@pytest.mark.parametrize("sampler,eta", ALL_SAMPLERS)
def test_every_sampler_batched_equals_member_by_member_and_reference(tiny_model, tiny_diffusion, sampler, eta):
    images = _images(3)
    kw = dict(sampler=sampler, eta=eta, members=3)
    batched = sample_probabilities(tiny_model, tiny_diffusion, images, batch_size=4,
                                   generator=torch.Generator().manual_seed(8), **kw)
    one_by_one = sample_probabilities(tiny_model, tiny_diffusion, images, batch_size=1,
                                      generator=torch.Generator().manual_seed(8), **kw)
    reference = sample_probabilities(tiny_model, tiny_diffusion, images, naive=True,
                                     generator=torch.Generator().manual_seed(8), **kw)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched, reference, atol=1e-5, rtol=0)
    assert (batched[0] - batched[1]).abs().max() > 1e-3  # members differ


def test_registry_matches_the_config_choices():
    from typing import get_args, get_type_hints

    from medsegdiff.config.inference import InferenceConfig
    from medsegdiff.inference.sampler import SAMPLERS

    allowed = set(get_args(get_type_hints(InferenceConfig)["sampler"])) - {""}
    assert allowed == set(SAMPLERS)


def test_sampler_name_prefers_inference_sampler():
    from medsegdiff.config.loader import config_from_dict
    from medsegdiff.inference.sampler import sampler_name

    assert sampler_name(config_from_dict({"diffusion": {"sampler": "ddpm"}})) == "ddpm"
    assert sampler_name(config_from_dict({"diffusion": {"sampler": "ddpm"},
                                          "inference": {"sampler": "dpmpp_2m"}})) == "dpmpp_2m"


def test_x0_sampler_makes_one_network_call(parts):
    class Counting(parts.TinyDenoiser):
        calls = 0

        def forward(self, *a, **kw):
            type(self).calls += 1
            return super().forward(*a, **kw)

    torch.manual_seed(0)
    model = Counting()
    diffusion = parts.make_diffusion("trailing10")
    out = sample_probabilities(model, diffusion, _images(2), members=2, sampler="x0", batch_size=4)
    assert Counting.calls == 1 and out.shape == (2, 2, 8, 8)


def test_self_conditioned_network_gets_previous_estimate_as_second_channel(parts):
    class SelfCond(parts.TinyDenoiser):
        self_condition = True

        def __init__(self):
            super().__init__()
            self.inp = torch.nn.Conv2d(2, 8, 3, padding=1)
            self.second = []

        def forward(self, x, timesteps, **kw):
            assert x.shape[1] == 2
            self.second.append(x[:, 1:].clone())
            return super().forward(x, timesteps, **kw)

    torch.manual_seed(0)
    model = SelfCond()
    diffusion = parts.make_diffusion("trailing3")
    sample_probabilities(model, diffusion, _images(1), members=1, sampler="ddim")
    assert len(model.second) == 3 and torch.equal(model.second[0], torch.zeros_like(model.second[0]))
    assert model.second[1].abs().max() > 0 and model.second[1].abs().max() <= 1.0


def test_precision_auto_resolved_in_one_place():
    from medsegdiff.errors import ConfigError
    from medsegdiff.utils.runtime import resolve_precision

    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    with pytest.raises(ConfigError, match="inference.precision.*allowed: auto, fp32, bf16"):
        resolve_precision("fp8", torch.device("cpu"))
