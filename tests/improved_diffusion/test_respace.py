"""Respacing: hand-derived kept steps, honest errors, original-scale timesteps for the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from improved_diffusion.respace import SpacedDiffusion, space_timesteps
from improved_diffusion.script_util import create_gaussian_diffusion


def test_ddim250_is_stride_4():
    assert space_timesteps(1000, "ddim250") == set(range(0, 1000, 4))
    assert space_timesteps(1000, "ddim50") == {20 * k for k in range(50)}


def test_single_section_keeps_both_ends():
    assert space_timesteps(1000, "10") == {111 * k for k in range(10)}
    kept = space_timesteps(1000, "250")
    assert len(kept) == 250 and {0, 995, 999} <= kept


def test_sections_with_fractional_strides_by_hand():
    # T=300 -> three sections of 100 steps: [0, 100), [100, 200), [200, 300).
    s1 = [11 * k for k in range(10)]  # stride 99 / 9 = 11
    # stride 99 / 15 = 6.6: 0, 6.6, 13.2, 19.8, 26.4, 33, 39.6, ... rounded
    s2 = [0, 7, 13, 20, 26, 33, 40, 46, 53, 59, 66, 73, 79, 86, 92, 99]
    # stride 99 / 19 = 5.2105...
    s3 = [0, 5, 10, 16, 21, 26, 31, 36, 42, 47, 52, 57, 63, 68, 73, 78, 83, 89, 94, 99]
    expected = set(s1) | {100 + v for v in s2} | {200 + v for v in s3}
    assert space_timesteps(300, "10,16,20") == expected
    assert space_timesteps(300, [10, 16, 20]) == expected


def test_uneven_sections_first_ones_longer():
    # T=10 split in 3 -> sizes 4, 3, 3 starting at 0, 4, 7; two steps each keeps both ends.
    assert space_timesteps(10, "2,2,2") == {0, 3, 4, 6, 7, 9}


def test_ddim_error_names_requested_count_and_suggests():
    with pytest.raises(ValueError, match=r"exactly 37 DDIM steps \('ddim37'\) from 1000 .*ddim36, ddim38.*'37'"):
        space_timesteps(1000, "ddim37")


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("ddimx", "expected 'ddimN' with an integer N"),
        ("ten", "bad respacing 'ten'"),
        ("0", "positive integer"),
        ("200,200", "cannot take 200 steps from a section of 50"),
    ],
)
def test_bad_specs(spec, msg):
    with pytest.raises(ValueError, match=msg):
        space_timesteps(100, spec)


def test_respaced_alpha_bar_equals_base_at_kept_steps():
    base = create_gaussian_diffusion(steps=1000, noise_schedule="cosine")
    spaced = create_gaussian_diffusion(steps=1000, noise_schedule="cosine", timestep_respacing="ddim50")
    kept = sorted(space_timesteps(1000, "ddim50"))
    assert spaced.num_timesteps == 50 and spaced.timestep_map == kept
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12)
    assert base.num_timesteps == 1000 and base.timestep_map == list(range(1000))


def test_empty_use_timesteps_rejected():
    betas = np.linspace(1e-3, 0.2, 100)
    from improved_diffusion.gaussian_diffusion import LossType, ModelMeanType, ModelVarType

    with pytest.raises(ValueError, match=r"non-empty subset of \[0, 100\)"):
        SpacedDiffusion(
            use_timesteps=[], betas=betas, model_mean_type=ModelMeanType.EPSILON,
            model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE,
        )


class Recorder:
    def __init__(self):
        self.ts = []

    def __call__(self, x, t, **kw):
        self.ts.append(t.clone())
        return torch.zeros_like(x)


@pytest.mark.parametrize("rescale", [False, True])
def test_model_sees_original_scale_timesteps_when_sampling(rescale):
    d = create_gaussian_diffusion(steps=100, timestep_respacing="ddim10", rescale_timesteps=rescale)
    rec = Recorder()
    d.ddim_sample_loop(rec, (2, 1, 4, 4), noise=torch.zeros(2, 1, 4, 4))
    seen = [t[0].item() for t in rec.ts]
    expected = [90, 80, 70, 60, 50, 40, 30, 20, 10, 0]
    if rescale:  # t * 1000 / original T
        assert rec.ts[0].dtype == torch.float32
        assert seen == pytest.approx([10.0 * e for e in expected])
    else:
        assert rec.ts[0].dtype == torch.long
        assert seen == expected


def test_model_sees_original_scale_timesteps_in_training_losses():
    d = create_gaussian_diffusion(steps=100, timestep_respacing="ddim10", rescale_timesteps=True)
    rec = Recorder()
    d.training_losses(rec, torch.zeros(2, 1, 3, 3), torch.tensor([3, 9]))
    assert rec.ts[0].tolist() == pytest.approx([300.0, 900.0])  # (3 -> 30, 9 -> 90) * 1000 / 100


def test_hybrid_loss_wraps_model_once():
    d = create_gaussian_diffusion(steps=100, learn_sigma=True, timestep_respacing="ddim10")
    seen = []

    def model(x, t, **kw):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    out = d.training_losses(model, torch.zeros(2, 1, 3, 3), torch.tensor([1, 2]))
    assert set(out) == {"loss", "mse", "vb"}
    assert seen[0].tolist() == [10, 20]


def test_timestep_map_tensor_built_once_per_device():
    d = create_gaussian_diffusion(steps=100, timestep_respacing="ddim10")
    w1, w2 = d._wrap_model(Recorder()), d._wrap_model(Recorder())
    m1 = w1.map_tensor(torch.device("cpu"))
    assert w2.map_tensor(torch.device("cpu")) is m1
    assert d._wrap_model(w1) is w1
    rec = Recorder()
    d.ddim_sample_loop(rec, (1, 1, 2, 2), noise=torch.zeros(1, 1, 2, 2))
    assert d._map_cache[torch.device("cpu")] is m1


def test_trailing_spacing_is_lin_et_al_table_2():
    # Lin et al. 2023, Table 2: trailing = round(flip(arange(T, 0, -T / N))) - 1
    assert sorted(space_timesteps(1000, "trailing10")) == [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]
    assert space_timesteps(1000, "trailing1") == {999}
    # T=10, N=3: 10 - j * 10/3 = 10, 6.67, 3.33 -> rounded 10, 7, 3 -> minus one 9, 6, 2
    assert sorted(space_timesteps(10, "trailing3")) == [2, 6, 9]
    assert len(space_timesteps(1000, "trailing250")) == 250
    assert max(space_timesteps(1000, "trailing7")) == 999


def test_ddim1_is_accepted_and_keeps_t0():
    assert space_timesteps(1000, "ddim1") == {0}
    assert space_timesteps(100, "ddim100") == set(range(100))


@pytest.mark.parametrize("spec, msg", [("trailing0", r"need 1 <= N <= 100"), ("trailing101", "need 1 <= N"),
                                       ("trailingx", "expected 'trailingN' with an integer N")])
def test_bad_trailing_specs(spec, msg):
    with pytest.raises(ValueError, match=msg):
        space_timesteps(100, spec)
